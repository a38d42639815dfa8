package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestAdminAPIConfig: the handler's JSON configuration loads through Caddy's admin API, and
// a bad one is refused at load with a message naming the field, leaving the running
// configuration in place.
func TestAdminAPIConfig(t *testing.T) {
	o := testenv.StartOP(t)
	adminPort := freePort(t)
	caddy := startCaddy(t, `http://127.0.0.1:{port} {
	respond "not configured yet"
}`, withAdmin(adminPort))
	admin := fmt.Sprintf("http://127.0.0.1:%d", adminPort)

	handler := map[string]any{
		"handler":         "mcp_oauth",
		"mode":            "hybrid",
		"issuer":          o.Issuer,
		"client_id":       testenv.BrokerClientID,
		"client_secret":   testenv.BrokerClientSecret,
		"resource":        caddy.Base + "/mcp",
		"encryption_keys": []string{testKey},
		"delegation":      map[string]any{"mode": "none"},
	}
	config := func(h map[string]any) string {
		cfg := map[string]any{
			"admin":   map[string]any{"listen": fmt.Sprintf("127.0.0.1:%d", adminPort)},
			"storage": map[string]any{"module": "file_system", "root": caddy.storage},
			"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"mcp": map[string]any{
				"listen":          []string{fmt.Sprintf("127.0.0.1:%d", caddy.Port)},
				"automatic_https": map[string]any{"disable": true},
				"routes":          []any{map[string]any{"handle": []any{h, map[string]any{"handler": "static_response", "body": "upstream"}}}},
			}}}},
		}
		raw, _ := json.Marshal(cfg)
		return string(raw)
	}
	load := func(body string) (int, string) {
		resp, err := http.Post(admin+"/load", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		msg, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(msg)
	}

	if status, msg := load(config(handler)); status != http.StatusOK {
		t.Fatalf("loading a good config: %d %s", status, msg)
	}
	var meta struct {
		Issuer string `json:"issuer"`
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(caddy.Base + "/.well-known/oauth-authorization-server")
		if err == nil && resp.StatusCode == http.StatusOK {
			json.NewDecoder(resp.Body).Decode(&meta)
			resp.Body.Close()
			break
		}
		if err == nil {
			resp.Body.Close()
		}
		time.Sleep(50 * time.Millisecond)
	}
	if meta.Issuer != caddy.Base {
		t.Fatalf("AS metadata issuer %q after load, want %q", meta.Issuer, caddy.Base)
	}

	bad := map[string]any{}
	for k, v := range handler {
		bad[k] = v
	}
	bad["encryption_keys"] = []string{"c2hvcnQ="}
	status, msg := load(config(bad))
	if status != http.StatusBadRequest || !strings.Contains(msg, "encryption_keys[0]: want 32 bytes") {
		t.Errorf("a short key: %d %s", status, msg)
	}
	if strings.Contains(msg, "c2hvcnQ=") {
		t.Errorf("the error repeats the key: %s", msg)
	}
	delete(bad, "issuer")
	bad["encryption_keys"] = []string{testKey}
	if status, msg := load(config(bad)); status != http.StatusBadRequest || !strings.Contains(msg, "issuer: required") {
		t.Errorf("no issuer: %d %s", status, msg)
	}
	// The good configuration still serves.
	resp, err := http.Get(caddy.Base + "/.well-known/oauth-protected-resource/mcp")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("after refused loads: %v %v", resp, err)
	}
	resp.Body.Close()
}
