package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// testKeyNew is the key the ring is rotated to in TestAdminAPIGrantsThroughCaddyBinary.
const testKeyNew = "YmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmI="

// adminCall sends method to caddy's admin API at path (with its query) and returns the
// status and body.
func adminCall(t *testing.T, admin, method, path string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, admin+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// adminUser is the answer of GET /mcp_oauth/sessions.
type adminUser struct {
	Sessions []struct {
		ID       string   `json:"id"`
		ClientID string   `json:"client_id"`
		Scopes   []string `json:"scopes"`
	} `json:"sessions"`
	OfflineAccess struct {
		Granted           bool     `json:"provisioned"`
		BackgroundClients []string `json:"background_clients"`
	} `json:"offline_access"`
}

// TestAdminAPIGrantsThroughCaddyBinary: the admin API of a running caddy lists a user's
// sessions and offline access grant, ends one session and then all (their broker tokens
// refused at the MCP endpoint at once), revokes offline access (background tokens
// refused), lists and deletes a registered client, and counts what each key of the ring
// still seals after a rotation. No answer holds a token.
func TestAdminAPIGrantsThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "nextcloud"))
	adminPort := freePort(t)
	caddy := startCaddy(t, hybridSite(o, up.URL, offlineSiteBlock), withAdmin(adminPort))
	admin := fmt.Sprintf("http://127.0.0.1:%d", adminPort)
	subject := url.QueryEscape(o.User.Subject)
	secrets := []string{testenv.BrokerClientSecret, testKey, testKeyNew}

	// A first login, under the first key.
	_, first := connectPreregistered(t, caddy.Base, newBrowser(o))
	secrets = append(secrets, first.AccessToken, first.RefreshToken)

	// The key ring rotated: the new key first, the old one still there to open.
	raw, err := os.ReadFile(caddy.caddyfile)
	if err != nil {
		t.Fatal(err)
	}
	rotated := strings.Replace(string(raw), "encryption_key "+testKey, "encryption_key "+testKeyNew+" "+testKey, 1)
	if rotated == string(raw) {
		t.Fatal("no encryption_key line to rotate")
	}
	if err := os.WriteFile(caddy.caddyfile, []byte(rotated), 0o600); err != nil {
		t.Fatal(err)
	}
	caddy.restart()
	_, second := connectPreregistered(t, caddy.Base, newBrowser(o))
	secrets = append(secrets, second.AccessToken, second.RefreshToken)

	status, body := adminCall(t, admin, http.MethodGet, "/mcp_oauth/keys")
	var keys struct {
		Keys []struct {
			ID      string `json:"id"`
			Sealing bool   `json:"sealing"`
			Sealed  int    `json:"sealed"`
		} `json:"keys"`
	}
	if err := json.Unmarshal([]byte(body), &keys); status != http.StatusOK || err != nil {
		t.Fatalf("GET keys: %d %s", status, body)
	}
	if len(keys.Keys) != 2 || !keys.Keys[0].Sealing || keys.Keys[0].Sealed != 1 || keys.Keys[1].Sealing || keys.Keys[1].Sealed != 1 {
		t.Errorf("keys after a rotation: %s, want the new key sealing one session and the old key the other", body)
	}

	// Offline access, granted with the second session's token.
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, caddy.Base+"/oauth/offline-access", nil)
	req.Header.Set("Authorization", "Bearer "+second.AccessToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var link struct {
		AuthorizationURL string `json:"authorization_url"`
	}
	err = json.NewDecoder(resp.Body).Decode(&link)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("offline access link: %s %v", resp.Status, err)
	}
	jar, _ := cookiejar.New(nil)
	browserClient := &http.Client{Jar: jar}
	cb, err := o.Login(t.Context(), link.AuthorizationURL, testenv.LoginWithClient(browserClient))
	if err != nil {
		t.Fatal(err)
	}
	if resp, err = browserClient.Get(cb.String()); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("offline access callback: %v %v", resp, err)
	}
	resp.Body.Close()
	if resp, body := backgroundToken(t, caddy.Base, "worker", "worker-secret", o.User.Subject); resp.StatusCode != http.StatusOK {
		t.Fatalf("background token: %s %v", resp.Status, body["error"])
	} else if tok, _ := body["access_token"].(string); tok != "" {
		secrets = append(secrets, tok)
	}

	// The user's sessions and grant.
	status, body = adminCall(t, admin, http.MethodGet, "/mcp_oauth/sessions?subject="+subject)
	var user adminUser
	if err := json.Unmarshal([]byte(body), &user); status != http.StatusOK || err != nil {
		t.Fatalf("GET sessions: %d %s", status, body)
	}
	if len(user.Sessions) != 2 || user.Sessions[0].ClientID != "preregistered" || !user.OfflineAccess.Granted ||
		!slices.Equal(user.OfflineAccess.BackgroundClients, []string{"worker"}) {
		t.Fatalf("GET sessions: %s, want two sessions of the preregistered client and the offline access grant", body)
	}
	// With the site named as the health route names it, the answer is the same.
	if status, named := adminCall(t, admin, http.MethodGet, "/mcp_oauth/sessions?site="+url.QueryEscape(caddy.Base+"/mcp")+"&subject="+subject); status != http.StatusOK || !strings.Contains(named, user.Sessions[0].ID) {
		t.Errorf("GET sessions of the named site: %d %s", status, named)
	}
	if status, _ := adminCall(t, admin, http.MethodGet, "/mcp_oauth/sessions?site=http://elsewhere/mcp&subject="+subject); status != http.StatusNotFound {
		t.Errorf("GET sessions of an unknown site: %d, want 404", status)
	}
	if status, _ := adminCall(t, admin, http.MethodGet, "/mcp_oauth/sessions"); status != http.StatusBadRequest {
		t.Errorf("GET sessions without a subject: %d, want 400", status)
	}

	// Ending the first session (sessions are listed oldest first): its token is refused,
	// the second's still passes.
	endedFirst := user.Sessions[0].ID
	if status, body := adminCall(t, admin, http.MethodDelete, "/mcp_oauth/sessions?subject="+subject+"&session="+endedFirst); status != http.StatusOK || !strings.Contains(body, `"ended":1`) {
		t.Fatalf("DELETE session %s: %d %s", endedFirst, status, body)
	}
	if st := bearerGet(t, caddy.Base+"/mcp", first.AccessToken).StatusCode; st != http.StatusUnauthorized {
		t.Errorf("the first session's token after ending it: %d, want 401", st)
	}
	if st := bearerGet(t, caddy.Base+"/mcp", second.AccessToken).StatusCode; st == http.StatusUnauthorized {
		t.Errorf("the second session's token after ending the first: %d", st)
	}
	if status, _ := adminCall(t, admin, http.MethodDelete, "/mcp_oauth/sessions?subject="+subject+"&session="+endedFirst); status != http.StatusNotFound {
		t.Errorf("ending an ended session: %d, want 404", status)
	}

	// Revoking offline access: background tokens refused.
	status, body = adminCall(t, admin, http.MethodDelete, "/mcp_oauth/offline-access?subject="+subject)
	if status != http.StatusOK || !strings.Contains(body, `"provisioned":false`) || !strings.Contains(body, `"revoked_at_idp":true`) {
		t.Errorf("DELETE offline-access: %d %s", status, body)
	}
	if resp, _ := backgroundToken(t, caddy.Base, "worker", "worker-secret", o.User.Subject); resp.StatusCode == http.StatusOK {
		t.Error("a background token after the offline access grant was revoked")
	}

	// Ending all of the user's sessions.
	if status, body := adminCall(t, admin, http.MethodDelete, "/mcp_oauth/sessions?subject="+subject); status != http.StatusOK || !strings.Contains(body, `"ended":1`) {
		t.Errorf("DELETE all sessions: %d %s", status, body)
	}
	if st := bearerGet(t, caddy.Base+"/mcp", second.AccessToken).StatusCode; st != http.StatusUnauthorized {
		t.Errorf("the second session's token after ending all: %d, want 401", st)
	}

	// Registered clients.
	clientID := dcrRegister(t, caddy.Base)
	status, body = adminCall(t, admin, http.MethodGet, "/mcp_oauth/clients")
	if status != http.StatusOK || !strings.Contains(body, `"client_id":"`+clientID+`"`) || !strings.Contains(body, `"redirect_uris":["http://127.0.0.1/cb"]`) {
		t.Errorf("GET clients: %d %s", status, body)
	}
	if status, body := adminCall(t, admin, http.MethodDelete, "/mcp_oauth/clients?client_id="+url.QueryEscape(clientID)); status != http.StatusNoContent {
		t.Errorf("DELETE client: %d %s", status, body)
	}
	if status, body := adminCall(t, admin, http.MethodGet, "/mcp_oauth/clients"); status != http.StatusOK || strings.Contains(body, clientID) {
		t.Errorf("GET clients after deleting it: %d %s", status, body)
	}
	if status, _ := adminCall(t, admin, http.MethodDelete, "/mcp_oauth/clients?client_id="+url.QueryEscape(clientID)); status != http.StatusNotFound {
		t.Errorf("deleting it again: %d, want 404", status)
	}
	if status, _ := adminCall(t, admin, http.MethodPost, "/mcp_oauth/keys"); status != http.StatusMethodNotAllowed {
		t.Errorf("POST keys: %d, want 405", status)
	}

	caddy.assertLogsFree(secrets...)
}
