package flows

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// One test per row W1–W19 of SECURITY.md: the weakness of the Python original, and a
// proof that this broker does what the row says instead. Each test asserts the behaviour
// itself, compactly, and names the tests that cover it thoroughly. The Caddy half of W18
// is e2e/lessons_test.go.

// lessonTokens is a tokenEnv around a hybrid front, for its token endpoint helpers
// (exchange, refresh, post, mcpStatus).
func lessonTokens(o *testenv.OP, b *Broker, front *httptest.Server) *tokenEnv {
	return &tokenEnv{o: o, b: b, front: front}
}

// lessonLogin runs a whole hybrid login of the native client through e's front (consent,
// the OP's login form, the callback) and redeems the broker's code at /oauth/token.
func lessonLogin(t *testing.T, e *tokenEnv, scopes []string, opts ...testenv.LoginOption) TokenResponse {
	t.Helper()
	verifier := oauth2.GenerateVerifier()
	code := hybridLogin(t, e.front, e.o, testenv.NativeClientID, tokenTestRedirect, verifier, scopes, opts...)
	return e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)
}

// initStatus is the status of an MCP initialize request through front with token.
func initStatus(t *testing.T, front *httptest.Server, token string) int {
	t.Helper()
	return (&tokenEnv{front: front}).mcpStatus(t, token)
}

// W1. Weakness: redirect_uri was checked by the prefix "http://localhost:", so
// http://localhost:@evil.com/cb passed and the code went to evil.com. Instead the URI is
// parsed: https, or http on a loopback host (127.0.0.1, [::1], localhost) with at most a
// numeric port; no userinfo, no fragment; equal to a registered URI apart from a loopback
// port. A refused URI never gets a redirect, in either mode, and cannot be registered.
// Thorough: TestCheckRedirectURI, TestMatchRedirectURI, TestAuthorizeHybridRefusalsBeforeTrust,
// TestAuthorizeProgressiveRefusals, TestRegisterRefusals.
func TestLessonW1RedirectURIsAreParsed(t *testing.T) {
	o := testenv.SharedOP(t)
	progressive := startFront(t, newTestBroker(t, o, nil), "")
	_, hybrid := startHybridFront(t, o, "", func(c *Config) { c.Registration = true })
	// The native client registered http://127.0.0.1/callback and https://app.example.com/cb.
	modes := []struct {
		name  string
		front *httptest.Server
		query func(func(url.Values)) url.Values
	}{
		{"progressive", progressive, authorizeQuery},
		{"hybrid", hybrid, hybridQuery},
	}
	malformed := []string{ // refused by their form, wherever they come
		"http://localhost:@evil.com/cb",
		"http://localhost:@127.0.0.1/callback",
		"http://127.0.0.1.evil.com/callback",
		"http://localhost:abc/callback",
		"http://localhost:/callback",
		"https://app.example.com/cb#x",
		"http://app.example.com/cb",
	}
	unregistered := []string{ // well-formed, but no registered URI of the client
		"https://app.example.com/cb/evil",
		"https://app.example.com.evil.com/cb",
		"https://app.example.com:8443/cb",
		"http://127.0.0.1:49152/callback?next=https://evil.com",
		"http://127.0.0.1:49152/other",
	}
	accepted := []string{
		"http://127.0.0.1:49152/callback", // the registered loopback URI on another port
		"https://app.example.com/cb",      // exactly as registered
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			for _, uri := range append(malformed, unregistered...) {
				resp := authorize(t, m.front.URL, m.query(func(q url.Values) { q.Set("redirect_uri", uri) }))
				var e oauthError
				decodeJSON(t, resp, &e)
				if loc := resp.Header.Get("Location"); loc != "" || resp.StatusCode/100 != 4 || e.Error == "" {
					t.Errorf("%s: %s %+v, redirected to %q", uri, resp.Status, e, loc)
				}
			}
			for _, uri := range accepted {
				resp := authorize(t, m.front.URL, m.query(func(q url.Values) { q.Set("redirect_uri", uri) }))
				if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusFound || loc == "" || strings.HasPrefix(loc, uri) {
					t.Errorf("%s: %s to %q, want the login to go on", uri, resp.Status, loc)
				}
			}
		})
	}
	t.Run("registration", func(t *testing.T) {
		for _, uri := range malformed {
			resp := do(t, http.MethodPost, hybrid.URL+pathRegister, http.Header{"Content-Type": {"application/json"}},
				`{"redirect_uris":["`+uri+`"],"token_endpoint_auth_method":"none"}`)
			var e oauthError
			decodeJSON(t, resp, &e)
			if resp.StatusCode != http.StatusBadRequest || e.Error != "invalid_redirect_uri" {
				t.Errorf("%s: %s %+v", uri, resp.Status, e)
			}
		}
	})
}

// idTokenForger passes everything to the real OP and, while forge is set, replaces the
// id_token of the OP's token responses with forge's (a fault: an IdP answer tampered
// with on the way).
type idTokenForger struct {
	tokenPath string

	mu     sync.Mutex
	forge  func(header, payload, signature string) (string, error)
	forged int
	err    error
}

func (f *idTokenForger) set(forge func(header, payload, signature string) (string, error)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.forge, f.forged, f.err = forge, 0, nil
}

// result tells how many ID tokens were forged since set, and the first failure to forge.
func (f *idTokenForger) result() (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.forged, f.err
}

func (f *idTokenForger) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := http.DefaultTransport.RoundTrip(r)
	f.mu.Lock()
	forge := f.forge
	f.mu.Unlock()
	if err != nil || forge == nil || r.URL.Path != f.tokenPath || resp.StatusCode != http.StatusOK {
		return resp, err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, err
	}
	raw, _ := m["id_token"].(string)
	parts := strings.Split(raw, ".")
	forged, ferr := "", errors.New("the OP's answer holds no compact id_token")
	if len(parts) == 3 {
		forged, ferr = forge(parts[0], parts[1], parts[2])
	}
	f.mu.Lock()
	f.forged++
	if ferr != nil && f.err == nil {
		f.err = ferr
	}
	f.mu.Unlock()
	m["id_token"] = forged
	body, _ = json.Marshal(m)
	resp.Body = io.NopCloser(bytes.NewReader(body))
	resp.ContentLength = int64(len(body))
	resp.Header.Del("Content-Length")
	return resp, nil
}

