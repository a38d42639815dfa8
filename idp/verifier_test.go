package idp

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// verifierResource is the protected resource the tokens of these tests are meant for.
const verifierResource = "https://mcp.example.test/mcp"

// newVerifierFor builds a Verifier for o's tokens meant for verifierResource, with
// the broker's credentials, after applying change to its configuration.
func newVerifierFor(o *testenv.OP, change func(*VerifierConfig)) *Verifier {
	cfg := VerifierConfig{
		Provider:     NewProvider(ProviderConfig{Issuer: o.Issuer, HTTPClient: http.DefaultClient}),
		Audiences:    []string{verifierResource},
		ClientID:     testenv.BrokerClientID,
		ClientSecret: testenv.BrokerClientSecret,
		HTTPClient:   http.DefaultClient,
		ClientIP:     contextClientIP,
	}
	if change != nil {
		change(&cfg)
	}
	return NewVerifier(cfg)
}

func TestTokenVerifierAcceptsValidTokens(t *testing.T) {
	o := testenv.SharedOP(t)
	for _, tc := range []struct {
		name         string
		token        func(t *testing.T) string
		wantClientID string
		wantScopes   []string
	}{
		{
			name: "JWT from a real login speaks for the user with its scopes",
			token: func(t *testing.T) string {
				return o.LoginAccessToken(t, testenv.NativeClientID, "",
					[]string{"openid", "notes:read"}, verifierResource)
			},
			wantClientID: testenv.NativeClientID,
			wantScopes:   []string{"openid", "notes:read"},
		},
		{
			name: "opaque token from a real login is accepted by introspection",
			token: func(t *testing.T) string {
				tok := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret,
					[]string{"openid", "notes:write"}, verifierResource)
				if LooksLikeJWS(tok) {
					t.Fatalf("opaque client got a JWT")
				}
				return tok
			},
			wantClientID: testenv.OpaqueClientID,
			wantScopes:   []string{"openid", "notes:write"},
		},
		{
			name: "scp array is read as the scopes and azp as the client",
			token: func(t *testing.T) string {
				c := o.AccessTokenClaims(o.User.Subject, verifierResource)
				c["scp"] = []string{"notes:read", "notes:write"}
				c["azp"] = "some-client"
				delete(c, "client_id")
				return o.MintJWT(c)
			},
			wantClientID: "some-client",
			wantScopes:   []string{"notes:read", "notes:write"},
		},
		{
			name: "aud as a plain string naming the resource is accepted",
			token: func(t *testing.T) string {
				c := o.AccessTokenClaims(o.User.Subject)
				c["aud"] = verifierResource
				c["client_id"] = "cid"
				c["scope"] = "a b"
				return o.MintJWT(c)
			},
			wantClientID: "cid",
			wantScopes:   []string{"a", "b"},
		},
		{
			name: "token expired less than the leeway ago is accepted",
			token: func(t *testing.T) string {
				c := o.AccessTokenClaims(o.User.Subject, verifierResource)
				c["exp"] = time.Now().Add(-10 * time.Second).Unix()
				return o.MintJWT(c)
			},
			wantClientID: testenv.NativeClientID,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := tc.token(t)
			v := newVerifierFor(o, nil)
			p, err := v.Verify(t.Context(), raw)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if p.Subject != o.User.Subject {
				t.Errorf("Subject = %q, want %q", p.Subject, o.User.Subject)
			}
			if p.ClientID != tc.wantClientID {
				t.Errorf("ClientID = %q, want %q", p.ClientID, tc.wantClientID)
			}
			if !slices.Equal(p.Scopes, tc.wantScopes) {
				t.Errorf("Scopes = %q, want %q", p.Scopes, tc.wantScopes)
			}
			if !slices.Contains(p.Audience, verifierResource) {
				t.Errorf("Audience = %q, want it to contain %q", p.Audience, verifierResource)
			}
			if p.Expiry.IsZero() {
				t.Error("Expiry is zero")
			}
		})
	}
}

