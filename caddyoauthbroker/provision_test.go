package caddyoauthbroker

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// provisionContext is a Caddy context whose storage is a fresh folder, as Caddy builds it
// from a configuration.
func provisionContext(t testing.TB) (caddy.Context, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "mcp_oauth-provision-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	raw, _ := json.Marshal(map[string]any{"module": "file_system", "root": dir})
	pctx, err := caddy.ProvisionContext(&caddy.Config{StorageRaw: raw})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(pctx)
	t.Cleanup(cancel)
	return ctx, dir
}

// load provisions and validates the handler JSON as Caddy does.
func load(t testing.TB, ctx caddy.Context, cfg map[string]any) (*Handler, error) {
	t.Helper()
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mod, err := ctx.LoadModuleByID("http.handlers.mcp_oauth", raw)
	if err != nil {
		return nil, err
	}
	h := mod.(*Handler)
	t.Cleanup(func() { h.Cleanup() })
	return h, nil
}

func progressiveConfig() map[string]any {
	return map[string]any{
		// Nothing listens on port 9: Provision must not need the IdP.
		"issuer":          "http://127.0.0.1:9",
		"mode":            "progressive",
		"client_id":       "mcp-broker",
		"resource":        "https://mcp.example.com/mcp",
		"encryption_keys": []string{testKey},
		"delegation":      map[string]any{"mode": "none"},
	}
}

func TestProvisionNeitherWritesStorageNorWaitsForTheIdP(t *testing.T) {
	ctx, dir := provisionContext(t)
	if _, err := load(t, ctx, progressiveConfig()); err != nil {
		t.Fatalf("provisioning with an unreachable IdP: %v", err)
	}
	var files []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			files = append(files, p)
		}
		return nil
	})
	if len(files) != 0 {
		t.Errorf("Provision wrote to storage: %v", files)
	}
}

