package flows

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// One-time links (offline access, app password) under a stranger's and a storage writer's
// hands (SECURITY.md S1.35, S1.36).

// elicitOfflineAccess calls a tool that needs offline access the 2025-11-25 way and
// returns the elicitation's link.
func (f *offlineAccessTest) elicitOfflineAccess(t *testing.T, token string) string {
	t.Helper()
	resp := do(t, http.MethodPost, f.resource, bearer(token), `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read"}}`)
	var a elicitationAnswer
	decodeJSON(t, resp, &a)
	return f.checkElicitation(t, a, "1")
}

// TestOfflineAccessToolCallsAreBounded (S1.35): a user's tool calls in a row that need
// offline access, the user having granted none, and the user's starts of offline access,
// are answered with the user's current link while it is unused and young: a bounded
// number of link records, whatever the number of calls. The link still works, and so does
// a 2026-07-28 retry of an InputRequiredResult.
func TestOfflineAccessToolCallsAreBounded(t *testing.T) {
	o := testenv.SharedOP(t)
	f := startOfflineAccessBefore(t, o, nil, testenv.Stateless())
	token := f.userToken(t, o.User)
	const calls = 10
	links := func() int { return liveRecords(t, f.b, kindOfflineAccessLink) }

	first := f.elicitOfflineAccess(t, token)
	t.Run("tool calls and starts in a row get one link", func(t *testing.T) {
		for range calls {
			if link := f.elicitOfflineAccess(t, token); link != first {
				t.Fatal("a new link for a tool call")
			}
			if link := f.link(t, token); link != first {
				t.Fatal("a new link for a start")
			}
		}
		if n := links(); n != 1 {
			t.Errorf("%d link records after %d calls, want 1", n, 2*calls+1)
		}
	})
	var state string
	t.Run("a 2026-07-28 call and its retry get the same link", func(t *testing.T) {
		h, body := roundTripCall(token, 1, "notes_read", `{}`, urlElicitationCaps, "")
		resp, a := postRPC(t, f.resource, h, body)
		var link string
		link, state = f.checkInputRequired(t, resp, a, "1")
		h, body = roundTripCall(token, 2, "notes_read", `{}`, urlElicitationCaps,
			fmt.Sprintf(`"requestState":%q,"inputResponses":{%q:{"action":"accept"}},`, state, inputKeyOfflineAccess))
		resp, a = postRPC(t, f.resource, h, body)
		again, _ := f.checkInputRequired(t, resp, a, "2")
		if link != first || again != first {
			t.Error("a new link for a 2026-07-28 call")
		}
		if n := links(); n != 1 {
			t.Errorf("%d link records, want 1", n)
		}
	})
	t.Run("past the reuse window one more link, then that one", func(t *testing.T) {
		now := f.b.now
		f.b.now = func() time.Time { return now().Add(offlineAccessLinkReuse) }
		defer func() { f.b.now = now }()
		second := f.elicitOfflineAccess(t, token)
		if second == first {
			t.Error("a link older than the reuse window was handed out again")
		}
		for range calls {
			if link := f.elicitOfflineAccess(t, token); link != second {
				t.Fatal("a new link for a tool call")
			}
		}
		if n := links(); n != 2 {
			t.Errorf("%d link records, want 2", n)
		}
		if offlineAccessLinkTTL-offlineAccessLinkReuse < offlineAccessLinkTTL/2 {
			t.Errorf("a reused link may have %s left", offlineAccessLinkTTL-offlineAccessLinkReuse)
		}
	})
	t.Run("the link grants offline access and the retry goes upstream", func(t *testing.T) {
		if resp, page := f.callback(t, f.loginAt(t, first)); resp.StatusCode != http.StatusOK {
			t.Fatalf("callback: %s %s", resp.Status, page)
		}
		f.up.Reset()
		h, body := roundTripCall(token, 3, "notes_read", `{}`, urlElicitationCaps,
			fmt.Sprintf(`"requestState":%q,"inputResponses":{%q:{"action":"accept"}},`, state, inputKeyOfflineAccess))
		resp, a := postRPC(t, f.resource, h, body)
		if resp.StatusCode != http.StatusOK || a.Error != nil || a.Result.IsError || len(f.up.Seen()) != 1 {
			t.Fatalf("%s %+v: want the tool's result", resp.Status, a)
		}
	})
}