// W2. Weakness: ID tokens and access tokens were decoded without checking signatures,
// so a forged JWT with aud "mcp-server" logged in as anyone. Instead every JWT is
// verified against the IdP's JWKS (and issuer, audience, expiry; the ID token's nonce):
// here the MCP endpoint refuses forged access tokens that the broker would accept if
// they were signed by the IdP, hybrid mode accepts no IdP token at all, and a login
// whose ID token was forged on the way from the IdP ends without a session.
// Thorough: TestTokenVerifierRefusesInvalidTokens, TestRefusedTokensGet401,
// TestCallbackExchangeFailures (nonce, mix-up), TestTokenVerifierFetchesJWKSOnceForAnUnknownKid.
func TestLessonW2SignaturesAreVerified(t *testing.T) {
	o := testenv.SharedOP(t)
	opKey := o.SigningKey()
	claims := func() map[string]any { return o.AccessTokenClaims(o.User.Subject, "mcp-server") }

	t.Run("forged access tokens at the MCP endpoint", func(t *testing.T) {
		up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
		b := newTestBroker(t, o, func(c *Config) { c.Audience = []string{"mcp-server"} })
		clock := &testenv.Clock{}
		b.useIdPClocks(nil, clock.Now)
		front := startFront(t, b, up.URL)
		genuine := o.MintJWT(claims())
		if st := initStatus(t, front, genuine); st != http.StatusOK {
			t.Fatalf("the control, signed by the IdP: %d", st)
		}
		// The new kid gets its JWKS fetch, not "retry later" (TestJWKSRefetchAtMostEvery30s).
		clock.Advance(idp.JWKSRefetchInterval)
		h, rest, _ := strings.Cut(genuine, ".")
		_, sig, _ := strings.Cut(rest, ".")
		other := claims()
		other["sub"] = o.OtherUser.Subject
		otherJSON, _ := json.Marshal(other)
		for name, forged := range map[string]string{
			"signed by a key the IdP never published, under the IdP's kid": testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, opKey.KeyID, claims()),
			"signed by a key the IdP never published, under a new kid":     testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, testenv.RandomKID(), claims()),
			"alg none": testenv.CompactJWS(t, map[string]any{"alg": "none", "typ": "JWT", "kid": opKey.KeyID}, claims(), nil),
			"another subject under the IdP's signature": h + "." + base64.RawURLEncoding.EncodeToString(otherJSON) + "." + sig,
		} {
			up.Reset()
			if st := initStatus(t, front, forged); st != http.StatusUnauthorized || len(up.Seen()) != 0 {
				t.Errorf("%s: %d, upstream saw %d", name, st, len(up.Seen()))
			}
		}
	})

	t.Run("hybrid mode takes no token of the IdP, even a genuine one", func(t *testing.T) {
		_, front := startHybridFront(t, o, "", func(c *Config) { c.Audience = []string{"mcp-server"} })
		for _, aud := range []string{"mcp-server", front.URL + "/mcp"} {
			if st := initStatus(t, front, o.MintJWT(o.AccessTokenClaims(o.User.Subject, aud))); st != http.StatusUnauthorized {
				t.Errorf("the IdP's JWT for %s: %d", aud, st)
			}
		}
	})

	t.Run("forged ID tokens at the hybrid callback", func(t *testing.T) {
		tokenURL, err := url.Parse(o.TokenEndpoint)
		if err != nil {
			t.Fatal(err)
		}
		forger := &idTokenForger{tokenPath: tokenURL.Path}
		b, front := startHybridFront(t, o, "", func(c *Config) { c.HTTPClient = &http.Client{Transport: forger, Timeout: 10 * time.Second} })
		attacker := testenv.AttackerKey()
		kidOf := func(header string) (string, error) {
			raw, err := base64.RawURLEncoding.DecodeString(header)
			if err != nil {
				return "", err
			}
			var h struct {
				KID string `json:"kid"`
			}
			return h.KID, json.Unmarshal(raw, &h)
		}
		for _, tc := range []struct {
			name  string
			forge func(header, payload, signature string) (string, error)
		}{
			{"the same claims signed by a key the IdP never published, under its kid", func(header, payload, _ string) (string, error) {
				kid, err := kidOf(header)
				if err != nil {
					return "", err
				}
				claims, err := base64.RawURLEncoding.DecodeString(payload)
				if err != nil {
					return "", err
				}
				signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: jose.JSONWebKey{Key: attacker, KeyID: kid}},
					(&jose.SignerOptions{}).WithType("JWT"))
				if err != nil {
					return "", err
				}
				jws, err := signer.Sign(claims)
				if err != nil {
					return "", err
				}
				return jws.CompactSerialize()
			}},
			{"the same claims with alg none", func(header, payload, _ string) (string, error) {
				kid, err := kidOf(header)
				h, _ := json.Marshal(map[string]string{"alg": "none", "typ": "JWT", "kid": kid})
				return base64.RawURLEncoding.EncodeToString(h) + "." + payload + ".", err
			}},
			{"another subject under the IdP's signature", func(header, payload, signature string) (string, error) {
				raw, err := base64.RawURLEncoding.DecodeString(payload)
				if err != nil {
					return "", err
				}
				var c map[string]any
				if err := json.Unmarshal(raw, &c); err != nil {
					return "", err
				}
				c["sub"] = o.OtherUser.Subject
				raw, err = json.Marshal(c)
				return header + "." + base64.RawURLEncoding.EncodeToString(raw) + "." + signature, err
			}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				forger.set(tc.forge)
				defer forger.set(nil)
				br := newHybridBrowser(t)
				final := br.redirect(br.get(startLogin(t, br, front.URL, o, hybridQuery(nil)).String()))
				if forged, ferr := forger.result(); forged != 1 || ferr != nil {
					t.Fatalf("%d ID tokens forged: %v", forged, ferr)
				}
				if q := final.Query(); q.Get("error") != "server_error" || q.Has("code") {
					t.Errorf("the client got %v", q)
				}
				if n := len(sessions(t, b)); n != 0 {
					t.Errorf("%d sessions", n)
				}
			})
		}
		// The control: the same broker and login with the OP's own ID token.
		if code := hybridLogin(t, front, o, testenv.NativeClientID, tokenTestRedirect, hybridVerifier, nil); code == "" {
			t.Error("no code for the untouched login")
		}
	})
}

// W3. Weakness: the PKCE verifier was compared with !=. Instead the S256 of the verifier
// is compared with the stored challenge in constant time (crypto/subtle, through the
// broker's constantTimeCompare, which client secrets go through too): a wrong verifier is
// invalid_grant and spends the code. Thorough: TestPKCE, TestCodeExchange.
func TestLessonW3PKCEIsComparedInConstantTime(t *testing.T) {
	var compares atomic.Int32
	counting := func(x, y []byte) int { compares.Add(1); return subtle.ConstantTimeCompare(x, y) }
	e := newTokenEnv(t, testenv.SharedOP(t), nil)
	e.b.constantTimeCompare = counting // before the first request

	code, verifier := e.code(t, testenv.NativeClientID)
	before := compares.Load()
	e.exchange(t, testenv.NativeClientID, code, oauth2.GenerateVerifier(), nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	if compares.Load() == before {
		t.Error("the wrong verifier was not compared in constant time")
	}
	e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")

	code, verifier = e.code(t, testenv.NativeClientID)
	before = compares.Load()
	e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)
	if compares.Load() == before {
		t.Error("the right verifier was not compared in constant time")
	}

	before = compares.Load()
	near := verifier[:len(verifier)-1] + string(verifier[len(verifier)-1]^1)
	if pkceMatches(counting, "S256", oauth2.S256ChallengeFromVerifier(verifier), near) {
		t.Error("a verifier one bit off matches")
	}
	if n := compares.Load() - before; n != 1 {
		t.Errorf("pkceMatches made %d constant-time compares, want 1", n)
	}
}