func TestProvisionResolvesPlaceholders(t *testing.T) {
	keyFile := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(keyFile, []byte(testKey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("MCP_TEST_SECRET", "s3cret")
	t.Setenv("MCP_TEST_ISSUER", "https://cloud.example.com")
	cfg := progressiveConfig()
	cfg["client_secret"] = "{env.MCP_TEST_SECRET}"
	cfg["issuer"] = "{env.MCP_TEST_ISSUER}"
	cfg["encryption_keys"] = []string{"{file." + keyFile + "}"}

	ctx, _ := provisionContext(t)
	h, err := load(t, ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if h.ClientSecret != "s3cret" || h.Issuer != "https://cloud.example.com" || h.EncryptionKeys[0] != testKey {
		t.Errorf("placeholders left: secret %q issuer %q key %q", h.ClientSecret, h.Issuer, h.EncryptionKeys[0])
	}

	t.Setenv("MCP_TEST_KEY", "YWFhYQ==")
	cfg["encryption_keys"] = []string{"{env.MCP_TEST_KEY}"}
	if _, err := load(t, ctx, cfg); err == nil || !strings.Contains(err.Error(), "encryption_keys[0]: want 32 bytes") {
		t.Errorf("short key from the environment: %v", err)
	}
	if _, err := load(t, ctx, cfg); err != nil && strings.Contains(err.Error(), "YWFhYQ") {
		t.Errorf("the error repeats the key: %v", err)
	}
}

func TestProvisionRefusesWhatCannotWork(t *testing.T) {
	ctx, _ := provisionContext(t)
	for _, tc := range []struct {
		name   string
		change func(map[string]any)
		want   string
	}{
		{"no key", func(c map[string]any) { delete(c, "encryption_keys") }, "encryption_keys: required"},
		{"short key", func(c map[string]any) { c["encryption_keys"] = []string{"YWFhYQ=="} }, "encryption_keys[0]: want 32 bytes of base64, got 4"},
		{"short older key", func(c map[string]any) { c["encryption_keys"] = []string{testKey, "YWFhYQ=="} }, "encryption_keys[1]: want 32 bytes of base64, got 4"},
		{"key not base64", func(c map[string]any) { c["encryption_keys"] = []string{"not base64!"} }, "encryption_keys[0]: want 32 bytes of base64, got invalid base64"},
		{"missing issuer, found by Validate", func(c map[string]any) { delete(c, "issuer") }, "issuer: required"},
		{"a null client", func(c map[string]any) { c["clients"] = []any{nil} }, "clients[0]: client_id required"},
		{"a null background client", func(c map[string]any) { c["background_clients"] = []any{nil} }, "background_clients[0]: want an id and a secret"},
		{"a null tool scope", func(c map[string]any) { c["tool_scopes"] = []any{nil} }, "tool_scopes[0]: want a tool name"},
		{"unknown mode, found by Provision", func(c map[string]any) { c["mode"] = "magic" }, `mode: unknown mode "magic"; want hybrid or progressive`},
		{"unknown delegation, found by Provision", func(c map[string]any) { c["delegation"] = map[string]any{"mode": "passthrough"} },
			`delegation: unknown mode "passthrough"; want token_exchange, refresh, app_password or none`},
		{"an offline access callback the broker does not serve", func(c map[string]any) { c["offline_access"] = map[string]any{"callback_path": "/elsewhere"} },
			`offline_access: callback_path: want /oauth/offline-access/callback or /oauth/callback-nextcloud, got "/elsewhere"`},
		{"refresh delegation in progressive mode", func(c map[string]any) { c["delegation"] = map[string]any{"mode": "refresh"} },
			"delegation refresh: needs mode hybrid"},
		{"enterprise_managed without an issuer", func(c map[string]any) { c["enterprise_managed"] = map[string]any{} },
			"enterprise_managed: want at least one issuer"},
		{"an enterprise issuer without its keys", func(c map[string]any) {
			c["mode"] = "hybrid"
			c["delegation"] = map[string]any{"mode": "none"}
			c["enterprise_managed"] = map[string]any{"issuers": []any{map[string]any{"issuer": "https://idp.acme.example", "subject_prefix": "acme:"}}}
		}, `jwks_uri "": want an absolute http(s) URL`},
		{"enterprise_managed with the default delegation, which needs an IdP grant", func(c map[string]any) {
			c["mode"] = "hybrid"
			delete(c, "delegation")
			c["enterprise_managed"] = map[string]any{"issuers": []any{map[string]any{
				"issuer": "https://idp.acme.example", "jwks_uri": "https://idp.acme.example/jwks", "subject_prefix": "acme:"}}}
		}, "use delegation none or app_password"},
		{"an enterprise issuer with HS256", func(c map[string]any) {
			c["mode"] = "hybrid"
			c["delegation"] = map[string]any{"mode": "none"}
			c["enterprise_managed"] = map[string]any{"issuers": []any{map[string]any{
				"issuer": "https://idp.acme.example", "jwks_uri": "https://idp.acme.example/jwks", "subject_prefix": "acme:", "algorithms": []string{"HS256"}}}}
		}, `algorithm "HS256"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := progressiveConfig()
			tc.change(cfg)
			if _, err := load(t, ctx, cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want %q", err, tc.want)
			}
		})
	}
}

func TestCleanupAfterAFailedProvision(t *testing.T) {
	var h Handler
	if err := h.Cleanup(); err != nil {
		t.Fatal(err)
	}
}

func TestJanitorStartsAfterProvisionWithoutARequest(t *testing.T) {
	defer func(d time.Duration) { janitorDelay = d }(janitorDelay)
	janitorDelay = 0
	ctx, dir := provisionContext(t)
	h, err := load(t, ctx, progressiveConfig())
	if err != nil {
		t.Fatal(err)
	}
	// The janitor's first sweep leaves its marker record; no request was served.
	marker := filepath.Join(dir, "mcp_oauth", "janitor", "last_run")
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := os.Stat(marker); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no janitor marker at %s", marker)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.janitorDone:
	default:
		t.Error("Cleanup returned before the janitor stopped")
	}
}

// TestProvisionReadsTheOldNameOfOfflineAccess: JSON written for earlier releases names
// offline_access `provisioning`; it still loads, with a warning that names the new
// spelling, and giving both is refused.
func TestProvisionReadsTheOldNameOfOfflineAccess(t *testing.T) {
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	raw, _ := json.Marshal(map[string]any{
		"storage": map[string]any{"module": "file_system", "root": t.TempDir()},
		"logging": map[string]any{"logs": map[string]any{"mcp": map[string]any{
			"writer":  map[string]any{"output": "file", "filename": logFile},
			"encoder": map[string]any{"format": "json"},
			"include": []string{"http.handlers.mcp_oauth"},
		}}},
	})
	var cfg caddy.Config
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	pctx, err := caddy.ProvisionContext(&cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(pctx)
	t.Cleanup(cancel)
	offline := map[string]any{"scopes": []string{"notes:read"}, "tools": []string{"background_*"}}

	old := progressiveConfig()
	old["provisioning"] = offline
	h, err := load(t, ctx, old)
	if err != nil {
		t.Fatalf("provisioning: %v", err)
	}
	if h.Provisioning != nil || h.OfflineAccess == nil || h.OfflineAccess.Tools[0] != "background_*" || h.OfflineAccess.Scopes[0] != "notes:read" {
		t.Errorf("provisioning was not read as offline_access: %+v, %+v", h.OfflineAccess, h.Provisioning)
	}
	logs, _ := os.ReadFile(logFile)
	if !strings.Contains(string(logs), `"provisioning is deprecated; rename it to offline_access"`) || !strings.Contains(string(logs), `"level":"warn"`) {
		t.Errorf("no deprecation warning in the log:\n%s", logs)
	}

	both := progressiveConfig()
	both["provisioning"], both["offline_access"] = offline, offline
	if _, err := load(t, ctx, both); err == nil || !strings.Contains(err.Error(), "keep only offline_access") {
		t.Errorf("provisioning and offline_access both: %v, want an error", err)
	}
}

// TestUpstreamMetadataReadAfterProvision: Provision reads nothing from upstream_metadata
// (it also runs for `caddy validate`, which stops at once); once the site runs, the
// upstream's scopes_supported join the broker's metadata without a request.
func TestUpstreamMetadataReadAfterProvision(t *testing.T) {
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader(), testenv.ProtectedResourceMetadata("notes.read"))
	cfg := progressiveConfig()
	cfg["upstream_metadata"] = up.MetadataURL
	cfg["scopes"] = []string{"openid"}

	ctx, _ := provisionContext(t)
	h, err := load(t, ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Cleanup(); err != nil { // as `caddy validate` ends
		t.Fatal(err)
	}
	if n := len(up.Seen()); n != 0 {
		t.Fatalf("%d requests to the upstream from Provision and a Cleanup before start", n)
	}

	ctx, _ = provisionContext(t)
	if h, err = load(t, ctx, cfg); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		var prm struct {
			ScopesSupported []string `json:"scopes_supported"`
		}
		w := serve(t, h, httptest.NewRequest(http.MethodGet, "https://mcp.example.com/.well-known/oauth-protected-resource/mcp", nil))
		if err := json.Unmarshal(w.Body.Bytes(), &prm); err != nil {
			t.Fatal(err)
		}
		if slices.Equal(prm.ScopesSupported, []string{"openid", "notes.read"}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("scopes_supported %v: the upstream's scopes never joined", prm.ScopesSupported)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.learnerDone:
	default:
		t.Error("Cleanup returned before the learner stopped")
	}
}

// TestProvisionClientSecret: a configured client's secret comes from a placeholder, and
// one that resolves to nothing or too little is refused without being repeated; an unset
// variable must not quietly leave a public client.
func TestProvisionClientSecret(t *testing.T) {
	ctx, _ := provisionContext(t)
	withClient := func(secret, method string) map[string]any {
		cfg := progressiveConfig()
		cfg["mode"] = "hybrid" // the broker authenticates clients in hybrid mode alone
		c := map[string]any{"client_id": "agent", "redirect_uris": []string{"https://agent.example.com/cb"}, "secret": secret}
		if method != "" {
			c["token_endpoint_auth_method"] = method
		}
		cfg["clients"] = []any{c}
		return cfg
	}
	good := strings.Repeat("0123456789abcdef", 4)
	t.Setenv("MCP_TEST_AGENT_SECRET", good)
	h, err := load(t, ctx, withClient("{env.MCP_TEST_AGENT_SECRET}", ""))
	if err != nil {
		t.Fatalf("a 64-byte secret from the environment: %v", err)
	}
	if h.Clients[0].Secret != good {
		t.Errorf("the placeholder was not resolved")
	}

	progressive := withClient(good, "")
	progressive["mode"] = "progressive"
	if _, err := load(t, ctx, progressive); err == nil || !strings.Contains(err.Error(), `clients "agent": secret and token_endpoint_auth_method: hybrid mode only`) {
		t.Errorf("a secret in progressive mode: %v", err)
	}

	t.Setenv("MCP_TEST_SHORT_SECRET", "hunter2hunter2")
	for _, tc := range []struct {
		name, secret, method, want string
	}{
		{"short, from the environment", "{env.MCP_TEST_SHORT_SECRET}", "", `clients "agent": secret: want at least 32 bytes, got 14`},
		{"unset variable", "{env.MCP_TEST_UNSET_AGENT_SECRET}", "", `clients "agent": secret: empty once its placeholders are resolved`},
		{"unset variable, public method", "{env.MCP_TEST_UNSET_AGENT_SECRET}", "none", `clients "agent": secret: empty once its placeholders are resolved`},
		{"a secret on a public client", good, "none", `clients "agent": secret: set on a public client`},
		{"basic without a secret", "", "client_secret_basic", `clients "agent": token_endpoint_auth_method: client_secret_basic needs a secret`},
		{"an unknown method", good, "private_key_jwt", `clients "agent": token_endpoint_auth_method: want client_secret_basic or client_secret_post, got "private_key_jwt"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := load(t, ctx, withClient(tc.secret, tc.method))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), good) {
				t.Errorf("the error repeats the secret: %v", err)
			}
		})
	}
}
