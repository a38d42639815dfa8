package flows

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// issueTestPair stores a family and a pair of broker tokens for b, without a session:
// verification needs neither the IdP nor a session.
func issueTestPair(tb testing.TB, b *Broker) (TokenResponse, string) {
	tb.Helper()
	ctx := context.Background()
	familyID := randomToken()
	if err := b.families.start(ctx, TokenFamily{ID: familyID, ClientID: testenv.NativeClientID}); err != nil {
		tb.Fatal(err)
	}
	resp, err := b.families.issue(ctx, tokenGrant{
		FamilyID: familyID, Subject: "alice", ClientID: testenv.NativeClientID, Resource: testResource,
		Scopes: tokenTestScopes, RefreshScopes: tokenTestScopes,
	})
	if err != nil {
		tb.Fatal(err)
	}
	return resp, familyID
}

func TestVerifyBrokerToken(t *testing.T) {
	o := testenv.SharedOP(t)

	t.Run("a warm token is verified from memory, without storage", func(t *testing.T) {
		e := newTokenEnv(t, o, nil)
		tok, familyID := issueTestPair(t, e.b)
		if _, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken); err != nil {
			t.Fatal(err)
		}
		// Pull the records from under the cache: only a storage read could notice.
		for _, key := range []string{tokenRecordKey(kindAccessToken, tok.AccessToken), familyKey(familyID)} {
			if err := e.b.cfg.Records.Delete(t.Context(), key); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken); err != nil {
			t.Fatalf("warm verification read storage: %v", err)
		}
		e.clock.Advance(brokerCacheTTL)
		if _, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken); !errors.Is(err, idp.ErrInvalidToken) {
			t.Fatalf("after the cache bound: %v, want idp.ErrInvalidToken", err)
		}
	})

	t.Run("a cached token lasts until min(its expiry, 30s)", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			ttl  time.Duration
			want time.Duration
		}{
			{"a long-lived token is trusted from memory for 30s", time.Hour, brokerCacheTTL},
			{"a token expiring sooner is trusted until it expires", 10 * time.Second, 10 * time.Second},
		} {
			t.Run(tc.name, func(t *testing.T) {
				e := newTokenEnv(t, o, func(c *Config) { c.AccessTokenTTL = tc.ttl })
				tok, _ := issueTestPair(t, e.b)
				if _, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken); err != nil {
					t.Fatal(err)
				}
				key, now := brokerTokenKey(tok.AccessToken), e.clock.Now().UnixNano()
				if _, ok := e.b.brokerTokens.Get(key, now); !ok {
					t.Fatal("not cached")
				}
				if _, ok := e.b.brokerTokens.Get(key, now+int64(tc.want)-1); !ok {
					t.Errorf("cached for less than %s", tc.want)
				}
				if _, ok := e.b.brokerTokens.Get(key, now+int64(tc.want)); ok {
					t.Errorf("cached for more than %s", tc.want)
				}
			})
		}
	})

	t.Run("an expired token is refused", func(t *testing.T) {
		e := newTokenEnv(t, o, nil)
		tok, _ := issueTestPair(t, e.b)
		e.clock.Advance(e.b.cfg.AccessTokenTTL)
		if _, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken); !errors.Is(err, idp.ErrInvalidToken) {
			t.Fatalf("Verify = %v, want idp.ErrInvalidToken", err)
		}
	})

	t.Run("a revocation on another node reaches this one within 30s", func(t *testing.T) {
		nodeA := newTokenEnv(t, o, nil)
		nodeB := newTokenEnv(t, o, func(c *Config) { c.Records = nodeA.b.cfg.Records })
		tok, _ := issueTestPair(t, nodeA.b)
		if st := nodeB.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
			t.Fatalf("node B before the revocation: %d", st)
		}
		nodeA.revoke(t, testenv.NativeClientID, tok.AccessToken, "").wantOK(t)
		if st := nodeA.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("node A after revoking: %d, want 401", st)
		}
		if st := nodeB.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
			t.Errorf("node B within the bound: %d (fine, but the cache did not serve it)", st)
		}
		nodeB.clock.Advance(brokerCacheTTL)
		if st := nodeB.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("node B after the bound: %d, want 401", st)
		}
	})

	t.Run("refused tokens", func(t *testing.T) {
		e := newTokenEnv(t, o, nil)
		refresh, _ := issueTestPair(t, e.b)
		for _, tc := range []struct{ name, token string }{
			{"an unknown token", accessTokenPrefix + randomToken()},
			{"a refresh token", refresh.RefreshToken},
			{"a token without the prefix", randomToken()},
			{"a token too long", accessTokenPrefix + randomToken() + "x"},
			{"an IdP JWT", o.MintJWT(o.AccessTokenClaims(o.User.Subject, testResource))},
		} {
			t.Run(tc.name, func(t *testing.T) {
				if _, err := e.b.verifyBrokerToken(t.Context(), tc.token); !errors.Is(err, idp.ErrInvalidToken) {
					t.Fatalf("Verify = %v, want idp.ErrInvalidToken", err)
				}
			})
		}
	})

	t.Run("a verification racing a revocation does not cache the revoked token", func(t *testing.T) {
		e := newTokenEnv(t, o, nil)
		tok, familyID := issueTestPair(t, e.b)
		epoch := e.b.brokerTokens.Epoch()
		p, _, err := e.b.checkAccessToken(t.Context(), tok.AccessToken, e.clock.Now()) // read before the revocation
		if err != nil {
			t.Fatal(err)
		}
		if err := e.b.revokeFamily(t.Context(), familyID, ""); err != nil {
			t.Fatal(err)
		}
		if e.b.brokerTokens.PutSince(epoch, brokerTokenKey(tok.AccessToken), brokerVerdict{principal: p, familyID: familyID},
			e.clock.Now().Add(time.Minute).UnixNano(), false, e.clock.Now().UnixNano()) {
			t.Error("a verdict read before the revocation was cached after it")
		}
		if _, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken); !errors.Is(err, idp.ErrInvalidToken) {
			t.Fatalf("Verify = %v, want idp.ErrInvalidToken", err)
		}
	})
}