func TestTokenVerifierRefusesInvalidTokens(t *testing.T) {
	o := testenv.SharedOP(t)
	opKey := o.SigningKey()
	valid := func() map[string]any { return o.AccessTokenClaims(o.User.Subject, verifierResource) }

	for _, tc := range []struct {
		name  string
		token func(t *testing.T) string
	}{
		{
			name: "alg none is refused",
			token: func(t *testing.T) string {
				return testenv.CompactJWS(t, map[string]any{"alg": "none", "typ": "JWT", "kid": opKey.KeyID}, valid(), nil)
			},
		},
		{
			name: "HS256 keyed with the OP's public key is refused",
			token: func(t *testing.T) string {
				pub, err := x509.MarshalPKIXPublicKey(opKey.Public().Key)
				if err != nil {
					t.Fatal(err)
				}
				secret := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})
				return testenv.CompactJWS(t, map[string]any{"alg": "HS256", "typ": "JWT", "kid": opKey.KeyID}, valid(),
					func(in []byte) []byte {
						m := hmac.New(sha256.New, secret)
						m.Write(in)
						return m.Sum(nil)
					})
			},
		},
		{
			name: "HS256 keyed with the OP's JWK is refused",
			token: func(t *testing.T) string {
				secret, err := opKey.Public().MarshalJSON()
				if err != nil {
					t.Fatal(err)
				}
				return testenv.CompactJWS(t, map[string]any{"alg": "HS256", "typ": "JWT", "kid": opKey.KeyID}, valid(),
					func(in []byte) []byte {
						m := hmac.New(sha256.New, secret)
						m.Write(in)
						return m.Sum(nil)
					})
			},
		},
		{
			name: "unpublished key under the OP's kid is refused",
			token: func(t *testing.T) string {
				return testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, opKey.KeyID, valid())
			},
		},
		{
			name: "unpublished key under a new kid is refused",
			token: func(t *testing.T) string {
				return testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, testenv.RandomKID(), valid())
			},
		},
		{
			name: "unpublished key without a kid is refused",
			token: func(t *testing.T) string {
				return testenv.SignJWT(t, testenv.AttackerKey(), jose.PS256, "", valid())
			},
		},
		{
			name: "wrong issuer is refused",
			token: func(t *testing.T) string {
				c := valid()
				c["iss"] = "https://idp.evil.example"
				return o.MintJWT(c)
			},
		},
		{
			name: "wrong audience is refused",
			token: func(t *testing.T) string {
				c := valid()
				c["aud"] = []string{"https://other.example/mcp", "mcp-server"}
				return o.MintJWT(c)
			},
		},
		{
			name: "JWT of a real login by another client for itself is refused",
			token: func(t *testing.T) string {
				return o.LoginAccessToken(t, testenv.BrokerClientID, testenv.BrokerClientSecret, []string{"openid"})
			},
		},
		{
			name: "expired token is refused",
			token: func(t *testing.T) string {
				c := valid()
				c["iat"] = time.Now().Add(-2 * time.Hour).Unix()
				c["nbf"] = time.Now().Add(-2 * time.Hour).Unix()
				c["exp"] = time.Now().Add(-time.Hour).Unix()
				return o.MintJWT(c)
			},
		},
		{
			name: "token without exp is refused",
			token: func(t *testing.T) string {
				c := valid()
				delete(c, "exp")
				return o.MintJWT(c)
			},
		},
		{
			name: "nbf an hour ahead is refused",
			token: func(t *testing.T) string {
				c := valid()
				c["nbf"] = time.Now().Add(time.Hour).Unix()
				c["exp"] = time.Now().Add(2 * time.Hour).Unix()
				return o.MintJWT(c)
			},
		},
		{
			name: "token without sub is refused",
			token: func(t *testing.T) string {
				c := valid()
				delete(c, "sub")
				return o.MintJWT(c)
			},
		},
		{
			name: "malformed scope claim is refused",
			token: func(t *testing.T) string {
				c := valid()
				c["scope"] = 42
				return o.MintJWT(c)
			},
		},
		{
			name: "opaque token of another client, for itself, is refused (cross-client)",
			token: func(t *testing.T) string {
				return o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"})
			},
		},
		{
			name:  "revoked opaque token is refused as inactive",
			token: func(t *testing.T) string { return o.RevokedOpaqueToken(t, verifierResource) },
		},
		{
			name:  "garbage opaque token is refused as inactive",
			token: func(t *testing.T) string { return "not-a-token-" + testenv.RandomKID() },
		},
		{
			name:  "JWE-shaped token is refused as inactive",
			token: func(t *testing.T) string { return "a.b.c.d.e" },
		},
		{
			name:  "oversized token is refused without a request",
			token: func(t *testing.T) string { return strings.Repeat("a", maxTokenLength+1) },
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := tc.token(t)
			v := newVerifierFor(o, nil)
			p, err := v.Verify(t.Context(), raw)
			if !errors.Is(err, ErrInvalidToken) || errors.Is(err, ErrUnavailable) {
				t.Fatalf("Verify = %+v, %v; want ErrInvalidToken alone", p, err)
			}
			if p != nil {
				t.Errorf("principal %+v returned with an error", p)
			}
			if strings.Contains(err.Error(), raw) {
				t.Errorf("error contains the token: %v", err)
			}
			t.Logf("refused: %v", err)
		})
	}
}