// W4. Weakness: IdP tokens sat in plaintext session rows; one key, no rotation, and a
// ciphertext was not bound to its row. Instead the IdP grant is sealed with AES-256-GCM
// with the record's storage key as associated data, under a key ring whose newest key
// seals and whose every key opens. Thorough: storage/seal_test.go, TestHybridLogin.
func TestLessonW4IdPTokensAreSealedAtRest(t *testing.T) {
	o := testenv.SharedOP(t)
	dir := t.TempDir()
	oldKey, newKey := bytes.Repeat([]byte{1}, storage.KeySize), bytes.Repeat([]byte{2}, storage.KeySize)
	recordsWith := func(keys ...[]byte) func(*Config) {
		return func(c *Config) {
			c.Mode = ModeHybrid
			ring, err := storage.NewKeyRing(keys...)
			if err != nil {
				t.Fatal(err)
			}
			c.Records = storage.New(&certmagic.FileStorage{Path: dir}, ring)
		}
	}
	b, front := startHybridFront(t, o, "", recordsWith(oldKey))
	hybridLogin(t, front, o, testenv.NativeClientID, tokenTestRedirect, hybridVerifier, nil)
	ss := sessions(t, b)
	if len(ss) != 1 {
		t.Fatalf("%d sessions", len(ss))
	}
	s := ss[0]
	g, err := b.sessions.grant(&s)
	if err != nil || g.AccessToken == "" || g.RefreshToken == "" || g.IDToken == "" {
		t.Fatalf("grant %v: %v", g.AccessToken != "", err)
	}

	t.Run("no file of the storage holds an IdP token", func(t *testing.T) {
		raw, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(sessionKey(s.ID))))
		if err != nil || !bytes.Contains(raw, []byte(`"subject":"`+s.Subject+`"`)) || !bytes.Contains(raw, []byte(s.Grant)) {
			t.Fatalf("the session record on disk: %v %.200s", err, raw)
		}
		files := 0
		err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			files++
			raw, err := os.ReadFile(path)
			for name, secret := range map[string]string{"access token": g.AccessToken, "refresh token": g.RefreshToken, "ID token": g.IDToken} {
				if bytes.Contains(raw, []byte(secret)) {
					t.Errorf("%s holds the IdP %s in plaintext", path, name)
				}
			}
			return err
		})
		if err != nil || files == 0 {
			t.Fatalf("walking the storage: %d files, %v", files, err)
		}
	})

	t.Run("the sealed grant copied into another session's record does not open", func(t *testing.T) {
		stolen := Session{ID: randomToken(), Subject: o.OtherUser.Subject, ClientID: s.ClientID, Scopes: s.Scopes, Grant: s.Grant, CreatedAt: s.CreatedAt}
		if err := b.cfg.Records.Put(t.Context(), sessionKey(stolen.ID), stolen, time.Hour); err != nil {
			t.Fatal(err)
		}
		loaded, err := b.sessions.load(t.Context(), stolen.ID)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.sessions.grant(loaded); !errors.Is(err, storage.ErrUnsealable) {
			t.Errorf("opening the copy: %v, want ErrUnsealable", err)
		}
	})

	t.Run("key rotation: [new, old] opens and seals with new; [new] alone opens only that", func(t *testing.T) {
		rotated := newTestBroker(t, o, recordsWith(newKey, oldKey))
		newOnly := newTestBroker(t, o, recordsWith(newKey))
		got, err := rotated.sessions.grant(&s)
		if err != nil || got.RefreshToken != g.RefreshToken {
			t.Fatalf("the ring [new, old] opens the grant: %v", err)
		}
		if _, err := newOnly.sessions.grant(&s); !errors.Is(err, storage.ErrUnsealable) {
			t.Fatalf("the ring [new] opened a grant sealed under old: %v", err)
		}
		if err := rotated.sessions.rotateGrant(t.Context(), &s, got); err != nil {
			t.Fatal(err)
		}
		resealed, err := newOnly.sessions.load(t.Context(), s.ID)
		if err != nil {
			t.Fatal(err)
		}
		if again, err := newOnly.sessions.grant(resealed); err != nil || again.RefreshToken != g.RefreshToken {
			t.Errorf("the ring [new] opens what [new, old] sealed: %v", err)
		}
	})
}

// W5. Weakness: the offline access login's state was chosen by the caller and never checked; no PKCE, no
// nonce; the result was stored under whoever logged in. Instead offline access starts only for
// an authenticated user, with a random single-use state of the broker's, PKCE S256 and a
// nonce, and the ID token's sub must be the user who started it.
// Thorough: TestOfflineAccessStart, TestOfflineAccessCallback.
func TestLessonW5OfflineAccessIsBoundToTheUser(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	token := f.userToken(t, o.User)

	if resp := get(t, f.front.URL+pathOfflineAccessStart, nil); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("start without a token: %s", resp.Status)
	}
	to := redirectTarget(t, getWithoutRedirect(t, f.link(t, token)+"&state=attacker-state"))
	q := to.Query()
	if q.Get("state") == "attacker-state" || len(q.Get("state")) < 43 || len(q.Get("nonce")) < 43 ||
		q.Get("code_challenge_method") != "S256" || len(q.Get("code_challenge")) != 43 {
		t.Errorf("the IdP request: state %q nonce %q PKCE %s %q", q.Get("state"), q.Get("nonce"), q.Get("code_challenge_method"), q.Get("code_challenge"))
	}
	callback := func(q url.Values) int {
		return getWithoutRedirect(t, f.front.URL+OfflineAccessCallbackLegacy+"?"+q.Encode()).StatusCode
	}
	if st := callback(url.Values{"state": {"attacker-state"}, "code": {"x"}}); st != http.StatusBadRequest {
		t.Errorf("a state the broker never issued: %d", st)
	}
	// This login's code under the state of the one above: the PKCE verifiers differ.
	other := f.loginAt(t, f.link(t, token))
	if st := callback(url.Values{"state": {q.Get("state")}, "code": {other.Query().Get("code")}}); st != http.StatusBadGateway {
		t.Errorf("a code of another login: %d", st)
	}
	if resp, page := f.callback(t, f.loginAt(t, f.link(t, token), testenv.LoginAs(o.OtherUser))); resp.StatusCode != http.StatusForbidden {
		t.Errorf("a login as another user: %s %s", resp.Status, page)
	}
	for _, sub := range []string{o.User.Subject, o.OtherUser.Subject} {
		if _, _, err := f.grant(t, sub); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("a grant of %s is stored: %v", sub, err)
		}
	}
	cb := f.loginAt(t, f.link(t, token))
	if resp, page := f.callback(t, cb); resp.StatusCode != http.StatusOK {
		t.Fatalf("the user's own login: %s %s", resp.Status, page)
	}
	if resp, _ := f.callback(t, cb); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("the state replayed: %s", resp.Status)
	}
	if g, _, err := f.grant(t, o.User.Subject); err != nil || g.Subject != o.User.Subject {
		t.Errorf("the user's grant: %+v %v", g, err)
	}
}

