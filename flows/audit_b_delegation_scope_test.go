package flows

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestAuditDelegationNeverWidensScopes: in hybrid mode the session's IdP grant holds every
// configured scope, while the client's broker token may hold fewer. A call by a client
// that holds none of the delegation scopes must not get the upstream a token carrying
// the IdP grant's scopes (token exchange without `scope`, or a refresh of the whole
// grant): it is refused for step-up instead.
func TestAuditDelegationNeverWidensScopes(t *testing.T) {
	for _, tc := range []struct {
		name, mode string
		opts       []testenv.OPOption
		resources  []string
	}{
		{"token exchange", DelegationTokenExchange, nil, nil},
		{"refresh", DelegationRefresh, []testenv.OPOption{testenv.WithoutTokenExchangeAdvertised()}, []string{"nextcloud"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := testenv.StartOP(t, tc.opts...)
			b := newTestBroker(t, o, delegating(ModeHybrid, tc.mode))
			who, _ := hybridPrincipal(t, b, o, o.User, tc.resources...)
			// The client consented to identity scopes only.
			who.Scopes = []string{"openid"}

			w, h, ok := delegate(context.Background(), b, who, "broker-token", nil)
			if ok {
				c := delegatedClaims(t, o, strings.TrimPrefix(h, "Bearer "))
				if strings.Contains(c.Scope, "notes:") {
					t.Fatalf("a client holding %v got the upstream a token with scope %q", who.Scopes, c.Scope)
				}
				return
			}
			if w.Code != http.StatusForbidden || !strings.Contains(w.Header().Get("WWW-Authenticate"), `error="insufficient_scope"`) {
				t.Errorf("%d %q %s, want 403 insufficient_scope", w.Code, w.Header().Get("WWW-Authenticate"), w.Body.String())
			}
		})
	}
}