func TestTokenVerifierRefusesOpaqueTokensWithoutIntrospection(t *testing.T) {
	o := testenv.SharedOP(t)
	v := newVerifierFor(o, nil)
	d, err := v.cfg.Provider.Discovery(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	noIntrospection := *d
	noIntrospection.IntrospectionEndpoint = ""
	_, err = v.introspect(t.Context(), &noIntrospection, "opaque-token")
	if !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("introspect without an endpoint = %v, want ErrInvalidToken", err)
	}
}

func TestTokenVerifierFetchesJWKSOnceForAnUnknownKid(t *testing.T) {
	o, clock, v, claims := startWithKnownKey(t)
	if n := o.Count(testenv.CountJWKS); n != 1 {
		t.Errorf("a kid not yet cached took %d JWKS fetches, want 1", n)
	}

	o.ResetCounts()
	if _, err := v.Verify(t.Context(), o.MintJWT(claims())); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if n := o.Count(testenv.CountJWKS); n != 0 {
		t.Errorf("a known kid took %d JWKS fetches, want 0", n)
	}

	// An unknown kid is fetched for at most once per JWKSRefetchInterval
	// (TestJWKSRefetchAtMostEvery30s).
	o.ResetCounts()
	clock.Advance(JWKSRefetchInterval)
	forged := testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, testenv.RandomKID(), claims())
	if _, err := v.Verify(t.Context(), forged); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("Verify(forged) = %v, want ErrInvalidToken", err)
	}
	if n := o.Count(testenv.CountJWKS); n != 1 {
		t.Errorf("an unknown kid took %d JWKS fetches, want 1", n)
	}
	o.ResetCounts()
	for range 2 {
		if _, err := v.Verify(t.Context(), forged); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("Verify(forged) = %v, want ErrInvalidToken", err)
		}
	}
	if n := o.Count(testenv.CountJWKS); n != 0 {
		t.Errorf("the refused token presented again took %d JWKS fetches, want 0 (the refusal is cached)", n)
	}
}

