package redisstorage

import (
	"encoding/json"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// FuzzUnmarshalCaddyfile: the mcp_oauth_redis block's parser answers any input with a
// Storage or an error, never a panic; what it accepts marshals to JSON, reads back the same,
// and Validate judges it without panicking. Seeds: the golden adapt inputs' blocks and the
// error table's.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, s := range []string{
		"mcp_oauth_redis",
		"mcp_oauth_redis {\n addresses redis.internal:6380\n username caddy\n password {env.REDIS_PASSWORD}\n db 2\n key_prefix mcp/prod\n tls\n tls_server_name redis.example.com\n tls_ca_file /etc/ca.pem\n dial_timeout 2s\n read_timeout 1500ms\n write_timeout 1s\n}",
		"mcp_oauth_redis {\n addresses s1:26379 s2:26379\n sentinel_master m\n sentinel_username su\n sentinel_password {file./run/s}\n}",
		"mcp_oauth_redis 127.0.0.1:6379", "mcp_oauth_redis {\n db 1\n db 2\n}", "mcp_oauth_redis {\n db -99999999999999999999\n}",
		"mcp_oauth_redis {\n read_timeout soon\n}", "mcp_oauth_redis {\n tls off\n}", "mcp_oauth_redis {",
		"mcp_oauth_redis {\n addresses a:1 b:2\n key_prefix caddy/\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		var s Storage
		if err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
			return
		}
		raw, err := json.Marshal(&s)
		if err != nil {
			t.Fatalf("accepted %q but cannot marshal it: %v", input, err)
		}
		var back Storage
		if err := json.Unmarshal(raw, &back); err != nil {
			t.Fatalf("accepted %q but its JSON %s does not read back: %v", input, raw, err)
		}
		back.setDefaults()
		_ = back.Validate()
	})
}