// TestOfflineAccessLinkIdentityIsBound (S1.36): an offline access link whose subject or
// client was changed in storage is refused when opened, before the IdP, and deleted;
// nothing is granted for either user.
func TestOfflineAccessLinkIdentityIsBound(t *testing.T) {
	o := testenv.SharedOP(t)
	f := startOfflineAccess(t, o, nil)
	token := f.userToken(t, o.User)
	ctx := t.Context()
	for _, tc := range []struct {
		name   string
		change func(*OfflineAccessLink)
	}{
		{"subject changed", func(l *OfflineAccessLink) { l.Subject = o.OtherUser.Subject }},
		{"client changed", func(l *OfflineAccessLink) { l.ClientID = "another-client" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			link := f.link(t, token)
			u, _ := url.Parse(link)
			key := recordKey(kindOfflineAccessLink, u.Query().Get("link"))
			var l OfflineAccessLink
			if err := f.b.cfg.Records.Get(ctx, key, &l); err != nil {
				t.Fatal(err)
			}
			tc.change(&l)
			if err := f.b.cfg.Records.Put(ctx, key, &l, offlineAccessLinkTTL); err != nil {
				t.Fatal(err)
			}
			// Opened, it would send the browser to the IdP for the subject the record names
			// (where the callback refuses any other user who logs in).
			resp := getWithoutRedirect(t, link)
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("the altered link answered %s, want 400", resp.Status)
			}
			if err := f.b.cfg.Records.Get(ctx, key, &l); !errors.Is(err, storage.ErrNotFound) {
				t.Errorf("the altered link is kept: %v", err)
			}
			for _, u := range []testenv.User{o.User, o.OtherUser} {
				if _, _, err := f.grant(t, u.Subject); !errors.Is(err, storage.ErrNotFound) {
					t.Errorf("offline access granted for %s through an altered link: %v", u.Subject, err)
				}
			}
			// The user's next call gets a good link, not the altered one.
			if next := f.elicitOfflineAccess(t, token); next == link {
				t.Error("the altered link was handed out again")
			}
		})
	}
}

// TestAppPasswordLinkIdentityIsBound (S1.36): an app password link whose subject (or
// client, or Nextcloud user) was changed in storage, so that the app password the user
// grants lands under another subject, is refused when opened, before Nextcloud, and
// deleted; nothing is stored for either user.
func TestAppPasswordLinkIdentityIsBound(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.token(t, o.User)
	ctx := t.Context()
	for _, tc := range []struct {
		name   string
		change func(*AppPasswordLink)
	}{
		// The attack: the subject is another user's, the Nextcloud user the one who grants.
		{"subject changed", func(l *AppPasswordLink) { l.Subject = o.OtherUser.Subject }},
		{"client changed", func(l *AppPasswordLink) { l.ClientID = "another-client" }},
		{"Nextcloud user changed", func(l *AppPasswordLink) { l.NextcloudUser = o.OtherUser.Subject }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			link := f.elicit(t, token)
			u, _ := url.Parse(link)
			key := recordKey(kindAppPasswordLink, u.Query().Get("link"))
			var l AppPasswordLink
			if err := f.b.cfg.Records.Get(ctx, key, &l); err != nil {
				t.Fatal(err)
			}
			tc.change(&l)
			if err := f.b.cfg.Records.Put(ctx, key, &l, appPasswordLinkTTL); err != nil {
				t.Fatal(err)
			}
			before := len(nc.Requests())
			resp := getWithoutRedirect(t, link)
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("the altered link answered %s, want 400", resp.Status)
				if resp.StatusCode == http.StatusFound {
					// The user grants the app password as themselves.
					if err := nc.Grant(resp.Header.Get("Location"), o.User.Subject); err != nil {
						t.Fatal(err)
					}
					_ = f.b.PollLoginFlows(ctx)
				}
			} else if n := len(nc.Requests()) - before; n != 0 {
				t.Errorf("Nextcloud was asked %d times for an altered link", n)
			}
			if err := f.b.cfg.Records.Get(ctx, key, &l); !errors.Is(err, storage.ErrNotFound) {
				t.Errorf("the altered link is kept: %v", err)
			}
			for _, u := range []testenv.User{o.User, o.OtherUser} {
				if g := f.stored(t, u.Subject); g != nil {
					t.Errorf("an app password was stored for %s through an altered link", u.Subject)
					_ = f.b.appPasswords.store.deleteGrant(ctx, g)
				}
			}
			if next := f.elicit(t, token); next == link {
				t.Error("the altered link was handed out again")
			}
		})
	}
	assertNoSecretInLogs(t, f.logs, pollSecrets(nc))
}
