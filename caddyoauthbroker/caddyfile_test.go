package caddyoauthbroker

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/caddy-mcp/oauth-broker/internal/adapttest"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

var update = flag.Bool("update", false, "rewrite the golden adapt files")

// TestCaddyfileAdapt adapts every testdata/adapt/*.caddyfile and compares the JSON with its
// golden .json twin (go test -run TestCaddyfileAdapt -update rewrites them).
func TestCaddyfileAdapt(t *testing.T) { adapttest.Golden(t, *update) }

// TestCaddyfileAdaptedJSONIsTheConfig proves the Caddyfile fills exactly the JSON fields:
// the handler JSON from the full example decodes into the struct without unknown fields.
func TestCaddyfileAdaptedJSONIsTheConfig(t *testing.T) {
	d := caddyfile.NewTestDispenser(`mcp_oauth {
		mode progressive
		issuer https://cloud.example.com
		public_issuer https://public.example.com
		client_id broker
		client_secret s3cret
		resource https://mcp.example.com/mcp
		audience a b
		scopes openid notes:read
		encryption_key k1 k2
		client c1 {
			name "Client One"
			redirect_uri http://127.0.0.1/cb
			redirect_uri https://app.example.com/cb
			scopes notes:read
		}
		registration off
		delegation none {
			subject_header X-User
		}
		tool_scope "notes_*" notes:write
		code_ttl 30s
		max_body_bytes 1024
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	raw, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"mode":"progressive","issuer":"https://cloud.example.com","public_issuer":"https://public.example.com",` +
		`"client_id":"broker","client_secret":"s3cret","resource":"https://mcp.example.com/mcp","audience":["a","b"],` +
		`"scopes":["openid","notes:read"],"encryption_keys":["k1","k2"],"clients":[{"client_id":"c1","name":"Client One",` +
		`"redirect_uris":["http://127.0.0.1/cb","https://app.example.com/cb"],"scopes":["notes:read"]}],` +
		`"disable_registration":true,"delegation":{"mode":"none","subject_header":"X-User"},` +
		`"tool_scopes":[{"tool":"notes_*","scopes":["notes:write"]}],"code_ttl":30000000000,"max_body_bytes":1024}`
	if string(raw) != want {
		t.Errorf("got  %s\nwant %s", raw, want)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var back Handler
	if err := dec.Decode(&back); err != nil {
		t.Errorf("round trip: %v", err)
	}
}

func TestCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct {
		name, input, want string
	}{
		{"argument on the directive line is refused", `mcp_oauth extra`, "wrong argument count"},
		{"unknown subdirective is named", `mcp_oauth {
			colour blue
		}`, `unrecognized subdirective "colour"`},
		{"issuer takes one value", `mcp_oauth {
			issuer a b
		}`, "wrong argument count"},
		{"registration is on or off", `mcp_oauth {
			registration maybe
		}`, `registration: want on or off, got "maybe"`},
		{"tool_scope needs a scope", `mcp_oauth {
			tool_scope notes_write
		}`, "tool_scope: want a tool name or glob and at least one scope"},
		{"bad duration names the field", `mcp_oauth {
			code_ttl soon
		}`, "code_ttl:"},
		{"client takes one id", `mcp_oauth {
			client a b {
			}
		}`, "client: want exactly one client id"},
		{"unknown client subdirective", `mcp_oauth {
			client a {
				logo x.png
			}
		}`, `client: unrecognized subdirective "logo"`},
		{"unknown delegation subdirective", `mcp_oauth {
			delegation token_exchange {
				actor me
			}
		}`, `delegation: unrecognized subdirective "actor"`},
		{"narrow takes one value", `mcp_oauth {
			delegation {
				narrow tool_calls none
			}
		}`, "wrong argument count"},
		{"narrow given twice", `mcp_oauth {
			delegation {
				narrow none
				narrow tool_calls
			}
		}`, "narrow: already specified"},
		{"upstream_metadata takes one URL", `mcp_oauth {
			upstream_metadata http://a/ http://b/
		}`, "wrong argument count"},
		{"unknown storage module", `mcp_oauth {
			storage nowhere
		}`, "caddy.storage.nowhere"},
		{"max_body_bytes is a number", `mcp_oauth {
			max_body_bytes lots
		}`, `max_body_bytes: want a whole number, got "lots"`},
		{"registration_rate is a number", `mcp_oauth {
			registration_rate fast
		}`, `registration_rate: want a whole number, got "fast"`},
		{"registration_rate_total is a number", `mcp_oauth {
			registration_rate_total lots
		}`, `registration_rate_total: want a whole number, got "lots"`},
		{"cold_verify_rate is a number", `mcp_oauth {
			cold_verify_rate 60 lots
		}`, `cold_verify_rate: want a whole number, got "lots"`},
		{"cold_verify_rate takes at most two numbers", `mcp_oauth {
			cold_verify_rate 1 2 3
		}`, "wrong argument count"},
		{"background_token_rate is a number", `mcp_oauth {
			background_token_rate often
		}`, `background_token_rate: want a whole number, got "often"`},
		{"background_client needs a secret", `mcp_oauth {
			background_client worker
		}`, "background_client: want an id and a secret"},
		{"unknown provisioning subdirective", `mcp_oauth {
			provisioning {
				forever yes
			}
		}`, `provisioning: unrecognized subdirective "forever"`},
		{"a repeated issuer is refused, not replaced", `mcp_oauth {
			issuer https://a.example.com
			issuer https://b.example.com
		}`, "issuer: already specified"},
		{"a second encryption_key line is refused: older keys go on the same line", `mcp_oauth {
			encryption_key k1
			encryption_key k2
		}`, "encryption_key: already specified"},
		{"a repeated duration is refused", `mcp_oauth {
			code_ttl 30s
			code_ttl 60s
		}`, "code_ttl: already specified"},
		{"a repeated number is refused", `mcp_oauth {
			max_body_bytes 1024
			max_body_bytes 2048
		}`, "max_body_bytes: already specified"},
		{"a repeated flag is refused", `mcp_oauth {
			client_metadata_allow_private
			client_metadata_allow_private
		}`, "client_metadata_allow_private: already specified"},
		{"a second delegation block is refused", `mcp_oauth {
			delegation none
			delegation refresh
		}`, "delegation: already specified"},
		{"a repeated client name is refused", `mcp_oauth {
			client a {
				name One
				name Two
			}
		}`, "name: already specified"},
		{"a repeated delegation audience is refused", `mcp_oauth {
			delegation token_exchange {
				audience a
				audience b
			}
		}`, "audience: already specified"},
		{"repeated offline access tools are refused", `mcp_oauth {
			provisioning {
				tools a
				tools b
			}
		}`, "tools: already specified"},
		{"unknown offline_access subdirective", `mcp_oauth {
			offline_access {
				forever yes
			}
		}`, `offline_access: unrecognized subdirective "forever"`},
		{"an unknown enterprise_managed subdirective is refused", `mcp_oauth {
			enterprise_managed {
				trust https://idp.example
			}
		}`, `enterprise_managed: unrecognized subdirective "trust"`},
		{"an unknown issuer subdirective is refused", `mcp_oauth {
			enterprise_managed {
				issuer https://idp.example {
					keys https://idp.example/jwks
				}
			}
		}`, `enterprise_managed: issuer: unrecognized subdirective "keys"`},
		{"an issuer without its URL is refused", `mcp_oauth {
			enterprise_managed {
				issuer {
					jwks_uri https://idp.example/jwks
				}
			}
		}`, "issuer: want exactly one issuer URL"},
		{"a repeated issuer subdirective is refused", `mcp_oauth {
			enterprise_managed {
				issuer https://idp.example {
					jwks_uri https://idp.example/jwks
					jwks_uri https://idp.example/other
				}
			}
		}`, "jwks_uri: already specified"},
		{"a second enterprise_managed block is refused", `mcp_oauth {
			enterprise_managed {
			}
			enterprise_managed {
			}
		}`, "enterprise_managed: already specified"},
		{"a second offline_access block is refused", `mcp_oauth {
			offline_access {
				tools a
			}
			offline_access {
				tools b
			}
		}`, "offline_access: already specified"},
		{"offline_access and its old name provisioning are refused together", `mcp_oauth {
			offline_access {
				tools a
			}
			provisioning {
				tools b
			}
		}`, "provisioning: offline_access already specified"},
		{"provisioning and then offline_access are refused together", `mcp_oauth {
			provisioning {
				tools a
			}
			offline_access {
				tools b
			}
		}`, "offline_access: offline_access already specified"},
		{"callback_path takes one path", `mcp_oauth {
			offline_access {
				callback_path
			}
		}`, "wrong argument count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestCaddyfileProvisioningIsTheOldNameOfOfflineAccess: a Caddyfile of earlier releases
// with a provisioning block adapts to the same JSON as offline_access, with a warning that
// names the new spelling; the new spelling adapts without one.
func TestCaddyfileProvisioningIsTheOldNameOfOfflineAccess(t *testing.T) {
	adapt := func(t *testing.T, file string) (json.RawMessage, []observer.LoggedEntry) {
		t.Helper()
		in, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		_, orig, buffered := caddy.BufferedLog()
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(in, map[string]any{"filename": file})
		core, logs := observer.New(zap.WarnLevel)
		buffered.FlushTo(zap.New(core))
		caddy.UnbufferDefaultLogger(orig)
		if err != nil {
			t.Fatalf("adapting %s: %v", file, err)
		}
		return out, logs.FilterMessageSnippet("offline_access").All()
	}
	newJSON, warnings := adapt(t, "testdata/adapt/offline_access.caddyfile")
	if len(warnings) != 0 {
		t.Errorf("offline_access warns: %v", warnings)
	}
	oldJSON, warnings := adapt(t, "testdata/adapt/offline_access_old_name.caddyfile")
	if !bytes.Equal(oldJSON, newJSON) {
		t.Errorf("provisioning adapts to\n%s\nwant the JSON of offline_access\n%s", oldJSON, newJSON)
	}
	if len(warnings) != 1 || warnings[0].Message != "mcp_oauth: provisioning is deprecated; rename it to offline_access" {
		t.Errorf("warnings %v, want one naming offline_access", warnings)
	}
}

func TestCaddyfileRepeatableSubdirectivesAccumulate(t *testing.T) {
	d := caddyfile.NewTestDispenser(`mcp_oauth {
		client a {
			redirect_uri https://a.example.com/cb
			redirect_uri https://a.example.com/cb2
		}
		client b {
			redirect_uri https://b.example.com/cb
		}
		tool_scope "notes_*" notes:write
		tool_scope "files_*" files:write
		background_client w1 s1
		background_client w2 s2
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if len(h.Clients) != 2 || len(h.Clients[0].RedirectURIs) != 2 || len(h.ToolScopes) != 2 || len(h.BackgroundClients) != 2 {
		t.Errorf("clients %d (redirect URIs of the first %d), tool scopes %d, background clients %d; want 2 each",
			len(h.Clients), len(h.Clients[0].RedirectURIs), len(h.ToolScopes), len(h.BackgroundClients))
	}
}
