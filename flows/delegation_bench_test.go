package flows

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// BenchmarkDelegateWarm measures delegateInto on a cached delegated token: what every
// steady-state request pays for delegation.
func BenchmarkDelegateWarm(b *testing.B) {
	o := testenv.SharedOP(b)
	for _, mode := range []string{ModeProgressive, ModeHybrid} {
		b.Run(mode, func(b *testing.B) {
			ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
			if err != nil {
				b.Fatal(err)
			}
			cfg := Config{
				Mode: mode, Issuer: o.Issuer, ClientID: testenv.BrokerClientID, ClientSecret: testenv.BrokerClientSecret,
				Resource: testResource, Scopes: delegationLoginScopes, ToolScopes: delegationToolScopes,
				DelegationMode: DelegationTokenExchange, DelegationAudience: "nextcloud",
				Records: storage.New(&certmagic.FileStorage{Path: b.TempDir()}, ring),
			}
			br, err := New(cfg)
			if err != nil {
				b.Fatal(err)
			}
			var who *idp.Principal
			raw := "broker-token"
			if mode == ModeHybrid {
				who, _ = hybridPrincipal(b, br, o, o.User)
			} else {
				who, raw = progressivePrincipal(b, br, o, o.User)
			}
			need := []string{"notes:write"}
			mustDelegate(b, br, who, raw, need)

			out := httptest.NewRequest(http.MethodPost, testResource, nil)
			tok := newPresentedToken(raw)
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if err := br.delegateInto(out, who, tok, need); err != nil {
					b.Fatal("delegation failed")
				}
			}
		})
	}
}