func TestTokenVerifierCache(t *testing.T) {
	t.Run("second Verify of an opaque token does not call the IdP", func(t *testing.T) {
		o := testenv.StartOP(t)
		raw := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)
		v := newVerifierFor(o, nil)
		first, err := v.Verify(t.Context(), raw)
		if err != nil {
			t.Fatal(err)
		}
		second, err := v.Verify(t.Context(), raw)
		if err != nil {
			t.Fatal(err)
		}
		if first != second {
			t.Error("the second Verify did not answer from the cache")
		}
		if n := o.Count(testenv.CountIntrospect); n != 1 {
			t.Errorf("introspected %d times, want 1", n)
		}
	})

	t.Run("VerifyDigest returns the token's SHA-256, cold and warm, and none for a refused size", func(t *testing.T) {
		o := testenv.StartOP(t)
		raw := o.MintJWT(o.AccessTokenClaims(o.User.Subject, verifierResource))
		v := newVerifierFor(o, nil)
		for _, round := range []string{"cold", "warm"} {
			p, digest, err := v.VerifyDigest(t.Context(), raw)
			if err != nil || p == nil {
				t.Fatalf("%s: %v", round, err)
			}
			if digest != sha256.Sum256([]byte(raw)) {
				t.Errorf("%s: the digest is not the token's SHA-256", round)
			}
		}
		if _, digest, err := v.VerifyDigest(t.Context(), strings.Repeat("a", maxTokenLength+1)); err == nil || digest != ([sha256.Size]byte{}) {
			t.Errorf("an oversized token: err %v, digest %x; want a refusal and no digest", err, digest)
		}
	})

	t.Run("second Verify of a JWT does not call the IdP or verify again", func(t *testing.T) {
		o := testenv.StartOP(t)
		raw := o.MintJWT(o.AccessTokenClaims(o.User.Subject, verifierResource))
		v := newVerifierFor(o, nil)
		first, err := v.Verify(t.Context(), raw)
		if err != nil {
			t.Fatal(err)
		}
		o.SetDown(true)
		second, err := v.Verify(t.Context(), raw)
		if err != nil {
			t.Fatal(err)
		}
		if first != second {
			t.Error("the second Verify did not answer from the cache")
		}
		if n := o.Count(testenv.CountJWKS); n != 1 {
			t.Errorf("fetched the JWKS %d times, want 1", n)
		}
	})

	t.Run("valid entry lasts until the token's exp, no longer", func(t *testing.T) {
		o := testenv.SharedOP(t)
		exp := time.Now().Add(90 * time.Second).Truncate(time.Second)
		c := o.AccessTokenClaims(o.User.Subject, verifierResource)
		c["exp"] = exp.Unix()
		raw := o.MintJWT(c)
		v := newVerifierFor(o, nil)
		if _, err := v.Verify(t.Context(), raw); err != nil {
			t.Fatal(err)
		}
		key := v.index(raw)
		if _, ok := v.cache.Get(key, exp.UnixNano()-1); !ok {
			t.Fatalf("valid token not cached until the token's exp %v", exp)
		}
		if _, ok := v.cache.Get(key, exp.UnixNano()); ok {
			t.Errorf("cached past the token's exp %v", exp)
		}
	})

	t.Run("expired cached JWT is verified again and refused", func(t *testing.T) {
		o := testenv.SharedOP(t)
		var now atomic.Pointer[time.Time]
		start := time.Now()
		now.Store(&start)
		v := newVerifierFor(o, func(c *VerifierConfig) { c.Now = func() time.Time { return *now.Load() } })
		c := o.AccessTokenClaims(o.User.Subject, verifierResource)
		c["exp"] = start.Add(time.Minute).Unix()
		raw := o.MintJWT(c)
		if _, err := v.Verify(t.Context(), raw); err != nil {
			t.Fatal(err)
		}
		later := start.Add(time.Minute + v.cfg.Leeway + time.Second)
		now.Store(&later)
		if _, err := v.Verify(t.Context(), raw); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("Verify after exp = %v, want ErrInvalidToken", err)
		}
	})

	t.Run("expired cached opaque token is introspected again and refused", func(t *testing.T) {
		o := testenv.StartOP(t)
		raw := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)
		var now atomic.Pointer[time.Time]
		start := time.Now()
		now.Store(&start)
		v := newVerifierFor(o, func(c *VerifierConfig) { c.Now = func() time.Time { return *now.Load() } })
		p, err := v.Verify(t.Context(), raw)
		if err != nil {
			t.Fatal(err)
		}
		later := p.Expiry.Add(v.cfg.Leeway + time.Second)
		now.Store(&later)
		if _, err := v.Verify(t.Context(), raw); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("Verify after exp = %v, want ErrInvalidToken", err)
		}
		if n := o.Count(testenv.CountIntrospect); n != 2 {
			t.Errorf("introspected %d times, want 2", n)
		}
	})

	t.Run("refusal is cached for InactiveTTL only", func(t *testing.T) {
		o := testenv.StartOP(t)
		var now atomic.Pointer[time.Time]
		start := time.Now()
		now.Store(&start)
		v := newVerifierFor(o, func(c *VerifierConfig) {
			c.Now = func() time.Time { return *now.Load() }
			c.InactiveTTL = 5 * time.Second
		})
		raw := "garbage-" + testenv.RandomKID()
		for range 2 {
			if _, err := v.Verify(t.Context(), raw); !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("Verify = %v, want ErrInvalidToken", err)
			}
		}
		if n := o.Count(testenv.CountIntrospect); n != 1 {
			t.Errorf("within InactiveTTL: introspected %d times, want 1", n)
		}
		later := start.Add(5 * time.Second)
		now.Store(&later)
		if _, err := v.Verify(t.Context(), raw); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("Verify = %v, want ErrInvalidToken", err)
		}
		if n := o.Count(testenv.CountIntrospect); n != 2 {
			t.Errorf("after InactiveTTL: introspected %d times, want 2", n)
		}
	})

	t.Run("cache stays within CacheEntries", func(t *testing.T) {
		o := testenv.SharedOP(t)
		v := newVerifierFor(o, func(c *VerifierConfig) { c.CacheEntries = 3 })
		for i := range 10 {
			if _, err := v.Verify(t.Context(), o.MintJWT(o.AccessTokenClaims(o.User.Subject, verifierResource))); err != nil {
				t.Fatalf("token %d: %v", i, err)
			}
			if _, err := v.Verify(t.Context(), "garbage-"+testenv.RandomKID()); !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("garbage %d: %v", i, err)
			}
			if n := v.cache.Len(); n > 3 {
				t.Fatalf("after %d tokens the cache holds %d entries, want at most 3", 2*(i+1), n)
			}
		}
	})

	t.Run("a flood of refusals does not evict a valid entry", func(t *testing.T) {
		o := testenv.SharedOP(t)
		// Refusals outlive the valid entry here, so only their being disposable, not an
		// earlier expiry, can make the full cache evict them first.
		v := newVerifierFor(o, func(c *VerifierConfig) { c.CacheEntries = 4; c.InactiveTTL = time.Hour })
		claims := o.AccessTokenClaims(o.User.Subject, verifierResource)
		claims["exp"] = time.Now().Add(2 * time.Minute).Unix()
		raw := o.MintJWT(claims)
		if _, err := v.Verify(t.Context(), raw); err != nil {
			t.Fatal(err)
		}
		for range 20 {
			if _, err := v.Verify(t.Context(), "garbage-"+testenv.RandomKID()); !errors.Is(err, ErrInvalidToken) {
				t.Fatal(err)
			}
		}
		if !v.cached(raw) {
			t.Error("the valid entry was evicted by refusals")
		}
		if n := v.cache.Len(); n > 4 {
			t.Errorf("the cache holds %d entries, want at most 4", n)
		}
	})

	t.Run("a full cache evicts the valid entry expiring soonest", func(t *testing.T) {
		o := testenv.SharedOP(t)
		v := newVerifierFor(o, func(c *VerifierConfig) { c.CacheEntries = 3 })
		// Each token expires after those before it, so every eviction must take the oldest
		// cached one; nine in a row leave a random choice (1 in 3 each) no chance to pass.
		var tokens []string
		for i := range 12 {
			c := o.AccessTokenClaims(o.User.Subject, verifierResource)
			c["exp"] = time.Now().Add(time.Duration(2+i) * time.Minute).Unix()
			tokens = append(tokens, o.MintJWT(c))
			if _, err := v.Verify(t.Context(), tokens[i]); err != nil {
				t.Fatal(err)
			}
			if i < 3 {
				continue
			}
			if v.cached(tokens[i-3]) {
				t.Fatalf("token %d: the entry expiring soonest is still cached", i)
			}
			for _, raw := range tokens[i-2:] {
				if !v.cached(raw) {
					t.Fatalf("token %d: an entry expiring later was evicted", i)
				}
			}
		}
	})

	t.Run("a warm verdict gives the token's SHA-256; a refusal keeps only that", func(t *testing.T) {
		o := testenv.SharedOP(t)
		v := newVerifierFor(o, nil)
		raw := o.MintJWT(o.AccessTokenClaims(o.User.Subject, verifierResource))
		for range 2 { // cold, then warm
			if _, digest, err := v.VerifyDigest(t.Context(), raw); err != nil || digest != sha256.Sum256([]byte(raw)) {
				t.Fatalf("VerifyDigest = %x, %v; want the token's SHA-256", digest, err)
			}
		}
		bad := raw[:len(raw)-4] + "AAAA"
		for range 2 {
			if _, digest, err := v.VerifyDigest(t.Context(), bad); !errors.Is(err, ErrInvalidToken) || digest != sha256.Sum256([]byte(bad)) {
				t.Fatalf("VerifyDigest of a forged token = %x, %v", digest, err)
			}
		}
		vd, ok := v.cache.Get(v.index(bad), time.Now().UnixNano())
		if !ok || vd.err == nil || vd.token != "" || vd.digest != sha256.Sum256([]byte(bad)) {
			t.Errorf("the refusal's entry: %v, token kept %v, digest %x", ok, vd.token != "", vd.digest)
		}
	})
}

