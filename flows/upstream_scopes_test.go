package flows

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// fastLearning is a learnSchedule for tests: no waiting to speak of.
var fastLearning = learnSchedule{start: time.Millisecond, refresh: 20 * time.Millisecond, retry: 5 * time.Millisecond, maxRetry: 20 * time.Millisecond}

// learnInBackground runs b.LearnUpstreamScopes on schedule until the test ends.
func learnInBackground(t *testing.T, b *Broker, schedule learnSchedule) {
	t.Helper()
	b.learnSchedule = schedule
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		b.LearnUpstreamScopes(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// waitForOffer waits until b offers want (in order), or fails the test.
func waitForOffer(t *testing.T, b *Broker, want []string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !slices.Equal(b.offer().scopes, want) {
		if time.Now().After(deadline) {
			t.Fatalf("the broker offers %v, want %v", b.offer().scopes, want)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestUpstreamScopesLearned: the scopes_supported of the upstream's RFC 9728 document
// (served by go-sdk) join the configured scopes in the broker's metadata, its challenge,
// what a client may ask for, and what the IdP login asks; a refresh follows a change.
func TestUpstreamScopesLearned(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader(), testenv.ProtectedResourceMetadata("notes.read", "notes.write", "openid"))
	b, front := startHybridFrontWith(t, o, up.URL, func(c *Config) {
		c.Scopes = []string{"openid", "notes:read"}
		c.UpstreamMetadata = up.MetadataURL
	}, nil)

	asksNotesRead := hybridAuthorizeQuery(testenv.NativeClientID, hybridRedirectURI, hybridVerifier, "s", []string{"openid", "notes.read"})
	t.Run("until learned, the configured scopes alone apply", func(t *testing.T) {
		var prm ProtectedResourceMetadata
		decodeJSON(t, get(t, front.URL+wellKnownProtectedResource+"/mcp", nil), &prm)
		if !slices.Equal(prm.ScopesSupported, []string{"openid", "notes:read"}) {
			t.Errorf("scopes_supported %v", prm.ScopesSupported)
		}
		next := newHybridBrowser(t).authorize(front, asksNotesRead)
		if next.Query().Get("error") != "invalid_scope" {
			t.Errorf("a scope not yet learned: sent to %s, want invalid_scope", next.Redacted())
		}
	})

	learnInBackground(t, b, fastLearning)
	waitForOffer(t, b, []string{"openid", "notes:read", "notes.read", "notes.write"})
	t.Run("learned scopes are advertised", func(t *testing.T) {
		want := []string{"openid", "notes:read", "notes.read", "notes.write"}
		var prm ProtectedResourceMetadata
		decodeJSON(t, get(t, front.URL+wellKnownProtectedResource+"/mcp", nil), &prm)
		var as AuthorizationServerMetadata
		decodeJSON(t, get(t, front.URL+wellKnownAuthorizationServer, nil), &as)
		if !slices.Equal(prm.ScopesSupported, want) || !slices.Equal(as.ScopesSupported, want) {
			t.Errorf("scopes_supported: resource %v, authorization server %v, want %v", prm.ScopesSupported, as.ScopesSupported, want)
		}
		resp := do(t, http.MethodPost, front.URL+"/mcp", nil, `{"jsonrpc":"2.0","id":1,"method":"initialize"}`)
		if c := resp.Header.Get("WWW-Authenticate"); !strings.Contains(c, `scope="openid notes:read notes.read notes.write"`) {
			t.Errorf("challenge %q", c)
		}
	})
	t.Run("a client may ask for a learned scope, and the IdP is asked for it", func(t *testing.T) {
		idpURL := newHybridBrowser(t).toIdP(front, asksNotesRead)
		if got := idpURL.Query().Get("scope"); got != "openid offline_access notes.read" {
			t.Errorf("the IdP is asked for %q (%s)", got, idpURL.Redacted())
		}
	})
	t.Run("a refresh follows the upstream's change", func(t *testing.T) {
		up.SetScopesSupported("calendar.read")
		waitForOffer(t, b, []string{"openid", "notes:read", "calendar.read"})
		if !slices.Contains(b.offer().managed, "calendar.read") || slices.Contains(b.offer().managed, "notes.read") {
			t.Errorf("managed scopes %v", b.offer().managed)
		}
	})
}

// TestUpstreamScopesRefused: a document that breaks a bound is refused whole; the broker
// offers what it offered before and warns once per run of failures.
func TestUpstreamScopesRefused(t *testing.T) {
	o := testenv.SharedOP(t)
	scopes := func(n int, s func(i int) string) string {
		var list []string
		for i := range n {
			list = append(list, `"`+s(i)+`"`)
		}
		return `{"resource":"x","scopes_supported":[` + strings.Join(list, ",") + `]}`
	}
	for _, tc := range []struct {
		name, body string
		status     int
		want       string
	}{
		{"a server error", `{}`, 500, "status 500"},
		{"a redirect is not followed", ``, http.StatusFound, "status 302"},
		{"not JSON", `<html>`, 200, "not a JSON object"},
		{"scopes_supported not a list of strings", `{"scopes_supported":[1]}`, 200, "not a JSON object"},
		{"no scopes_supported", `{"resource":"x"}`, 200, "no scopes_supported"},
		{"over 64 KiB", `{"scopes_supported":["a"],"pad":"` + strings.Repeat("x", 64<<10) + `"}`, 200, "over 65536 bytes"},
		{"over 100 scopes", scopes(101, func(i int) string { return fmt.Sprint("s", i) }), 200, "names 101 scopes, over 100"},
		{"a scope over 128 bytes", scopes(1, func(int) string { return strings.Repeat("s", 129) }), 200, "scopes_supported[0] is not a scope token"},
		{"a scope with a space", scopes(2, func(i int) string { return []string{"ok", "notes read"}[i] }), 200, "scopes_supported[1] is not a scope token"},
		{"a scope with a quote", `{"scopes_supported":["a\"b"]}`, 200, "scopes_supported[0] is not a scope token"},
		{"an empty scope", `{"scopes_supported":[""]}`, 200, "scopes_supported[0] is not a scope token"},
		{"a scope with a control character", `{"scopes_supported":["a\u0007"]}`, 200, "scopes_supported[0] is not a scope token"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A stand-in for a broken upstream: it answers tc's document.
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tc.status == http.StatusFound {
					http.Redirect(w, r, "/elsewhere", tc.status)
					return
				}
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(tc.status)
				fmt.Fprint(w, tc.body)
			}))
			t.Cleanup(srv.Close)
			b := newTestBroker(t, o, func(c *Config) { c.UpstreamMetadata = srv.URL + "/.well-known/oauth-protected-resource/mcp" })
			_, err := b.fetchUpstreamScopes(t.Context())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%v, want an error with %q", err, tc.want)
			}
		})
	}

	t.Run("failures warn once and keep what was learned", func(t *testing.T) {
		up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader(), testenv.ProtectedResourceMetadata("notes.read"))
		core, logs := observer.New(zap.DebugLevel)
		b := newTestBroker(t, o, func(c *Config) {
			c.UpstreamMetadata = up.MetadataURL
			c.Logger = zap.New(core)
		})
		learnInBackground(t, b, fastLearning)
		configured := slices.Clone(b.cfg.Scopes)
		waitForOffer(t, b, append(slices.Clone(configured), "notes.read"))

		// The upstream goes away: refreshes fail, the learned scopes stay.
		up.Close()
		deadline := time.Now().Add(5 * time.Second)
		for logs.FilterLevelExact(zapcore.DebugLevel).FilterMessageSnippet("failed again").Len() < 3 {
			if time.Now().After(deadline) {
				t.Fatalf("no repeated failures logged: %v", logs.All())
			}
			time.Sleep(5 * time.Millisecond)
		}
		if n := logs.FilterLevelExact(zapcore.WarnLevel).Len(); n != 1 {
			t.Errorf("%d warnings, want 1", n)
		}
		if got := b.offer().scopes; !slices.Equal(got, append(slices.Clone(configured), "notes.read")) {
			t.Errorf("after failed refreshes the broker offers %v", got)
		}
	})
}

// TestUpstreamScopesNotFetchedUntilStarted: New and a LearnUpstreamScopes whose context
// ends before its first fetch (what `caddy validate` does) make no request.
func TestUpstreamScopesNotFetchedUntilStarted(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader(), testenv.ProtectedResourceMetadata("notes.read"))
	b := newTestBroker(t, o, func(c *Config) { c.UpstreamMetadata = up.MetadataURL })
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	b.LearnUpstreamScopes(ctx) // the default schedule: returns on the canceled context
	time.Sleep(10 * time.Millisecond)
	if n := len(up.Seen()); n != 0 {
		t.Errorf("%d requests to the upstream", n)
	}
	if slices.Contains(b.offer().scopes, "notes.read") {
		t.Error("a scope learned without a fetch")
	}
}
