package flows

import (
	"bytes"
	"context"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// TestDelegationRefreshFallback: an IdP without RFC 8693, hybrid mode, auto: the broker
// falls back to the refresh grant on the session's own grant.
func TestDelegationRefreshFallback(t *testing.T) {
	o := testenv.StartOP(t, testenv.WithoutTokenExchangeAdvertised())
	// delegation.scopes configured: the refresh set is those and the tool_scope scopes
	// (without them, the client's whole grant: TestDelegationWholeGrant).
	b := newTestBroker(t, o, delegating(ModeHybrid, "", func(c *Config) { c.DelegationScopes = []string{"notes:read"} }))
	// The hybrid login asks the IdP for the upstream as resource: the refreshed tokens
	// keep that audience.
	who, idp := hybridPrincipal(t, b, o, o.User, "nextcloud")
	o.ResetCounts()

	tok := mustDelegate(t, b, who, "broker-token", []string{"notes:read"})
	if x, r := o.Count(testenv.TokenExchangeGrantType), o.Count("refresh_token"); x != 0 || r != 1 {
		t.Fatalf("%d token exchanges, %d refreshes; want 0, 1", x, r)
	}
	c := delegatedClaims(t, o, tok)
	if !slices.Equal(c.Audience, []string{"nextcloud"}) || c.Subject != o.User.Subject {
		t.Errorf("aud %v sub %q", c.Audience, c.Subject)
	}
	// Narrowed to every scope delegation may need, not per call (see delegation.refreshScopes).
	if c.Scope != "notes:read notes:write offline_access" {
		t.Errorf("scope %q", c.Scope)
	}
	if tok == idp.AccessToken {
		t.Error("the login's whole-grant token was passed on")
	}

	t.Run("the rotated refresh token is stored, the old one is dead", func(t *testing.T) {
		g := storedGrant(t, b, who.SessionID)
		if g.RefreshToken == idp.RefreshToken {
			t.Fatal("the stored refresh token did not follow the rotation")
		}
		if g.AccessToken != tok || !slices.Equal(g.AccessTokenScopes, []string{"notes:read", "notes:write"}) {
			t.Errorf("stored access token is not the narrowed one (scopes %v)", g.AccessTokenScopes)
		}
		if !slices.Equal(g.Scopes, delegationLoginScopes) {
			t.Errorf("grant scopes changed to %v", g.Scopes)
		}
		if _, err := refreshAt(o, idp.RefreshToken); err == nil {
			t.Error("the OP still takes the old refresh token")
		}
	})
	t.Run("a write call uses the same token, no IdP call", func(t *testing.T) {
		o.ResetCounts()
		if got := mustDelegate(t, b, who, "broker-token", []string{"notes:write"}); got != tok {
			t.Error("another token")
		}
		if n := tokenGrants(o); n != 0 {
			t.Errorf("%d IdP calls", n)
		}
	})
	t.Run("after eviction the stored token is reused without an IdP call", func(t *testing.T) {
		b.evictDelegated(who.SessionID)
		o.ResetCounts()
		if got := mustDelegate(t, b, who, "broker-token", nil); got != tok {
			t.Error("another token")
		}
		if n := tokenGrants(o); n != 0 {
			t.Errorf("%d IdP calls", n)
		}
	})
	t.Run("an expiring token is refreshed again", func(t *testing.T) {
		b.evictDelegated(who.SessionID)
		expireSessionToken(t, b, who.SessionID)
		before := storedGrant(t, b, who.SessionID).RefreshToken
		o.ResetCounts()
		if got := mustDelegate(t, b, who, "broker-token", nil); got == tok {
			t.Error("the expired token was used")
		}
		if r := o.Count("refresh_token"); r != 1 {
			t.Errorf("%d refreshes", r)
		}
		if storedGrant(t, b, who.SessionID).RefreshToken == before {
			t.Error("the stored refresh token did not follow the second rotation")
		}
	})
	t.Run("a session whose refresh token the IdP refuses gets 401", func(t *testing.T) {
		who, idp := hybridPrincipal(t, b, o, o.User, "nextcloud")
		if _, err := refreshAt(o, idp.RefreshToken); err != nil { // someone else rotated it away
			t.Fatal(err)
		}
		w, h, ok := delegate(context.Background(), b, who, "broker-token", nil)
		if ok || h != "" || w.Code != http.StatusUnauthorized || !strings.Contains(w.Header().Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Errorf("%d %q %s", w.Code, w.Header().Get("WWW-Authenticate"), w.Body.String())
		}
	})
}

// TestDelegationRefreshTwoNodes: two brokers ("nodes") over one storage refresh the same
// session at once: the IdP sees one rotation and both nodes succeed.
func TestDelegationRefreshTwoNodes(t *testing.T) {
	for _, tc := range []struct {
		name       string
		opts       []testenv.OPOption
		delegation string
		resources  []string
		exchanges  int
	}{
		{"refresh delegation", []testenv.OPOption{testenv.WithoutTokenExchangeAdvertised()}, DelegationRefresh, []string{"nextcloud"}, 0},
		{"token exchange with an expired subject", nil, DelegationTokenExchange, nil, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := testenv.StartOP(t, tc.opts...)
			dir := t.TempDir()
			shared := func(c *Config) {
				ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
				if err != nil {
					t.Fatal(err)
				}
				c.Records = storage.New(&certmagic.FileStorage{Path: dir}, ring)
			}
			nodes := []*Broker{
				newTestBroker(t, o, delegating(ModeHybrid, tc.delegation, shared)),
				newTestBroker(t, o, delegating(ModeHybrid, tc.delegation, shared)),
			}
			who, idp := hybridPrincipal(t, nodes[0], o, o.User, tc.resources...)
			expireSessionToken(t, nodes[0], who.SessionID)
			o.ResetCounts()

			tokens := make([]string, len(nodes))
			var wg sync.WaitGroup
			for i, n := range nodes {
				wg.Go(func() { tokens[i] = mustDelegate(t, n, who, "broker-token", []string{"notes:read"}) })
			}
			wg.Wait()
			if r := o.Count("refresh_token"); r != 1 {
				t.Errorf("%d rotations at the IdP, want 1", r)
			}
			if x := o.Count(testenv.TokenExchangeGrantType); x != tc.exchanges {
				t.Errorf("%d exchanges, want %d", x, tc.exchanges)
			}
			for i, tok := range tokens {
				if c := delegatedClaims(t, o, tok); !slices.Equal(c.Audience, []string{"nextcloud"}) {
					t.Errorf("node %d: aud %v", i, c.Audience)
				}
			}
			g := storedGrant(t, nodes[1], who.SessionID)
			if g.RefreshToken == idp.RefreshToken {
				t.Error("the stored refresh token did not follow the rotation")
			}
			if _, err := refreshAt(o, g.RefreshToken); err != nil {
				t.Errorf("the stored refresh token is not the live one: %v", err)
			}
		})
	}
}

// TestOPNarrowsRefreshTokensForGood documents why refresh delegation narrows to one scope
// set per session rather than per call: at the test OP (zitadel), a refresh with a
// narrower scope narrows the rotated refresh token too, and a later, wider request fails.
func TestOPNarrowsRefreshTokensForGood(t *testing.T) {
	o := testenv.StartOP(t, testenv.WithoutTokenExchangeAdvertised())
	tok := o.LoginGrant(t, o.User, testenv.BrokerClientID, testenv.BrokerClientSecret, delegationLoginScopes)
	refresh := func(rt, scope string) (string, int) {
		form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "scope": {scope}}
		req, _ := http.NewRequest(http.MethodPost, o.TokenEndpoint, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth(testenv.BrokerClientID, testenv.BrokerClientSecret)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var a idpTokenAnswer
		decodeJSON(t, resp, &a)
		return a.RefreshToken, resp.StatusCode
	}
	rt, status := refresh(tok.RefreshToken, "notes:read offline_access")
	if status != http.StatusOK {
		t.Fatalf("narrowed refresh: %d", status)
	}
	if _, status := refresh(rt, "notes:write offline_access"); status == http.StatusOK {
		t.Skip("the OP keeps the refresh token's scopes; per-call narrowing would work here")
	}
}