// TestTokenVerifierTokensSharingAnIndex: the cache's index is a 64-bit keyed hash, which
// two tokens share by chance (here always, by a fault that makes every index 1): a
// token is never given the verdict of another, valid or refused, short or long.
func TestTokenVerifierTokensSharingAnIndex(t *testing.T) {
	o := testenv.SharedOP(t)
	long := func(sub string) string {
		c := o.AccessTokenClaims(sub, verifierResource)
		c["padding"] = strings.Repeat("p", maxKeptToken) // kept as a digest only
		return o.MintJWT(c)
	}
	short := func(sub string) string { return o.MintJWT(o.AccessTokenClaims(sub, verifierResource)) }
	for _, tc := range []struct {
		name string
		mint func(sub string) string
		kept bool
	}{{"short tokens, compared", short, true}, {"long tokens, their digests compared", long, false}} {
		t.Run(tc.name, func(t *testing.T) {
			v := newVerifierFor(o, nil)
			v.collide = func(string) uint64 { return 1 }
			alice, bob := tc.mint("alice"), tc.mint("bob")
			forged := alice[:len(alice)-4] + "AAAA"
			if kept := len(alice) <= maxKeptToken; kept != tc.kept {
				t.Fatalf("a token of %d bytes", len(alice))
			}
			for _, step := range []struct {
				raw, want string // want "" for a refusal
			}{
				{alice, "alice"}, {alice, "alice"}, // cold, then warm
				{bob, "bob"}, {bob, "bob"},
				{alice, "alice"},
				{forged, ""}, {forged, ""}, // a refusal now holds index 1
				{alice, "alice"}, {forged, ""},
			} {
				p, digest, err := v.VerifyDigest(t.Context(), step.raw)
				switch {
				case digest != sha256.Sum256([]byte(step.raw)):
					t.Fatalf("digest %x is not the token's SHA-256", digest)
				case step.want == "" && !errors.Is(err, ErrInvalidToken):
					t.Fatalf("forged token: %v, %v; want refused", p, err)
				case step.want != "" && (err != nil || p.Subject != step.want):
					t.Fatalf("%s's token: %v, %v", step.want, p, err)
				}
			}
		})
	}
}

