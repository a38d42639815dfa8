package flows

import (
	"errors"
	"net/http"
	"net/url"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// TestIdPCallbackIssParameter (SECURITY.md S1.25): as a client of the IdP, the broker
// applies RFC 9207 §2.4 at both of its callbacks, the hybrid login's and offline
// access's. With an IdP that advertises the parameter, a callback without iss, or with
// another issuer (however close its spelling), is refused and its code never redeemed;
// the IdP's own iss passes.
func TestIdPCallbackIssParameter(t *testing.T) {
	o := testenv.StartOP(t, testenv.WithAuthorizationResponseIssuer())
	wrong := map[string]func(url.Values){
		"without iss":                 func(q url.Values) { q.Del("iss") },
		"with an empty iss":           func(q url.Values) { q.Set("iss", "") },
		"with another issuer":         func(q url.Values) { q.Set("iss", "https://evil.example") },
		"with a trailing slash added": func(q url.Values) { q.Set("iss", o.Issuer+"/") },
		"with the scheme upper-cased": func(q url.Values) { q.Set("iss", "HTTP"+o.Issuer[len("http"):]) },
	}
	with := func(cb *url.URL, change func(url.Values)) *url.URL {
		u := *cb
		q := u.Query()
		change(q)
		u.RawQuery = q.Encode()
		return &u
	}

	t.Run("hybrid login", func(t *testing.T) {
		b, front := startHybridFront(t, o, "", hybridClients)
		for name, change := range wrong {
			t.Run(name, func(t *testing.T) {
				br := newHybridBrowser(t)
				cb := startLogin(t, br, front.URL, o, hybridQuery(nil))
				if cb.Query().Get("iss") != o.Issuer {
					t.Fatalf("the IdP sent no iss: %s", cb.Redacted())
				}
				redeemed, before := o.Count("authorization_code"), len(sessions(t, b))
				final := br.redirect(br.get(with(cb, change).String()))
				if q := final.Query(); q.Get("error") != "server_error" || q.Has("code") {
					t.Errorf("client redirect query %v, want server_error", q)
				}
				if o.Count("authorization_code") != redeemed || len(sessions(t, b)) != before {
					t.Error("the code was redeemed")
				}
			})
		}
		t.Run("the IdP's iss passes", func(t *testing.T) {
			br := newHybridBrowser(t)
			cb := startLogin(t, br, front.URL, o, hybridQuery(nil))
			if q := br.redirect(br.get(cb.String())).Query(); q.Get("code") == "" {
				t.Errorf("client redirect query %v, want a code", q)
			}
		})
	})

	t.Run("offline access", func(t *testing.T) {
		f := startOfflineAccess(t, o, nil)
		token := f.userToken(t, o.User)
		for name, change := range wrong {
			t.Run(name, func(t *testing.T) {
				cb := f.loginAt(t, f.link(t, token))
				redeemed := o.Count("authorization_code")
				if resp, page := f.callback(t, with(cb, change)); resp.StatusCode != http.StatusBadGateway {
					t.Errorf("status %s: %s", resp.Status, page)
				}
				if o.Count("authorization_code") != redeemed {
					t.Error("the code was redeemed")
				}
				if _, _, err := f.grant(t, o.User.Subject); !errors.Is(err, storage.ErrNotFound) {
					t.Errorf("a grant was stored: %v", err)
				}
			})
		}
		t.Run("the IdP's iss passes", func(t *testing.T) {
			f.grantOfflineAccess(t, token)
		})
	})
}

// An IdP that does not advertise RFC 9207 may leave iss out, but one it sends is still
// compared (RFC 9207 §2.4, local policy): at the offline access callback too.
func TestOfflineAccessCallbackComparesIss(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	token := f.userToken(t, o.User)
	cb := f.loginAt(t, f.link(t, token))
	q := cb.Query()
	q.Set("iss", "https://evil.example")
	forged := *cb
	forged.RawQuery = q.Encode()
	if resp, page := f.callback(t, &forged); resp.StatusCode != http.StatusBadGateway {
		t.Errorf("status %s: %s", resp.Status, page)
	}
	f.grantOfflineAccess(t, token) // without iss: passes
}

// RFC 9207 §2.4 applies to error responses too: with an IdP that advertises iss, an error
// response without it (or with another issuer) is not acted on: the hybrid callback does
// not relay its error to the client, the offline access callback does not report it.
func TestIdPErrorResponseIssParameter(t *testing.T) {
	o := testenv.StartOP(t, testenv.WithAuthorizationResponseIssuer())

	t.Run("hybrid login", func(t *testing.T) {
		_, front := startHybridFront(t, o, "", hybridClients)
		for _, tc := range []struct {
			name, iss, want string
		}{
			{"without iss", "", "server_error"},
			{"with another issuer", "https://evil.example", "server_error"},
			{"with the IdP's issuer", o.Issuer, "access_denied"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				br := newHybridBrowser(t)
				state := br.toIdP(front, hybridQuery(nil)).Query().Get("state")
				q := url.Values{"state": {state}, "error": {"access_denied"}}
				if tc.iss != "" {
					q.Set("iss", tc.iss)
				}
				final := br.redirect(br.get(front.URL + pathCallback + "?" + q.Encode()))
				if got := final.Query().Get("error"); got != tc.want {
					t.Errorf("the client got %q, want %q", got, tc.want)
				}
			})
		}
	})

	t.Run("offline access", func(t *testing.T) {
		f := startOfflineAccess(t, o, nil)
		token := f.userToken(t, o.User)
		for _, tc := range []struct {
			name, iss string
			want      int
		}{
			{"without iss", "", http.StatusBadGateway},
			{"with another issuer", "https://evil.example", http.StatusBadGateway},
			{"with the IdP's issuer", o.Issuer, http.StatusForbidden},
		} {
			t.Run(tc.name, func(t *testing.T) {
				to := redirectTarget(t, getWithoutRedirect(t, f.link(t, token)))
				q := url.Values{"state": {to.Query().Get("state")}, "error": {"access_denied"}}
				if tc.iss != "" {
					q.Set("iss", tc.iss)
				}
				cb, _ := url.Parse(f.front.URL + f.b.cfg.OfflineAccessCallbackPath + "?" + q.Encode())
				if resp, page := f.callback(t, cb); resp.StatusCode != tc.want {
					t.Errorf("status %s, want %d: %s", resp.Status, tc.want, page)
				}
			})
		}
	})
}