// W6. Weakness: OIDC discovery was fetched on every request. Instead discovery and the
// JWKS are cached (go-oidc's provider and remote key set): many requests cost one
// discovery and one JWKS fetch; an unknown kid costs one JWKS refetch; discovery is
// fetched again only after idp.DiscoveryMaxAge.
// Thorough: TestAuthorizeProgressivePublicIssuer, TestTokenVerifierFetchesJWKSOnceForAnUnknownKid.
func TestLessonW6DiscoveryAndKeysAreCached(t *testing.T) {
	o := testenv.SharedOP(t)
	jwksURL, err := url.Parse(o.JWKSURI)
	if err != nil {
		t.Fatal(err)
	}
	var discoveries, jwks atomic.Int32
	counting := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		switch r.URL.Path {
		case "/.well-known/openid-configuration":
			discoveries.Add(1)
		case jwksURL.Path:
			jwks.Add(1)
		}
		return http.DefaultTransport.RoundTrip(r)
	})}
	clock := &testenv.Clock{}
	b := newTestBroker(t, o, func(c *Config) { c.HTTPClient = counting })
	keysClock := &testenv.Clock{} // apart: tokens are minted on the real clock
	b.useIdPClocks(clock.Now, keysClock.Now)
	front := startFront(t, b, testenv.StartUpstream(t, testenv.TrustedSubjectHeader()).URL)
	traffic := func() {
		t.Helper()
		for range 4 {
			if st := initStatus(t, front, o.MintJWT(o.AccessTokenClaims(o.User.Subject, testResource))); st != http.StatusOK {
				t.Fatalf("a valid token: %d", st)
			}
			if resp := authorize(t, front.URL, authorizeQuery(nil)); resp.StatusCode != http.StatusFound {
				t.Fatalf("authorize: %s", resp.Status)
			}
		}
	}

	traffic()
	if d, k := discoveries.Load(), jwks.Load(); d != 1 || k != 1 {
		t.Errorf("8 requests fetched discovery %d times and the JWKS %d times, want 1 and 1", d, k)
	}
	forged := testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, testenv.RandomKID(), o.AccessTokenClaims(o.User.Subject, testResource))
	keysClock.Advance(idp.JWKSRefetchInterval) // an unknown kid is looked up at most once per 30 s
	for range 3 {
		if st := initStatus(t, front, forged); st != http.StatusUnauthorized {
			t.Fatalf("forged token: %d", st)
		}
	}
	if k := jwks.Load(); k != 2 {
		t.Errorf("an unknown kid presented 3 times: %d JWKS fetches in all, want 2", k)
	}
	clock.Advance(idp.DiscoveryMaxAge + time.Minute)
	traffic() // served the last good document while a new one is fetched in the background
	for deadline := time.Now().Add(10 * time.Second); discoveries.Load() < 2 && time.Now().Before(deadline); {
		runtime.Gosched()
	}
	traffic()
	if d := discoveries.Load(); d != 2 {
		t.Errorf("after idp.DiscoveryMaxAge: %d discovery fetches in all, want 2", d)
	}
}

// W7. Weakness: the IdP's access token was handed to the MCP client, expires_in was
// hard-coded 3600, and there was no refresh grant. Instead the client gets the broker's
// own opaque tokens with the configured lifetime, and a refresh grant that rotates, with
// reuse detection. Thorough: TestCodeExchange, TestRefreshGrant, TestHybridLogin.
func TestLessonW7ClientsGetBrokerTokens(t *testing.T) {
	o := testenv.SharedOP(t)
	clock := &testenv.Clock{}
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	b, front := startHybridFrontWith(t, o, up.URL, func(c *Config) { c.AccessTokenTTL = 17 * time.Minute },
		func(b *Broker) { b.now = clock.Now })
	e := lessonTokens(o, b, front)
	tok := lessonLogin(t, e, nil)
	_, g := onlySession(t, b)

	if !strings.HasPrefix(tok.AccessToken, accessTokenPrefix) || idp.LooksLikeJWS(tok.AccessToken) ||
		tok.AccessToken == g.AccessToken || tok.RefreshToken == "" || tok.RefreshToken == g.RefreshToken {
		t.Errorf("the client got no broker tokens, or the IdP's")
	}
	if _, err := newVerifierFor(o, func(c *idp.VerifierConfig) { c.Audiences = []string{front.URL + "/mcp"} }).Verify(t.Context(), tok.AccessToken); !errors.Is(err, idp.ErrInvalidToken) {
		t.Errorf("the IdP's verifier on the broker's token: %v, want idp.ErrInvalidToken", err)
	}
	if want := int64(17 * 60); tok.ExpiresIn != want || tok.TokenType != "Bearer" {
		t.Errorf("expires_in %d %q, want %d Bearer", tok.ExpiresIn, tok.TokenType, want)
	}
	if st := initStatus(t, front, tok.AccessToken); st != http.StatusOK {
		t.Errorf("the broker's access token at the MCP endpoint: %d", st)
	}
	if st := initStatus(t, front, g.AccessToken); st != http.StatusUnauthorized {
		t.Errorf("the IdP's access token at the MCP endpoint: %d", st)
	}

	next := e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
	if next.AccessToken == tok.AccessToken || next.RefreshToken == tok.RefreshToken || next.ExpiresIn != tok.ExpiresIn {
		t.Errorf("the refresh did not rotate, or changed the lifetime to %d", next.ExpiresIn)
	}
	if st := initStatus(t, front, next.AccessToken); st != http.StatusOK {
		t.Errorf("the refreshed access token: %d", st)
	}
	clock.Advance(b.cfg.RefreshGrace + time.Second)
	e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	if st := initStatus(t, front, next.AccessToken); st != http.StatusUnauthorized {
		t.Errorf("the family after a reused refresh token: %d, want 401", st)
	}
}

// W8. Weakness: offline access tools took a user_id argument, so one user could read or
// revoke another's access. Instead the user is always the authenticated subject: user_id
// or subject parameters are ignored. Thorough: TestOfflineAccessStatusAndRevocation,
// TestOfflineAccessStart.
func TestLessonW8TheUserIsNeverAParameter(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	alice, bob := f.userToken(t, o.User), f.userToken(t, o.OtherUser)
	if resp, page := f.callback(t, f.loginAt(t, f.link(t, bob), testenv.LoginAs(o.OtherUser))); resp.StatusCode != http.StatusOK {
		t.Fatalf("bob grants offline access: %s %s", resp.Status, page)
	}
	asBob := "?user_id=" + o.OtherUser.Subject + "&subject=" + o.OtherUser.Subject
	status := func(method, token string) OfflineAccessStatus {
		t.Helper()
		resp := do(t, method, f.front.URL+pathOfflineAccessStatus+asBob, bearer(token), "")
		var st OfflineAccessStatus
		decodeJSON(t, resp, &st)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %s", method, resp.Status)
		}
		return st
	}

	if st := status(http.MethodGet, alice); st.Granted {
		t.Errorf("alice reads bob's status: %+v", st)
	}
	revokes := o.Count(testenv.CountRevoke)
	status(http.MethodDelete, alice)
	if _, _, err := f.grant(t, o.OtherUser.Subject); err != nil || o.Count(testenv.CountRevoke) != revokes {
		t.Errorf("alice revoked bob's grant: %v, %d IdP revocations", err, o.Count(testenv.CountRevoke)-revokes)
	}
	if st := status(http.MethodGet, bob); !st.Granted {
		t.Errorf("bob's own status: %+v", st)
	}
	link, err := url.Parse(f.link(t, alice) + "&" + asBob[1:])
	if err != nil {
		t.Fatal(err)
	}
	var l OfflineAccessLink
	if err := f.b.cfg.Records.Get(t.Context(), recordKey(kindOfflineAccessLink, link.Query().Get("link")), &l); err != nil || l.Subject != o.User.Subject {
		t.Errorf("a link minted by alice for %q: %v", l.Subject, err)
	}
}