func TestTokenVerifierIdPUnavailable(t *testing.T) {
	t.Run("IdP down before discovery is unavailable, not invalid", func(t *testing.T) {
		o := testenv.StartOP(t)
		raw := o.MintJWT(o.AccessTokenClaims(o.User.Subject, verifierResource))
		o.SetDown(true)
		v := newVerifierFor(o, nil)
		_, err := v.Verify(t.Context(), raw)
		if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrInvalidToken) {
			t.Fatalf("Verify = %v, want ErrUnavailable alone", err)
		}
		if strings.Contains(err.Error(), raw) {
			t.Errorf("error contains the token: %v", err)
		}
	})

	t.Run("introspection down is unavailable and not cached", func(t *testing.T) {
		o := testenv.StartOP(t)
		raw := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)
		v := newVerifierFor(o, nil)
		if _, err := v.cfg.Provider.Discovery(t.Context()); err != nil {
			t.Fatal(err)
		}
		o.SetDown(true)
		_, err := v.Verify(t.Context(), raw)
		if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrInvalidToken) {
			t.Fatalf("Verify = %v, want ErrUnavailable alone", err)
		}
		if strings.Contains(err.Error(), raw) {
			t.Errorf("error contains the token: %v", err)
		}
		o.SetDown(false)
		if _, err := v.Verify(t.Context(), raw); err != nil {
			t.Fatalf("Verify once the IdP is back = %v, want success", err)
		}
	})

	t.Run("JWKS down for an unknown kid is unavailable", func(t *testing.T) {
		o, clock, v, claims := startWithKnownKey(t)
		o.SetDown(true)
		clock.Advance(JWKSRefetchInterval)
		forged := testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, testenv.RandomKID(), claims())
		_, err := v.Verify(t.Context(), forged)
		if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrInvalidToken) {
			t.Fatalf("Verify = %v, want ErrUnavailable alone", err)
		}
		o.SetDown(false)
		clock.Advance(JWKSRefetchInterval)
		if _, err := v.Verify(t.Context(), forged); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("Verify once the IdP is back = %v, want ErrInvalidToken", err)
		}
	})

	t.Run("stalled introspection gives up at the client timeout", func(t *testing.T) {
		o := testenv.StartOP(t)
		raw := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)
		v := newVerifierFor(o, func(c *VerifierConfig) { c.HTTPClient = &http.Client{Timeout: 100 * time.Millisecond} })
		if _, err := v.cfg.Provider.Discovery(t.Context()); err != nil {
			t.Fatal(err)
		}
		o.SetLatency(5 * time.Second)
		start := time.Now()
		_, err := v.Verify(t.Context(), raw)
		if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrInvalidToken) {
			t.Fatalf("Verify = %v, want ErrUnavailable alone", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("Verify took %v against a stalled IdP", d)
		}
	})

	t.Run("known signing keys keep working while the IdP is down", func(t *testing.T) {
		o := testenv.StartOP(t)
		v := newVerifierFor(o, nil)
		claims := func() map[string]any { return o.AccessTokenClaims(o.User.Subject, verifierResource) }
		if _, err := v.Verify(t.Context(), o.MintJWT(claims())); err != nil {
			t.Fatal(err)
		}
		o.SetDown(true)
		if _, err := v.Verify(t.Context(), o.MintJWT(claims())); err != nil {
			t.Fatalf("Verify of a new token under a known kid = %v, want success", err)
		}
	})
}

