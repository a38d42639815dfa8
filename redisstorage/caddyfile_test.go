package redisstorage

import (
	"bytes"
	"encoding/json"
	"flag"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-mcp/oauth-broker/caddyoauthbroker" // for `mcp_oauth { storage mcp_oauth_redis }`
	"github.com/caddy-mcp/oauth-broker/internal/adapttest"
)

var update = flag.Bool("update", false, "rewrite the golden adapt files")

// TestCaddyfileAdapt adapts every testdata/adapt/*.caddyfile (the global `storage` option
// and mcp_oauth's `storage`, each with defaults and with every subdirective) and compares
// the JSON with its golden .json twin (-update rewrites them).
func TestCaddyfileAdapt(t *testing.T) { adapttest.Golden(t, *update) }

// The Caddyfile fills exactly the JSON fields: the block with every subdirective decodes
// into Storage refusing unknown fields, with each value where its doc comment says.
func TestCaddyfileFillsEveryField(t *testing.T) {
	var s Storage
	d := caddyfile.NewTestDispenser(`mcp_oauth_redis {
		addresses sentinel-1:26379 sentinel-2:26379
		username u
		password p
		db 3
		key_prefix k
		tls
		tls_server_name n
		tls_ca_file f
		dial_timeout 1s
		read_timeout 2s
		write_timeout 3s
		sentinel_master m
		sentinel_username su
		sentinel_password sp
	}`)
	if err := s.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	raw, err := json.Marshal(&s)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"addresses":["sentinel-1:26379","sentinel-2:26379"],"username":"u","password":"p","db":3,` +
		`"key_prefix":"k","tls":true,"tls_server_name":"n","tls_ca_file":"f","dial_timeout":1000000000,` +
		`"read_timeout":2000000000,"write_timeout":3000000000,"sentinel_master":"m","sentinel_username":"su","sentinel_password":"sp"}`
	if string(raw) != want {
		t.Errorf("the block's JSON is\n%s\nwant\n%s", raw, want)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(new(Storage)); err != nil {
		t.Errorf("the block's JSON does not decode into Storage: %v", err)
	}
}

func TestCaddyfileErrors(t *testing.T) {
	for _, c := range []struct {
		name, in, want string
	}{
		{"an argument after the name", "mcp_oauth_redis 127.0.0.1:6379", "wrong argument count"},
		{"an unknown subdirective", "mcp_oauth_redis {\n cluster on\n}", `unrecognized subdirective "cluster"`},
		{"a subdirective given twice", "mcp_oauth_redis {\n db 1\n db 2\n}", "db: given twice"},
		{"a db that is not a number", "mcp_oauth_redis {\n db one\n}", `db: want a number, got "one"`},
		{"a timeout that is not a duration", "mcp_oauth_redis {\n read_timeout soon\n}", "read_timeout:"},
		{"tls with an argument", "mcp_oauth_redis {\n tls off\n}", "wrong argument count"},
		{"addresses without one", "mcp_oauth_redis {\n addresses\n}", "wrong argument count"},
		{"a password with two arguments", "mcp_oauth_redis {\n password a b\n}", "wrong argument count"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := new(Storage).UnmarshalCaddyfile(caddyfile.NewTestDispenser(c.in))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error = %v, want one containing %q", err, c.want)
			}
		})
	}
}
