package e2e

import (
	"bytes"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestKeyRingRotationAcrossNodes holds the README's procedure for rotating the key ring of
// a cluster, on two caddy processes A and B sharing a folder, each step a config reload
// through the admin API, one node after the other: add the new key after the old one on
// every node, then put it first on every node. At every point of the roll, each node
// reads what the other sealed under its ring: a login whose callback (the session and its
// sealed IdP grant) and code redemption (the broker tokens) are on different nodes, MCP
// calls (the session's grant opened and resealed by delegation) and refreshes on either
// node, for users who logged in at any earlier step, and the offline access grant (kept
// under a keyed hash of the subject) read by a background token on either node. A
// control shows why the first step is there: a node holding only the old key cannot
// open what a node sealing with the new key sealed.
func TestKeyRingRotationAcrossNodes(t *testing.T) {
	o := testenv.StartOP(t, testenv.WithoutTokenExchangeAdvertised())
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI))
	shared, err := os.MkdirTemp("", "mcp_oauth-shared-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shared) })
	portA := freePort(t)
	site := clusterSite(o, up.URL, portA, testKey, `offline_access {
			scopes notes:read
		}
		background_client worker worker-secret`)
	c := &cluster{o: o, up: up}
	a := startCaddy(t, site, withStorage(shared), withPort(portA), withAdmin(freePort(t)))
	b := startCaddy(t, site, withStorage(shared), withAdmin(freePort(t)))
	c.nodes = []*caddyProc{a, b}
	t.Cleanup(func() {
		for _, n := range c.nodes {
			n.assertLogsFree(append(c.secrets, "worker-secret", testenv.BrokerClientSecret, testKey, testKeyNew)...)
		}
	})
	const old, both, swapped = testKey, testKey + " " + testKeyNew, testKeyNew + " " + testKey
	client := &clusterClient{id: dcrRegister(t, a.Base)}

	// users are the refresh tokens of everyone who logged in so far, each used at every step.
	var users []string
	// crossed logs a user in across the two nodes, as above, and uses the token on both.
	crossed := func(t *testing.T, first, second *caddyProc) string {
		t.Helper()
		code := c.login(t, client, first, second)
		status, tok := c.redeem(t, first, client, code)
		if status != http.StatusOK {
			t.Fatalf("code of a callback on %s redeemed on %s: %d %s", second.Base, first.Base, status, tok.Error)
		}
		for _, n := range []*caddyProc{first, second} {
			if status := mcpStatus(t, n, tok.AccessToken); status != http.StatusOK {
				t.Errorf("MCP on %s, the login authorized on %s and called back on %s: %d", n.Base, first.Base, second.Base, status)
			}
		}
		users = append(users, tok.RefreshToken)
		return tok.AccessToken
	}
	everyone := func(t *testing.T) {
		t.Helper()
		for i, refresh := range users {
			for j, n := range c.nodes {
				status, tok := c.refreshAt(t, n, client, refresh)
				if status != http.StatusOK {
					t.Fatalf("user %d: refresh on %s: %d %s", i, n.Base, status, tok.Error)
				}
				other := c.nodes[(j+1)%len(c.nodes)]
				if status, again := c.refreshAt(t, other, client, refresh); status != http.StatusOK || again.RefreshToken != tok.RefreshToken {
					t.Fatalf("user %d: a refresh on %s replayed on %s within the grace window: %d %s, same pair %v",
						i, n.Base, other.Base, status, again.Error, again.RefreshToken == tok.RefreshToken)
				}
				if status := mcpStatus(t, other, tok.AccessToken); status != http.StatusOK {
					t.Errorf("user %d: MCP on %s after a refresh on %s: %d", i, other.Base, n.Base, status)
				}
				refresh = tok.RefreshToken
			}
			users[i] = refresh
		}
		for _, n := range c.nodes {
			if resp, body := backgroundToken(t, n.Base, "worker", "worker-secret", o.User.Subject); resp.StatusCode != http.StatusOK {
				t.Errorf("background token on %s: %s %v", n.Base, resp.Status, body["error"])
			} else if tok, _ := body["access_token"].(string); tok != "" {
				c.secret(tok)
			}
		}
	}
	step := func(name, ringA, ringB string) {
		t.Run(name, func(t *testing.T) {
			a.setKeys(t, ringA)
			b.setKeys(t, ringB)
			crossed(t, a, b)
			crossed(t, b, a)
			everyone(t)
		})
	}

	// Before: one key. A user logs in and grants offline access, under the old key.
	c.grantOfflineAccess(t, crossed(t, a, b), a, b, a)
	step("1. the new key added after the old: A has it, B not yet", both, old)
	step("1. the new key added after the old on both", both, both)
	step("2. the new key first: on A, B still seals with the old", swapped, both)
	step("2. the new key first on both", swapped, swapped)
	// 3. Once the longest record TTL has passed, the old key goes; not waited for here.

	t.Run("control: the first step skipped, a node with the old key alone cannot read what the new key sealed", func(t *testing.T) {
		b.setKeys(t, old)
		code := c.login(t, client, a, a)
		status, tok := c.redeem(t, a, client, code)
		if status != http.StatusOK {
			t.Fatalf("login on A: %d %s", status, tok.Error)
		}
		if status := mcpStatus(t, b, tok.AccessToken); status == http.StatusOK {
			t.Errorf("MCP on B, whose ring is [old], with a session sealed under the new key: %d, want a refusal", status)
		}
	})
}

// encryptionKeyLine is the encryption_key line of a Caddyfile.
var encryptionKeyLine = regexp.MustCompile(`(?m)^(\s*encryption_key) .*$`)

// setKeys rewrites the encryption_key line of p's Caddyfile to keys (base64 keys separated
// by spaces, the sealing one first) and loads it through the admin API, as an operator
// editing the Caddyfile and running `caddy reload` does; it waits for the reload.
func (p *caddyProc) setKeys(t *testing.T, keys string) {
	t.Helper()
	raw, err := os.ReadFile(p.caddyfile)
	if err != nil {
		t.Fatal(err)
	}
	changed := encryptionKeyLine.ReplaceAll(raw, []byte("${1} "+keys))
	if !bytes.Contains(changed, []byte("encryption_key "+keys+"\n")) {
		t.Fatal("no encryption_key line to change")
	}
	if bytes.Equal(changed, raw) {
		return
	}
	if err := os.WriteFile(p.caddyfile, changed, 0o600); err != nil {
		t.Fatal(err)
	}
	before := strings.Count(p.logs.String(), "autosaved config")
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, "http://"+p.admin+"/load", bytes.NewReader(changed))
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /load on %s: %s", p.Base, resp.Status)
	}
	for deadline := time.Now().Add(5 * time.Second); strings.Count(p.logs.String(), "autosaved config") <= before; {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not reload: no new \"autosaved config\" line", p.Base)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The reload shut the old server down, closing its idle connections: a request sent on
	// one the client still pools would read EOF, as a browser's would. Browsers retry; the
	// test's clients start on fresh connections instead.
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
}