func TestTokenVerifierSingleFlight(t *testing.T) {
	o := testenv.StartOP(t)
	raw := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)
	v := newVerifierFor(o, nil)
	if _, err := v.cfg.Provider.Discovery(t.Context()); err != nil {
		t.Fatal(err)
	}
	o.SetLatency(200 * time.Millisecond)
	const callers = 16
	var wg sync.WaitGroup
	principals := make([]*Principal, callers)
	errs := make([]error, callers)
	for i := range callers {
		wg.Go(func() { principals[i], errs[i] = v.Verify(t.Context(), raw) })
	}
	wg.Wait()
	for i := range callers {
		if errs[i] != nil || principals[i] != principals[0] {
			t.Fatalf("caller %d: %p, %v; want the shared principal %p", i, principals[i], errs[i], principals[0])
		}
	}
	if n := o.Count(testenv.CountIntrospect); n != 1 {
		t.Errorf("%d concurrent callers made %d introspection requests, want 1", callers, n)
	}
}

func TestTokenVerifierWaiterOutlivesCanceledLeader(t *testing.T) {
	o := testenv.StartOP(t)
	raw := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)
	// The verifier's client makes only the introspection request: its start is the
	// leader's flight under way.
	introspecting := make(chan struct{})
	var once sync.Once
	v := newVerifierFor(o, func(c *VerifierConfig) {
		c.HTTPClient = &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			once.Do(func() { close(introspecting) })
			return http.DefaultTransport.RoundTrip(r)
		})}
	})
	if _, err := v.cfg.Provider.Discovery(t.Context()); err != nil {
		t.Fatal(err)
	}
	o.SetLatency(300 * time.Millisecond)
	leaderCtx, cancel := context.WithCancel(t.Context())
	leaderDone := make(chan error, 1)
	go func() {
		_, err := v.Verify(leaderCtx, raw)
		leaderDone <- err
	}()
	// Let the leader start its introspection, then join it and cancel it.
	<-introspecting
	waiterDone := make(chan error, 1)
	go func() {
		_, err := v.Verify(t.Context(), raw)
		waiterDone <- err
	}()
	time.Sleep(50 * time.Millisecond)
	cancel()
	if err := <-leaderDone; !errors.Is(err, ErrUnavailable) {
		t.Errorf("canceled leader: %v, want ErrUnavailable", err)
	}
	if err := <-waiterDone; err != nil {
		t.Errorf("waiter: %v, want the verdict of the flight the leader left", err)
	}
}