// W9. Weakness: per-tool scope checks never ran on tools/call. Instead every tools/call,
// alone or in a batch, is checked against the tool's scopes before it reaches the
// upstream: 403 insufficient_scope with the step-up challenge. In both modes: the IdP's
// token (progressive) and the broker's (hybrid). Thorough: TestToolScopes.
func TestLessonW9ScopesAreEnforcedOnEveryToolCall(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	readOnly := []string{"openid", "notes:read"}
	progressive := startFront(t, newTestBroker(t, o, nil), up.URL)
	b, hybrid := startHybridFront(t, o, up.URL, nil)
	modes := []struct {
		name  string
		front *httptest.Server
		token string
	}{
		{"progressive, the IdP's token", progressive, o.LoginAccessToken(t, testenv.NativeClientID, "", readOnly, testResource)},
		{"hybrid, the broker's token", hybrid, lessonLogin(t, lessonTokens(o, b, hybrid), readOnly).AccessToken},
	}
	const (
		read  = `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read"}}`
		write = `{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}`
	)
	calls := []struct {
		name, body string
		refused    bool
	}{
		{"the write tool alone", write, true},
		{"a batch hiding the write tool after a read", "[" + read + "," + write + "]", true},
		{"the tool name with a JSON escape", strings.Replace(write, "notes_write", `notes\u005fwrite`, 1), true},
		{"the method with a JSON escape", strings.Replace(write, "tools/call", `tools\/call`, 1), true},
		{"a second name key in another case", strings.Replace(write, `"arguments"`, `"Name":"notes_read","arguments"`, 1), true},
		{"a second name key", strings.Replace(write, `"arguments"`, `"name":"notes_read","arguments"`, 1), true},
		{"the params key with a long s", strings.Replace(write, `"params"`, `"paramſ"`, 1), true},
		{"the read tool", read, false},
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			for _, c := range calls {
				up.Reset()
				h := bearer(m.token)
				h.Set("Content-Type", "application/json")
				h.Set("Accept", "application/json, text/event-stream")
				resp := do(t, http.MethodPost, m.front.URL+"/mcp", h, c.body)
				if !c.refused {
					if resp.StatusCode == http.StatusForbidden || len(up.Seen()) != 1 {
						t.Errorf("%s: %s, upstream saw %d", c.name, resp.Status, len(up.Seen()))
					}
					continue
				}
				var e oauthError
				body, _ := io.ReadAll(resp.Body)
				_ = json.Unmarshal(body, &e)
				if resp.StatusCode != http.StatusForbidden || e.Error != "insufficient_scope" || len(up.Seen()) != 0 ||
					!strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="insufficient_scope", scope="openid notes:read notes:write"`) {
					t.Errorf("%s: %s %+v %q, upstream saw %d", c.name, resp.Status, e, resp.Header.Get("WWW-Authenticate"), len(up.Seen()))
				}
			}
		})
	}
}

// W10. Weakness: a userinfo fallback accepted tokens that failed the audience check, and
// results were cached an hour. Instead there is no fallback (the OP's userinfo endpoint is
// never asked) and a cached verdict never outlives the token it is about.
// Thorough: TestTokenVerifierCache, TestVerifyBrokerToken, TestRefusedTokensGet401.
func TestLessonW10NoFallbackSkipsChecks(t *testing.T) {
	t.Run("a token for another audience is refused without asking userinfo", func(t *testing.T) {
		o := testenv.StartOP(t)
		up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
		front := startFront(t, newTestBroker(t, o, nil), up.URL)
		for name, tok := range map[string]string{
			"a real login's JWT, issued to its client for itself":      o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid"}),
			"a JWT the IdP signed for mcp-server":                      o.MintJWT(o.AccessTokenClaims(o.User.Subject, "mcp-server")),
			"a real login's opaque token, issued to its client itself": o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}),
		} {
			if st := initStatus(t, front, tok); st != http.StatusUnauthorized {
				t.Errorf("%s: %d", name, st)
			}
		}
		if n := o.Count(testenv.CountUserinfo); n != 0 || len(up.Seen()) != 0 {
			t.Errorf("userinfo asked %d times, upstream saw %d", n, len(up.Seen()))
		}
	})

	t.Run("a cached verdict on the IdP's token ends with the token", func(t *testing.T) {
		o := testenv.SharedOP(t)
		clock := &testenv.Clock{}
		b := newTestBroker(t, o, nil)
		b.useIdPClocks(nil, clock.Now)
		front := startFront(t, b, testenv.StartUpstream(t, testenv.TrustedSubjectHeader()).URL)
		c := o.AccessTokenClaims(o.User.Subject, testResource)
		c["exp"] = time.Now().Add(2 * time.Minute).Unix()
		tok := o.MintJWT(c)
		if st := initStatus(t, front, tok); st != http.StatusOK {
			t.Fatalf("before exp: %d", st)
		}
		clock.Advance(2*time.Minute + idp.DefaultLeeway + time.Second)
		if st := initStatus(t, front, tok); st != http.StatusUnauthorized {
			t.Errorf("after exp: %d, want 401", st)
		}
	})

	t.Run("a cached verdict on the broker's token ends with the token", func(t *testing.T) {
		e := newTokenEnv(t, testenv.SharedOP(t), func(c *Config) { c.AccessTokenTTL = time.Minute })
		tok := e.login(t)
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
			t.Fatalf("before expiry: %d", st)
		}
		e.clock.Advance(time.Minute)
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("at expiry: %d, want 401", st)
		}
	})
}

// failingStorage is file storage that fails on demand with an internal-looking error (a
// fault: a disk gone bad).
type failingStorage struct {
	certmagic.Storage
	fail atomic.Bool
	text string
}

func (s *failingStorage) failure() error {
	if s.fail.Load() {
		return errors.New(s.text)
	}
	return nil
}

func (s *failingStorage) Store(ctx context.Context, key string, value []byte) error {
	if err := s.failure(); err != nil {
		return err
	}
	return s.Storage.Store(ctx, key, value)
}

func (s *failingStorage) Load(ctx context.Context, key string) ([]byte, error) {
	if err := s.failure(); err != nil {
		return nil, err
	}
	return s.Storage.Load(ctx, key)
}

func (s *failingStorage) Delete(ctx context.Context, key string) error {
	if err := s.failure(); err != nil {
		return err
	}
	return s.Storage.Delete(ctx, key)
}

func (s *failingStorage) Exists(ctx context.Context, key string) bool {
	return s.failure() == nil && s.Storage.Exists(ctx, key)
}

func (s *failingStorage) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	if err := s.failure(); err != nil {
		return nil, err
	}
	return s.Storage.List(ctx, path, recursive)
}

func (s *failingStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	if err := s.failure(); err != nil {
		return certmagic.KeyInfo{}, err
	}
	return s.Storage.Stat(ctx, key)
}

func (s *failingStorage) Lock(ctx context.Context, name string) error {
	if err := s.failure(); err != nil {
		return err
	}
	return s.Storage.Lock(ctx, name)
}

// W11. Weakness: exception text and the IdP's error_description were echoed in
// responses. Instead responses carry fixed, documented texts; the details go to the log.
// Thorough: TestCallbackIdPError, TestOfflineAccessCallback, TestDelegationIdPAnswers.
func TestLessonW11NoInternalTextInResponses(t *testing.T) {
	o := testenv.SharedOP(t)

	t.Run("the IdP's error_description at the callback", func(t *testing.T) {
		_, front := startHybridFront(t, o, "", nil)
		br := newHybridBrowser(t)
		idp := br.toIdP(front, hybridQuery(nil))
		evil := "IdP-internal-" + randomToken()[:12]
		q := url.Values{"state": {idp.Query().Get("state")}, "error": {"server_error"}, "error_description": {evil}, "error_uri": {"https://idp.example/" + evil}}
		resp, body := br.get(front.URL + pathCallback + "?" + q.Encode())
		loc := resp.Header.Get("Location")
		if resp.StatusCode != http.StatusFound || !strings.HasPrefix(loc, hybridRedirectURI+"?") || !strings.Contains(loc, "error=server_error") {
			t.Fatalf("%s to %q", resp.Status, loc)
		}
		if strings.Contains(loc, evil) || strings.Contains(body, evil) {
			t.Errorf("the IdP's text reached the client: %s %s", loc, body)
		}
	})

	t.Run("a storage failure", func(t *testing.T) {
		failing := &failingStorage{
			Storage: &certmagic.FileStorage{Path: t.TempDir()},
			text:    "open /var/lib/caddy/mcp_oauth/x-" + randomToken()[:8] + ": input/output error",
		}
		e := newTokenEnv(t, o, func(c *Config) {
			c.Registration = true
			ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, storage.KeySize))
			if err != nil {
				t.Fatal(err)
			}
			c.Records = storage.New(failing, ring)
		})
		code, verifier := e.code(t, testenv.NativeClientID)
		tok := e.login(t)
		failing.fail.Store(true)
		formType := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}
		mcpHeader := bearer(tok.AccessToken)
		mcpHeader.Set("Content-Type", "application/json")
		for _, tc := range []struct {
			name, method, path string
			header             http.Header
			body               string
			status             int
		}{
			{"code exchange", http.MethodPost, pathToken, formType, exchangeForm(testenv.NativeClientID, code, verifier, nil).Encode(), http.StatusServiceUnavailable},
			{"refresh", http.MethodPost, pathToken, formType,
				url.Values{"grant_type": {"refresh_token"}, "client_id": {testenv.NativeClientID}, "refresh_token": {tok.RefreshToken}}.Encode(), http.StatusServiceUnavailable},
			{"revocation", http.MethodPost, pathRevoke, formType,
				url.Values{"client_id": {testenv.NativeClientID}, "token": {tok.RefreshToken}}.Encode(), http.StatusServiceUnavailable},
			{"registration", http.MethodPost, pathRegister, http.Header{"Content-Type": {"application/json"}},
				`{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`, http.StatusServiceUnavailable},
			{"the MCP endpoint", http.MethodPost, "/mcp", mcpHeader, `{"jsonrpc":"2.0","id":1,"method":"ping"}`, http.StatusServiceUnavailable},
			{"the callback", http.MethodGet, pathCallback + "?state=s&code=c", nil, "", http.StatusServiceUnavailable},
		} {
			resp := do(t, tc.method, e.front.URL+tc.path, tc.header, tc.body)
			body, _ := io.ReadAll(resp.Body)
			var oe oauthError
			_ = json.Unmarshal(body, &oe)
			if resp.StatusCode != tc.status || oe.Error == "" || oe.Description == "" {
				t.Errorf("%s: %s %s", tc.name, resp.Status, body)
			}
			for _, leak := range []string{failing.text, "input/output", "/var/lib", "mcp_oauth/"} {
				if strings.Contains(string(body), leak) {
					t.Errorf("%s: the response holds %q: %s", tc.name, leak, body)
				}
			}
		}
		logged := 0
		for _, entry := range e.logs.All() {
			if strings.Contains(fmt.Sprint(entry.ContextMap()), failing.text) {
				logged++
			}
		}
		if logged == 0 {
			t.Error("the storage failure is not in the log")
		}
	})
}

// W12. Weakness: CORS allowed any origin with credentials. Instead CORS is only on the
// endpoints a browser client must read (metadata, registration, token, revocation, the
// MCP endpoint's challenge and preflight): any origin, as `*`, never reflected, never
// with credentials. The consent page, authorize and the callback have no CORS at all.
// Thorough: TestProtectedResourceMetadata, TestAuthorizationServerMetadata,
// TestRegisterPreflightAndDisabled, TestChallenges.
func TestLessonW12CORSWithoutCredentials(t *testing.T) {
	o := testenv.SharedOP(t)
	_, front := startHybridFront(t, o, "", func(c *Config) { c.Registration = true })
	const origin = "https://evil.example"
	header := func(kv ...string) http.Header {
		h := http.Header{"Origin": {origin}}
		for i := 0; i+1 < len(kv); i += 2 {
			h.Set(kv[i], kv[i+1])
		}
		return h
	}
	form, preflight := "application/x-www-form-urlencoded", "Access-Control-Request-Method"

	for _, tc := range []struct {
		name, method, path string
		header             http.Header
		body               string
	}{
		{"protected resource metadata", http.MethodGet, wellKnownProtectedResource + "/mcp", header(), ""},
		{"protected resource metadata, preflight", http.MethodOptions, wellKnownProtectedResource + "/mcp", header(preflight, "GET"), ""},
		{"authorization server metadata", http.MethodGet, wellKnownAuthorizationServer, header(), ""},
		{"authorization server metadata, preflight", http.MethodOptions, wellKnownAuthorizationServer, header(preflight, "GET"), ""},
		{"OpenID configuration", http.MethodGet, wellKnownOpenIDConfiguration, header(), ""},
		{"registration", http.MethodPost, pathRegister, header("Content-Type", "application/json"),
			`{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`},
		{"registration, preflight", http.MethodOptions, pathRegister, header(preflight, "POST"), ""},
		{"token", http.MethodPost, pathToken, header("Content-Type", form), "grant_type=refresh_token&client_id=native&refresh_token=x"},
		{"token, preflight", http.MethodOptions, pathToken, header(preflight, "POST"), ""},
		{"revocation", http.MethodPost, pathRevoke, header("Content-Type", form), "client_id=native&token=x"},
		{"revocation, preflight", http.MethodOptions, pathRevoke, header(preflight, "POST"), ""},
		{"the MCP endpoint's 401", http.MethodPost, "/mcp", header("Content-Type", "application/json"), `{"jsonrpc":"2.0","id":1,"method":"ping"}`},
		{"the MCP endpoint, preflight", http.MethodOptions, "/mcp", header(preflight, "POST"), ""},
	} {
		resp := do(t, tc.method, front.URL+tc.path, tc.header, tc.body)
		if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "*" {
			t.Errorf("%s: %s, Access-Control-Allow-Origin %q, want *", tc.name, resp.Status, got)
		}
		if got, ok := resp.Header["Access-Control-Allow-Credentials"]; ok {
			t.Errorf("%s: Access-Control-Allow-Credentials %q", tc.name, got)
		}
	}

	br := newHybridBrowser(t)
	consentURL := consentURLFor(t, br, front, hybridQuery(nil))
	pageResp, page := br.do(http.MethodGet, consentURL.String(), nil, header())
	ticket, csrf := consentForm(t, page)
	postResp, _ := br.post(front.URL+pathConsent, url.Values{"ticket": {ticket}, "csrf": {csrf}, "decision": {"deny"}}, header())
	authResp, _ := br.do(http.MethodGet, front.URL+pathAuthorize+"?"+hybridQuery(nil).Encode(), nil, header())
	cbResp, _ := br.do(http.MethodGet, front.URL+pathCallback+"?state=s&code=c", nil, header())
	optResp, _ := br.do(http.MethodOptions, consentURL.String(), nil, header(preflight, "POST"))
	for name, resp := range map[string]*http.Response{
		"the consent page": pageResp, "the consent decision": postResp, "authorize": authResp, "the callback": cbResp, "a preflight of the consent page": optResp,
	} {
		for k := range resp.Header {
			if strings.HasPrefix(k, "Access-Control-") {
				t.Errorf("%s (%s) answers %s", name, resp.Status, k)
			}
		}
	}
}

// W13. Weakness: the first 50 characters of every Authorization header were logged.
// Instead no token, code, verifier, state, nonce, ticket, secret or password appears in
// any log entry at any level (only Fingerprint may name one). Here: a whole hybrid login,
// token exchange, delegated tool calls, refresh, revocation, a replayed code and a
// revoked token, logged at DEBUG. Thorough: TestHybridLoginLogsNoSecrets, tokenEnv's
// check after every token test, offlineAccessTest.assertNotLogged.
func TestLessonW13NoSecretsInLogs(t *testing.T) {
	o := testenv.SharedOP(t)
	core, logs := observer.New(zapcore.DebugLevel)
	up := delegationUpstream(t, o)
	b, front := startHybridFront(t, o, up.URL, delegating(ModeHybrid, DelegationTokenExchange, func(c *Config) { c.Logger = zap.New(core) }))
	e := lessonTokens(o, b, front)

	br := newHybridBrowser(t)
	verifier, state := oauth2.GenerateVerifier(), "client-"+randomToken()
	consentURL := consentURLFor(t, br, front, hybridAuthorizeQuery(testenv.NativeClientID, tokenTestRedirect, verifier, state, []string{"openid", "notes:read", "notes:write"}))
	_, page := br.get(consentURL.String())
	ticket, csrf := consentForm(t, page)
	idp := br.decide(consentURL, "approve")
	cb := br.loginAtIdP(o, idp)
	code := br.redirect(br.get(cb.String())).Query().Get("code")
	tok := e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)

	s := connect(t, front.URL, tok.AccessToken)
	for _, call := range []*mcp.CallToolParams{{Name: "notes_write", Arguments: map[string]any{"text": "x"}}, {Name: "notes_read"}} {
		if res, err := s.CallTool(t.Context(), call); err != nil || res.IsError {
			t.Fatalf("%s: %v %+v", call.Name, err, res)
		}
	}
	sess, g := onlySession(t, b)
	next := e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
	if res := e.post(t, pathRevoke, url.Values{"client_id": {testenv.NativeClientID}, "token": {next.RefreshToken}}, nil); res.status != http.StatusOK {
		t.Fatalf("revocation: %d", res.status)
	}
	e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	if st := initStatus(t, front, next.AccessToken); st != http.StatusUnauthorized {
		t.Fatalf("revoked token: %d", st)
	}

	secrets := map[string]string{
		"client state": state, "PKCE verifier": verifier, "consent ticket": ticket, "CSRF token": csrf,
		"IdP state": idp.Query().Get("state"), "nonce": idp.Query().Get("nonce"), "IdP code": cb.Query().Get("code"),
		"broker code": code, "access token": tok.AccessToken, "refresh token": tok.RefreshToken,
		"refreshed access token": next.AccessToken, "refreshed refresh token": next.RefreshToken,
		"IdP access token": g.AccessToken, "IdP refresh token": g.RefreshToken, "ID token": g.IDToken,
		"session id": sess.ID, "client secret": testenv.BrokerClientSecret, "password": o.User.Password,
	}
	delegated := 0
	for _, r := range up.Seen() {
		if d := strings.TrimPrefix(r.Authorization, "Bearer "); d != "" {
			secrets[fmt.Sprintf("delegated token %d", delegated)] = d
			delegated++
		}
	}
	if delegated == 0 || logs.FilterLevelExact(zapcore.DebugLevel).Len() == 0 || logs.Len() < 5 {
		t.Fatalf("%d delegated tokens, %d entries (%d at DEBUG)", delegated, logs.Len(), logs.FilterLevelExact(zapcore.DebugLevel).Len())
	}
	for _, entry := range logs.All() {
		line := entry.LoggerName + " " + entry.Message + " " + fmt.Sprint(entry.ContextMap())
		for name, secret := range secrets {
			if secret != "" && strings.Contains(line, secret) {
				t.Errorf("the %s is in the log entry %q", name, entry.Message)
			}
		}
	}
}

// W15. Weakness: no consent screen of its own, so any registered client could ride the
// server's single IdP client (confused deputy). Instead each client id gets its own
// consent page before the browser goes to the IdP, and the callback finishes only logins
// the broker started after consent. Thorough: TestConsentBoundToClientID,
// TestConsentRequiredForRegisteredClient, TestCallbackRefusals, TestConsentDeny.
func TestLessonW15ConsentPerClient(t *testing.T) {
	o := testenv.SharedOP(t)
	b, front := startHybridFront(t, o, "", func(c *Config) { c.Registration = true })
	br := newHybridBrowser(t)
	if next := br.toIdP(front, hybridQuery(nil)); !strings.HasPrefix(next.String(), o.AuthorizationEndpoint+"?") {
		t.Fatalf("approving the native client led to %s", next.Redacted())
	}

	resp := do(t, http.MethodPost, front.URL+pathRegister, http.Header{"Content-Type": {"application/json"}},
		`{"client_name":"Native Test Client","redirect_uris":["http://127.0.0.1/copy"],"token_endpoint_auth_method":"none"}`)
	var reg struct {
		ClientID string `json:"client_id"`
	}
	decodeJSON(t, resp, &reg)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("registration: %s", resp.Status)
	}
	next := br.authorize(front, hybridAuthorizeQuery(reg.ClientID, "http://127.0.0.1:40000/copy", hybridVerifier, "s", nil))
	if !strings.HasPrefix(next.String(), front.URL+pathConsent+"?") {
		t.Fatalf("the registered client went to %s without consent", next.Redacted())
	}
	if _, page := br.get(next.String()); !strings.Contains(page, reg.ClientID) {
		t.Error("the consent page does not name the registered client's id")
	}

	// The registered client drives the broker's IdP client itself: its login reaches
	// the broker's callback, but the broker never started it.
	conf := oauth2.Config{ClientID: testenv.BrokerClientID, Endpoint: o.Endpoint(), RedirectURL: front.URL + pathCallback, Scopes: []string{"openid"}}
	cb, err := o.Login(t.Context(), conf.AuthCodeURL("attacker-state", oauth2.S256ChallengeOption(oauth2.GenerateVerifier())))
	if err != nil {
		t.Fatal(err)
	}
	if resp, _ := newHybridBrowser(t).get(cb.String()); resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
		t.Errorf("a login the broker did not start: %s to %q", resp.Status, resp.Header.Get("Location"))
	}
	if n := len(sessions(t, b)); n != 0 {
		t.Errorf("%d sessions", n)
	}
}

// W18. Weakness: all flow state lived in memory: lost on restart, one instance only, and
// the rate limit keyed on the proxy's IP. Instead every piece of flow state is a record in
// Caddy's storage: two brokers over one storage folder serve one login interchangeably
// (authorize and consent on A, callback on B, token on A, MCP and refresh on B). The
// client IP comes from Caddy's trusted-proxy handling: e2e's
// TestLessonW18RateLimitKeyedOnCaddyClientIP. Thorough: TestRegisteredClientSurvivesRestart,
// TestDelegationRefreshTwoNodes, TestRegisterRateLimitPerClientIP, e2e's
// TestTwoCaddyProcessesShareOneStorage and TestHybridDCRThroughCaddyBinary (restart).
func TestLessonW18StateIsSharedThroughStorage(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	dir := t.TempDir()
	var node atomic.Int32
	var handlers [2]http.Handler
	front := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		handlers[node.Load()].ServeHTTP(w, r)
	}))
	base := "http://" + front.Listener.Addr().String()
	var brokers [2]*Broker
	for i := range brokers {
		brokers[i] = newTestBroker(t, o, func(c *Config) {
			c.Mode = ModeHybrid
			c.Resource = base + "/mcp"
			ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, storage.KeySize))
			if err != nil {
				t.Fatal(err)
			}
			c.Records = storage.New(&certmagic.FileStorage{Path: dir}, ring) // each its own Records, like two processes
		})
		handlers[i] = startFront(t, brokers[i], up.URL).Config.Handler
	}
	front.Start()
	t.Cleanup(front.Close)
	const a, b = 0, 1

	br := newHybridBrowser(t)
	verifier := oauth2.GenerateVerifier()
	node.Store(a)
	idp := br.toIdP(front, hybridAuthorizeQuery(testenv.NativeClientID, tokenTestRedirect, verifier, "st", nil))
	cb := br.loginAtIdP(o, idp)
	node.Store(b)
	final := br.redirect(br.get(cb.String()))
	code := final.Query().Get("code")
	if code == "" || final.Query().Get("state") != "st" {
		t.Fatalf("the callback on B: %v", final.Query())
	}
	node.Store(a)
	e := lessonTokens(o, brokers[a], front)
	tok := e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)
	node.Store(b)
	if st := initStatus(t, front, tok.AccessToken); st != http.StatusOK {
		t.Errorf("A's token on B: %d", st)
	}
	next := e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
	node.Store(a)
	if st := initStatus(t, front, next.AccessToken); st != http.StatusOK {
		t.Errorf("B's refreshed token on A: %d", st)
	}
	// The code, spent on A, replayed on B: B revokes the family, and A sees it.
	node.Store(b)
	e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	node.Store(a)
	e.refresh(t, testenv.NativeClientID, next.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
}

// W19. Weakness: only RS256 was accepted. Instead every algorithm the IdP's JWKS
// publishes among RS, PS, ES and EdDSA: with an OP signing ES256, PS256 or EdDSA, its
// access tokens pass the MCP endpoint (progressive) and its ID tokens the callback
// (hybrid); a token of the same algorithm by an unpublished key does not.
// Thorough: internal/testenv's TestWithSigningAlgorithm; RS256 is every other test.
func TestLessonW19EveryPublishedAlgorithm(t *testing.T) {
	for _, tc := range []struct {
		alg jose.SignatureAlgorithm
		key func() (any, error)
	}{
		{jose.ES256, func() (any, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }},
		{jose.PS256, func() (any, error) { return testenv.AttackerKey(), nil }},
		{jose.EdDSA, func() (any, error) { _, k, err := ed25519.GenerateKey(rand.Reader); return k, err }},
	} {
		t.Run(string(tc.alg), func(t *testing.T) {
			o := testenv.StartOP(t, testenv.WithSigningAlgorithm(tc.alg))
			up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
			front := startFront(t, newTestBroker(t, o, nil), up.URL)
			for name, tok := range map[string]string{
				"a real login's access token": o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid"}, testResource),
				"a minted token":              o.MintJWT(o.AccessTokenClaims(o.User.Subject, testResource)),
			} {
				if jws, err := jose.ParseSignedCompact(tok, []jose.SignatureAlgorithm{tc.alg}); err != nil || jws.Signatures[0].Header.Algorithm != string(tc.alg) {
					t.Fatalf("%s is not %s: %v", name, tc.alg, err)
				}
				if st := initStatus(t, front, tok); st != http.StatusOK {
					t.Errorf("%s: %d", name, st)
				}
			}
			key, err := tc.key()
			if err != nil {
				t.Fatal(err)
			}
			forged := testenv.SignJWT(t, key, tc.alg, o.SigningKey().KeyID, o.AccessTokenClaims(o.User.Subject, testResource))
			if st := initStatus(t, front, forged); st != http.StatusUnauthorized {
				t.Errorf("a %s token by an unpublished key: %d", tc.alg, st)
			}

			b, hybrid := startHybridFront(t, o, "", nil)
			hybridLogin(t, hybrid, o, testenv.NativeClientID, tokenTestRedirect, hybridVerifier, nil)
			_, g := onlySession(t, b)
			if jws, err := jose.ParseSignedCompact(g.IDToken, []jose.SignatureAlgorithm{tc.alg}); err != nil || jws.Signatures[0].Header.Algorithm != string(tc.alg) {
				t.Errorf("the ID token the callback verified is not %s: %v", tc.alg, err)
			}
		})
	}
}
