package caddyoauthbroker

import (
	"encoding/json"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// FuzzUnmarshalCaddyfile: the mcp_oauth directive's parser answers any input with a
// Handler or an error, never a panic, and what it accepts marshals to JSON. Seeds: every
// golden adapt input's directive forms.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, s := range []string{
		"mcp_oauth {\n issuer https://idp.example.com\n client_id c\n resource https://mcp.example.com/mcp\n}",
		"mcp_oauth {\n delegation token_exchange {\n audience a\n scopes s\n }\n tool_scope \"*_write\" w\n}",
		"mcp_oauth {\n client app {\n redirect_uri https://a/cb http://127.0.0.1/cb\n scopes a b\n }\n}",
		"mcp_oauth {\n offline_access {\n scopes a\n tools \"nc_*\"\n callback_path /oauth/offline-access/callback\n }\n background_client w {env.S}\n}",
		"mcp_oauth {\n access_token_ttl 15m\n refresh_token_ttl 720h\n registration off\n client_metadata_documents off\n}",
		"mcp_oauth {\n storage file_system {\n root /tmp/x\n }\n}",
		"mcp_oauth {\n delegation {\n}\n}", "mcp_oauth {", "mcp_oauth {\n mode\n}", "mcp_oauth x y {\n}",
		"mcp_oauth {\n access_token_ttl -1s\n max_body_bytes 99999999999999999999\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
			return
		}
		if _, err := json.Marshal(&h); err != nil {
			t.Fatalf("accepted %q but cannot marshal it: %v", input, err)
		}
	})
}