func TestTokenVerifierDecodesScopeAndAudience(t *testing.T) {
	for _, tc := range []struct {
		name, in  string
		wantScope []string
		wantErr   bool
	}{
		{"space-separated string", `"a  b c"`, []string{"a", "b", "c"}, false},
		{"array", `["a","b"]`, []string{"a", "b"}, false},
		{"null", `null`, nil, false},
		{"number is refused", `7`, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var s ScopeList
			err := json.Unmarshal([]byte(tc.in), &s)
			if (err != nil) != tc.wantErr || !slices.Equal(s, tc.wantScope) {
				t.Errorf("ScopeList(%s) = %q, %v", tc.in, s, err)
			}
		})
	}
	var a Audience
	if err := json.Unmarshal([]byte(`"x"`), &a); err != nil || !slices.Equal(a, Audience{"x"}) {
		t.Errorf("Audience(string) = %q, %v", a, err)
	}
	if err := json.Unmarshal([]byte(`["x","y"]`), &a); err != nil || !slices.Equal(a, Audience{"x", "y"}) {
		t.Errorf("Audience(array) = %q, %v", a, err)
	}
}

// TestColdVerificationReadsTheClientAddressOnTheCallersGoroutine: a cold verification
// outlives a caller that leaves, so it must not read the caller's request context after
// that (Caddy's per-request variables, where the client address lives, are written on by
// Caddy once the handler has returned: a concurrent read is a fatal map race). The
// address is read before the caller waits.
func TestColdVerificationReadsTheClientAddressOnTheCallersGoroutine(t *testing.T) {
	o := testenv.StartOP(t)
	raw := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)
	fault := newFaultHoldDiscovery()
	var returned, readLate atomic.Bool
	v := newVerifierFor(o, func(c *VerifierConfig) {
		c.Provider = NewProvider(ProviderConfig{Issuer: o.Issuer, HTTPClient: &http.Client{Transport: fault}})
		c.ClientIP = func(context.Context) string {
			if returned.Load() {
				readLate.Store(true)
			}
			return "192.0.2.7"
		}
	})
	release := fault.hold()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		_, err := v.Verify(ctx, raw)
		done <- err
	}()
	<-fault.arrived
	cancel()
	if err := <-done; !errors.Is(err, ErrUnavailable) {
		t.Fatalf("caller that left: %v, want ErrUnavailable", err)
	}
	returned.Store(true)
	release()
	// The flight goes on without its caller and caches its verdict.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := v.lookup(v.index(raw), raw, time.Now().UnixNano()); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the detached verification cached no verdict")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if readLate.Load() {
		t.Error("the verification read the caller's context after the caller had returned")
	}
}

// TestColdVerificationTimeoutIsConfigured: one cold verification is bounded by
// VerifierConfig.Timeout (the broker passes a multiple of idp_timeout), not by a fixed
// constant: an IdP slower than the bound answers unavailable, one within it is waited for.
func TestColdVerificationTimeoutIsConfigured(t *testing.T) {
	o := testenv.StartOP(t)
	raw := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)
	slowIntrospection := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		select {
		case <-time.After(300 * time.Millisecond):
		case <-r.Context().Done():
			return nil, r.Context().Err()
		}
		return http.DefaultTransport.RoundTrip(r)
	})}
	for _, tc := range []struct {
		name    string
		timeout time.Duration
		wantErr error
	}{
		{"an IdP slower than the bound is unavailable", 100 * time.Millisecond, ErrUnavailable},
		{"an IdP within the bound is waited for", 5 * time.Second, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newVerifierFor(o, func(c *VerifierConfig) {
				c.HTTPClient = slowIntrospection
				c.Timeout = tc.timeout
			})
			if _, err := v.cfg.Provider.Discovery(t.Context()); err != nil {
				t.Fatal(err)
			}
			_, err := v.Verify(t.Context(), raw)
			if (tc.wantErr == nil) != (err == nil) || (tc.wantErr != nil && !errors.Is(err, tc.wantErr)) {
				t.Errorf("Verify: %v, want %v", err, tc.wantErr)
			}
		})
	}
}