// BenchmarkVerifyBrokerTokenWarm is the hot path of a hybrid-mode request after the
// first: a cached broker access token. No storage read, no allocation.
func BenchmarkVerifyBrokerTokenWarm(b *testing.B) {
	br, raw := warmBroker(b)
	ctx := b.Context()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := br.verifyBrokerToken(ctx, raw); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyBrokerTokenWarmParallel is the hot path under concurrent requests.
func BenchmarkVerifyBrokerTokenWarmParallel(b *testing.B) {
	br, raw := warmBroker(b)
	ctx := b.Context()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := br.verifyBrokerToken(ctx, raw); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkVerifyBrokerTokenCold is a first request (or one every 30s): two storage reads
// on file storage.
func BenchmarkVerifyBrokerTokenCold(b *testing.B) {
	br, raw := warmBroker(b)
	ctx := b.Context()
	b.ReportAllocs()
	for b.Loop() {
		br.brokerTokens.Clear()
		if _, err := br.verifyBrokerToken(ctx, raw); err != nil {
			b.Fatal(err)
		}
	}
}

// warmBroker is a hybrid broker with a broker access token verified once.
func warmBroker(b *testing.B) (*Broker, string) {
	b.Helper()
	br := newBenchBroker(b)
	tok, _ := issueTestPair(b, br)
	if _, err := br.verifyBrokerToken(b.Context(), tok.AccessToken); err != nil {
		b.Fatal(err)
	}
	return br, tok.AccessToken
}

// newBenchBroker is a hybrid broker on file storage for benchmarks (newTestBroker wants a
// *testing.T).
func newBenchBroker(b *testing.B) *Broker {
	b.Helper()
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		b.Fatal(err)
	}
	br, err := New(Config{
		Mode:           ModeHybrid,
		Issuer:         testenv.SharedOP(b).Issuer,
		ClientID:       testenv.BrokerClientID,
		ClientSecret:   testenv.BrokerClientSecret,
		Resource:       testResource,
		DelegationMode: DelegationNone,
		Records:        storage.New(&certmagic.FileStorage{Path: b.TempDir()}, ring),
	})
	if err != nil {
		b.Fatal(err)
	}
	return br
}

// pairTokenID reads a pair's id at one offset in an access and a refresh token alike:
// the two prefixes must keep one length.
func TestTokenPrefixesHaveOneLength(t *testing.T) {
	if len(accessTokenPrefix) != len(refreshTokenPrefix) {
		t.Fatalf("prefixes %q and %q differ in length; pairTokenID reads both at one offset", accessTokenPrefix, refreshTokenPrefix)
	}
	for _, p := range []string{accessTokenPrefix, refreshTokenPrefix} {
		tok := p + "." + strings.Repeat("a", brokerTokenLength-len(p)-1)
		if id, ok := pairTokenID(tok); !ok || id != strings.Repeat("a", pairIDLength) {
			t.Errorf("pairTokenID(%q) = %q, %v", tok, id, ok)
		}
	}
}
