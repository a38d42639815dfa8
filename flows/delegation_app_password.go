package flows

import (
	"context"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/nextcloud"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Delegation mode app_password: the upstream (the Nextcloud MCP server in its
// multi_user_basic mode) gets `Authorization: Basic loginName:appPassword` of the user's
// own Nextcloud app password, which the broker obtains through Nextcloud's Login Flow v2
// and keeps sealed per site and user (store_app_password.go).
//
//   - A request carries the user's app password from memory (appPasswordCache): no
//     storage read on the warm path; the record is read again after 30 s, so that a
//     revocation on another node reaches this one (SECURITY.md S1.28). The client's token
//     never goes upstream; without an app password the request goes on without
//     Authorization, which the MCP server needs only inside tools (it reads Basic
//     credentials when a tool calls Nextcloud; initialize, tools/list and notifications
//     need none).
//   - A tools/call of a user without an app password is answered with the URL elicitation
//     error the offline access tools use (offline_access_elicitation.go), whose one-time
//     link (/oauth/app-password?link=) starts Login Flow v2 and sends the browser to
//     Nextcloud's login URL (on its public URL). A user's calls in a row get the same link
//     while it is unused and young (SECURITY.md S1.27).
//   - The flow is polled from storage under the user's lock: by a loop beside the janitor
//     (PollLoginFlows) and at once on the user's next tools/call, so a config reload or a
//     killed instance loses nothing; it ends with Nextcloud's 1200 s. A pending answer holds
//     the next poll back loginFlowPendingWait, cluster-wide. The flow's identity is bound
//     to its key and sealed poll token (SECURITY.md S1.30).
//   - The grant must come from the caller (SECURITY.md S1.21): before anything is stored, OCS
//     cloud/user says whom the new app password authenticates as, and that must be the
//     Nextcloud user the caller's token names (user_claim). A mismatch, or no answer, and
//     nothing is stored: the app password is deleted in Nextcloud.
//   - Revoking offline access or the user's last session deletes the app password in
//     Nextcloud too (SECURITY.md S1.29). It is marked revoked here only when Nextcloud
//     itself says it is invalid (an OCS 401), checked at most every
//     appPasswordConfirmInterval; an outage (5xx, timeout, any other 401) changes nothing,
//     and a 429 of Nextcloud's brute-force protection holds every call to Nextcloud back
//     until its time is over (SECURITY.md S1.22, S2.23).

// AppPasswordConfig configures delegation mode app_password.
type AppPasswordConfig struct {
	// NextcloudURL is where the broker reaches Nextcloud.
	NextcloudURL string
	// PublicURL is where users' browsers reach Nextcloud. Default: NextcloudURL.
	PublicURL string
	// UserClaim is the claim of the user's token that holds the Nextcloud user id.
	// Default: sub.
	UserClaim string
	// UserAgent names the app passwords in Nextcloud. Default: nextcloud.DefaultUserAgent.
	UserAgent string
	// HTTPClient calls Nextcloud. Default: one bounded by the IdP timeout.
	HTTPClient *http.Client
}

// DelegationAppPassword is the delegation mode that sends the user's Nextcloud app password.
const DelegationAppPassword = "app_password"

const (
	// pathAppPasswordStart is where a browser opens an app password link.
	pathAppPasswordStart = "/oauth/app-password"
	// appPasswordLinkTTL bounds how long a one-time app password link can be opened.
	appPasswordLinkTTL = 10 * time.Minute
	// appPasswordConfirmInterval is how often a node asks Nextcloud whom an app password
	// authenticates as.
	appPasswordConfirmInterval = 10 * time.Minute
	// appPasswordMemoryTrust is how long a node uses an app password from memory before
	// reading its record again: the delay for a revocation on another node to reach this
	// one, the same as broker tokens' (SECURITY.md S1.28).
	appPasswordMemoryTrust = brokerCacheTTL
	// appPasswordRetry is how soon a node asks again after Nextcloud could not answer.
	appPasswordRetry = time.Minute
	// appPasswordLinkReuse is how long a user's tool calls are answered with the same
	// link: a link reused has at least appPasswordLinkTTL - appPasswordLinkReuse left,
	// and a user has at most two live links (SECURITY.md S1.27).
	appPasswordLinkReuse = appPasswordLinkTTL / 2
	// appPasswordSessionsMax bounds the sessions recorded per user (AppPasswordSessions);
	// past it the ended ones are dropped, then the oldest.
	appPasswordSessionsMax = 32
	// appPasswordAbsentFor is how long a node remembers that a user has no app password,
	// for the calls that are not tool calls.
	appPasswordAbsentFor = 5 * time.Second
	// appPasswordCacheEntries bounds the memory cache; it is cleared when full.
	appPasswordCacheEntries = 10000
	// loginFlowPollLimit bounds the pending flows one PollLoginFlows round looks at.
	loginFlowPollLimit = 1000
	// loginFlowRetry holds a flow's polls back after Nextcloud failed to answer one.
	loginFlowRetry = 30 * time.Second
	// loginFlowPendingWait holds a flow's polls back after Nextcloud said it is pending:
	// a user's tool calls in a row poll at most once per this, cluster-wide, and the
	// poller's 3 s round still finds the flow due (SECURITY.md S1.27).
	loginFlowPendingWait = 2 * time.Second
	// DefaultLoginFlowPollInterval is how often PollLoginFlowsEvery polls pending flows.
	DefaultLoginFlowPollInterval = 3 * time.Second
)

// appPasswords is the state of delegation mode app_password, built in New.
type appPasswords struct {
	nc    *nextcloud.Client
	claim string
	store appPasswordStore
	links linkStore[AppPasswordLink]
	cache appPasswordCache
	// flight makes one cold load per user and node at a time.
	flight singleflight.Group
	// throttledUntil (Unix nanoseconds) holds every call to Nextcloud back while its
	// brute-force protection blocks the broker's address.
	throttledUntil atomic.Int64
}

// appPasswordCache is the memory cache of the upstream's Authorization value by subject.
type appPasswordCache struct {
	mu      sync.RWMutex
	entries map[string]appPasswordEntry
}

type appPasswordEntry struct {
	header string // "" when the user has none
	until  int64  // Unix nanoseconds
	// retryConfirmAt (Unix nanoseconds) holds the next confirmation at Nextcloud back
	// after one Nextcloud did not answer.
	retryConfirmAt int64
}

func (c *appPasswordCache) get(subject string, now int64) (appPasswordEntry, bool) {
	c.mu.RLock()
	e, ok := c.entries[subject]
	c.mu.RUnlock()
	return e, ok && now < e.until
}

// peek returns subject's entry, expired or not.
func (c *appPasswordCache) peek(subject string) appPasswordEntry {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.entries[subject]
}

func (c *appPasswordCache) put(subject string, e appPasswordEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries == nil || len(c.entries) >= appPasswordCacheEntries {
		c.entries = make(map[string]appPasswordEntry)
	}
	c.entries[subject] = e
}

func (c *appPasswordCache) evict(subject string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.entries, subject)
}

// newAppPasswords builds the state of delegation mode app_password from cfg (defaults
// filled in), on the broker's clock now.
func newAppPasswords(cfg *Config, now func() time.Time) (*appPasswords, error) {
	ac := cfg.AppPassword
	client := ac.HTTPClient
	if client == nil {
		client = &http.Client{Timeout: cfg.IdPTimeout}
	}
	nc, err := nextcloud.New(nextcloud.Config{
		URL: ac.NextcloudURL, PublicURL: ac.PublicURL, UserAgent: ac.UserAgent,
		HTTPClient: client, Timeout: cfg.IdPTimeout, Now: now,
	})
	if err != nil {
		return nil, fmt.Errorf("delegation app_password: %w", err)
	}
	claim := ac.UserClaim
	if claim == "" {
		claim = "sub"
	}
	return &appPasswords{nc: nc, claim: claim}, nil
}

// throttled tells whether Nextcloud's brute-force protection holds calls back now.
func (ap *appPasswords) throttled(now time.Time) bool {
	return now.UnixNano() < ap.throttledUntil.Load()
}

// noteThrottle holds calls back when err is Nextcloud throttling the broker, and tells.
func (b *Broker) noteThrottle(err error) bool {
	var te *nextcloud.ThrottledError
	if !errors.As(err, &te) {
		return false
	}
	until := te.Until.UnixNano()
	for {
		cur := b.appPasswords.throttledUntil.Load()
		if cur >= until || b.appPasswords.throttledUntil.CompareAndSwap(cur, until) {
			break
		}
	}
	b.log.delegation.Warn("Nextcloud's brute-force protection throttles the broker's address; calls to Nextcloud held back",
		zap.Time("until", te.Until))
	return true
}

// delegateAppPassword puts the user's app password in out's Authorization (stripped of
// the client's), or answers a tool call of a user without one with the URL elicitation,
// and tells whether it answered.
func (b *Broker) delegateAppPassword(w http.ResponseWriter, out *http.Request, who *idp.Principal, raw string, tools []string, in *inputRound) (bool, error) {
	ap := b.appPasswords
	now := b.now().UnixNano()
	if e, ok := ap.cache.get(who.Subject, now); ok && (e.header != "" || len(tools) == 0) {
		if e.header != "" {
			out.Header.Set("Authorization", e.header)
		}
		return false, nil
	}
	ctx := out.Context()
	h, err := b.loadAppPassword(ctx, who.Subject)
	if err != nil {
		return false, err
	}
	if h == "" && len(tools) > 0 {
		// The user may just have granted it: the flow is polled now, not at the next round.
		if err := b.pollLoginFlow(ctx, "", who.Subject); err == nil {
			if h, err = b.loadAppPassword(ctx, who.Subject); err != nil {
				return false, err
			}
		}
	}
	if h != "" {
		out.Header.Set("Authorization", h)
		return false, nil
	}
	if len(tools) == 0 {
		return false, nil // no credentials upstream: the MCP server needs them only in tools
	}
	return true, b.elicitAppPassword(w, out, who, raw, in)
}

// loadAppPassword is the upstream's Authorization value for subject, "" when the user
// has none, from storage and, when due, confirmed at Nextcloud; the result is cached.
func (b *Broker) loadAppPassword(ctx context.Context, subject string) (string, error) {
	v, err, _ := b.appPasswords.flight.Do(subject, func() (any, error) {
		return b.loadAppPasswordOnce(context.WithoutCancel(ctx), subject)
	})
	if err != nil {
		return "", err
	}
	return v.(string), nil
}

func (b *Broker) loadAppPasswordOnce(ctx context.Context, subject string) (string, error) {
	ap := b.appPasswords
	now := b.now()
	g, err := ap.store.loadGrant(ctx, subject)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		ap.cache.put(subject, appPasswordEntry{until: now.Add(appPasswordAbsentFor).UnixNano()})
		return "", nil
	case err != nil:
		return "", errUnavailable("reading the user's app password", storageFailed("app password: reading", err))
	}
	if !g.RevokedAt.IsZero() {
		ap.cache.put(subject, appPasswordEntry{until: now.Add(appPasswordAbsentFor).UnixNano()})
		return "", nil
	}
	password, err := ap.store.password(g)
	if err != nil {
		return "", errServer(http.StatusInternalServerError, "the app password could not be opened", err)
	}
	creds := nextcloud.Credentials{LoginName: g.LoginName, AppPassword: password}
	header := nextcloud.BasicAuthorization(g.LoginName, password)
	// Read again from storage after appPasswordMemoryTrust, so that a revocation on
	// another node reaches this one; Nextcloud is asked only every
	// appPasswordConfirmInterval, or appPasswordRetry after it did not answer.
	e := appPasswordEntry{header: header, until: now.Add(appPasswordMemoryTrust).UnixNano()}
	if now.Sub(g.ConfirmedAt) >= appPasswordConfirmInterval && now.UnixNano() >= ap.cache.peek(subject).retryConfirmAt {
		if !ap.throttled(now) {
			ok, err := b.confirmAppPassword(ctx, g, creds)
			if err != nil {
				return "", err
			}
			if !ok {
				ap.cache.put(subject, appPasswordEntry{until: now.Add(appPasswordAbsentFor).UnixNano()})
				return "", nil
			}
		}
		if now.Sub(g.ConfirmedAt) >= appPasswordConfirmInterval {
			e.retryConfirmAt = now.Add(appPasswordRetry).UnixNano() // not confirmed: used, and asked again soon
		}
	} else if now.Sub(g.ConfirmedAt) >= appPasswordConfirmInterval {
		e.retryConfirmAt = ap.cache.peek(subject).retryConfirmAt
	}
	ap.cache.put(subject, e)
	return header, nil
}

// confirmAppPassword asks Nextcloud whom g's app password authenticates as and tells
// whether it may still be used: false only when Nextcloud refused it (then it is marked
// revoked) or named another user (then it is deleted). No answer leaves it as it was.
func (b *Broker) confirmAppPassword(ctx context.Context, g *AppPasswordGrant, creds nextcloud.Credentials) (bool, error) {
	ap := b.appPasswords
	user, err := ap.nc.CurrentUser(ctx, creds)
	switch {
	case errors.Is(err, nextcloud.ErrInvalidCredentials):
		if err := b.updateAppPassword(ctx, g, func(cur *AppPasswordGrant) string {
			cur.RevokedAt = b.now().UTC()
			return ""
		}); err != nil {
			b.log.delegation.Error("marking the app password revoked", zap.String("subject", g.Subject), zap.Error(err))
		}
		b.audit(auditAppPasswordRevoked, "", zap.String("reason", "nextcloud_refused"), zap.String("subject", g.Subject),
			zap.String("nextcloud_user", g.NextcloudUser))
		return false, nil
	case err != nil:
		if !b.noteThrottle(err) {
			b.log.delegation.Warn("Nextcloud did not confirm the app password; still used", zap.String("subject", g.Subject), zap.Error(err))
		}
		return true, nil
	case subtle.ConstantTimeCompare([]byte(user.ID), []byte(g.NextcloudUser)) != 1:
		b.log.delegation.Error("the stored app password authenticates as another Nextcloud user; deleted",
			zap.String("subject", g.Subject), zap.String("nextcloud_user", g.NextcloudUser), zap.String("authenticates_as", user.ID))
		b.deleteAtNextcloud(ctx, g.Subject, creds)
		if err := b.updateAppPassword(ctx, g, func(cur *AppPasswordGrant) string {
			cur.RevokedAt = b.now().UTC()
			return ""
		}); err != nil {
			b.log.delegation.Error("deleting the app password", zap.String("subject", g.Subject), zap.Error(err))
		}
		b.audit(auditAppPasswordRevoked, "", zap.String("reason", "another_account"), zap.String("subject", g.Subject),
			zap.String("nextcloud_user", g.NextcloudUser), zap.String("authenticates_as", user.ID))
		return false, nil
	}
	if err := b.updateAppPassword(ctx, g, func(cur *AppPasswordGrant) string {
		cur.ConfirmedAt = b.now().UTC()
		g.ConfirmedAt = cur.ConfirmedAt
		return creds.AppPassword
	}); err != nil {
		b.log.delegation.Warn("recording the app password's confirmation", zap.String("subject", g.Subject), zap.Error(err))
	}
	return true, nil
}

// updateAppPassword changes the stored record of g under its user's lock, if it still
// holds g's app password (a new grant may have replaced it meanwhile): change returns
// the password to seal in ("" for none).
func (b *Broker) updateAppPassword(ctx context.Context, g *AppPasswordGrant, change func(cur *AppPasswordGrant) string) error {
	ap := b.appPasswords
	unlock, err := ap.store.lock(ctx, g.Subject)
	if err != nil {
		return err
	}
	defer unlock()
	cur, err := ap.store.loadGrant(ctx, g.Subject)
	if errors.Is(err, storage.ErrNotFound) || (err == nil && cur.AppPassword != g.AppPassword) {
		return nil
	}
	if err != nil {
		return err
	}
	return ap.store.putGrant(ctx, cur, change(cur))
}

// deleteAtNextcloud deletes an app password in Nextcloud and tells whether it is gone
// there (deleted now, or unknown already). When Nextcloud cannot be asked now, the
// deletion is queued, sealed, for the poller to retry (retryDeletions).
func (b *Broker) deleteAtNextcloud(ctx context.Context, subject string, creds nextcloud.Credentials) bool {
	ctx = context.WithoutCancel(ctx)
	var err error
	if b.appPasswords.throttled(b.now()) {
		err = errors.New("throttled by Nextcloud's brute-force protection")
	} else {
		callCtx, cancel := context.WithTimeout(ctx, b.cfg.IdPTimeout)
		err = b.appPasswords.nc.DeleteAppPassword(callCtx, creds)
		cancel()
		if err == nil || errors.Is(err, nextcloud.ErrInvalidCredentials) {
			return true
		}
		b.noteThrottle(err)
	}
	d := AppPasswordDeletion{Subject: subject, LoginName: creds.LoginName, CreatedAt: b.now().UTC()}
	if qerr := b.appPasswords.store.putDeletion(ctx, &d, creds.AppPassword); qerr != nil {
		b.log.delegation.Error("the app password could not be deleted in Nextcloud nor queued for deletion; it stays valid there until the user removes it under Settings, Security, Devices & sessions",
			zap.String("subject", subject), zap.String("login_name", creds.LoginName), zap.Error(err), zap.NamedError("queueing", qerr))
		return false
	}
	b.log.delegation.Warn("the app password could not be deleted in Nextcloud yet; queued for retry",
		zap.String("subject", subject), zap.String("login_name", creds.LoginName), zap.Error(err))
	return false
}

// retryDeletions retries the queued deletions of app passwords in Nextcloud, once each,
// while Nextcloud does not throttle the broker.
func (b *Broker) retryDeletions(ctx context.Context) error {
	ap := b.appPasswords
	keys, err := ap.store.deletionKeys(ctx, loginFlowPollLimit)
	if err != nil {
		return fmt.Errorf("listing app password deletions: %w", err)
	}
	for _, key := range keys {
		if ap.throttled(b.now()) || ctx.Err() != nil {
			return ctx.Err()
		}
		d, password, err := ap.store.loadDeletionAt(ctx, key)
		if err != nil {
			if d != nil { // unopenable: nothing to delete with
				_ = ap.store.deleteDeletion(ctx, d)
			}
			continue
		}
		callCtx, cancel := context.WithTimeout(ctx, b.cfg.IdPTimeout)
		err = ap.nc.DeleteAppPassword(callCtx, nextcloud.Credentials{LoginName: d.LoginName, AppPassword: password})
		cancel()
		if err != nil && !errors.Is(err, nextcloud.ErrInvalidCredentials) {
			b.noteThrottle(err)
			continue
		}
		if err := ap.store.deleteDeletion(ctx, d); err != nil {
			b.log.delegation.Warn("removing a done app password deletion", zap.Error(err))
		}
		b.log.delegation.Info("queued app password deleted in Nextcloud", zap.String("subject", d.Subject), zap.String("login_name", d.LoginName))
	}
	return nil
}

// elicitAppPassword answers a tool call of a user without an app password with a one-time
// link that starts Login Flow v2, as the request's revision asks for user input (askUser).
func (b *Broker) elicitAppPassword(w http.ResponseWriter, r *http.Request, who *idp.Principal, raw string, in *inputRound) error {
	ctx := r.Context()
	user, err := b.nextcloudUserOf(ctx, who, raw)
	if err != nil {
		return err
	}
	token, err := b.appPasswordLink(ctx, who, user)
	if err != nil {
		return err
	}
	u := b.issuer + pathAppPasswordStart + "?" + url.Values{"link": {token}}.Encode()
	b.log.delegation.Info("tool needs a Nextcloud app password; URL elicitation sent", zap.String("subject", who.Subject))
	return b.askUser(w, r, who, in, userStep{
		key:     inputKeyAppPassword,
		link:    u,
		message: "This tool needs access to your Nextcloud account. Open " + u + " to grant it, then try again.",
		prompt:  "This tool needs access to your Nextcloud account. Sign in to Nextcloud to grant it, then try again.",
	})
}

// appPasswordLink is the token of the user's current one-time link for Nextcloud user
// user: the one an earlier call stored while it is live and younger than
// appPasswordLinkReuse, else a new one. A user's tool calls in a row thus store one
// link, not one each (SECURITY.md S1.27).
func (b *Broker) appPasswordLink(ctx context.Context, who *idp.Principal, user string) (string, error) {
	ap := b.appPasswords
	if token, err := ap.store.currentLink(ctx, who.Subject, user); err == nil {
		if _, err := ap.links.peek(ctx, token); err == nil {
			return token, nil
		}
	}
	token := randomToken()
	now := b.now().UTC()
	link := AppPasswordLink{Subject: who.Subject, ClientID: who.ClientID, NextcloudUser: user, CreatedAt: now}
	if err := ap.links.put(ctx, token, link); err != nil {
		return "", errStorage("app password: storing link", err)
	}
	if err := ap.store.putCurrentLink(ctx, who.Subject, user, token, now, appPasswordLinkReuse); err != nil {
		return "", errStorage("app password: storing link", err)
	}
	return token, nil
}

// nextcloudUserOf is the Nextcloud user id the caller's token names: its user_claim.
// The token was verified; sub is the principal's subject, any other claim is read from
// the verified JWT (progressive mode) or the login's ID token (hybrid mode).
func (b *Broker) nextcloudUserOf(ctx context.Context, who *idp.Principal, raw string) (string, error) {
	claim := b.appPasswords.claim
	if claim == "sub" {
		return who.Subject, nil
	}
	jwt := raw
	if b.cfg.Mode == ModeHybrid {
		s, err := b.sessions.load(ctx, who.SessionID)
		if err != nil {
			return "", errUnavailable("reading the session", storageFailed("app password: loading session", err))
		}
		g, err := b.sessions.grant(s)
		if err != nil {
			return "", errServer(http.StatusInternalServerError, "the session could not be opened", err)
		}
		jwt = g.IDToken
	}
	if v := stringClaim(jwt, claim); v != "" {
		return v, nil
	}
	return "", errServer(http.StatusInternalServerError, "the user's token names no Nextcloud user",
		fmt.Errorf("app password: the user's token has no string claim %q (user_claim)", claim))
}

// stringClaim reads a string claim from a JWT whose signature was checked before.
func stringClaim(jwt, claim string) string {
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return ""
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return ""
	}
	var claims map[string]any
	if json.Unmarshal(payload, &claims) != nil {
		return ""
	}
	v, _ := claims[claim].(string)
	return v
}

// serveAppPasswordStart is GET /oauth/app-password?link=: the user's browser opens the
// one-time link of an elicitation; the broker starts Login Flow v2 on the user's behalf
// and sends the browser to Nextcloud's login URL.
func (b *Broker) serveAppPasswordStart(w http.ResponseWriter, r *http.Request) {
	if err := b.appPasswordStart(w, r); err != nil {
		b.writeError(w, r, err)
	}
}

func (b *Broker) appPasswordStart(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return errMethodNotAllowed("GET")
	}
	if len(r.URL.RawQuery) > offlineAccessQueryMax {
		return errInvalidRequest("query too long")
	}
	token := r.URL.Query().Get("link")
	if token == "" {
		return b.errOfflineAccessPage(http.StatusBadRequest, "Bad request", "The link parameter is missing.")
	}
	if err := b.allowOneTimeValue(r, b.errOfflineAccessPage(http.StatusTooManyRequests, "Try again",
		"Too many requests from your network right now. Wait a minute, then open the link again.")); err != nil {
		return err
	}
	ap := b.appPasswords
	if ap.throttled(b.now()) {
		e := b.errOfflineAccessPage(http.StatusServiceUnavailable, "Try again", "Nextcloud is not accepting the broker's requests right now; try again later.")
		e.retryAfter = unavailableRetry
		return e
	}
	ctx := r.Context()
	link, err := ap.links.take(ctx, token)
	switch {
	case errors.Is(err, errLinkIdentity):
		b.log.delegation.Error("an app password link's record does not match its binding; deleted, nothing started",
			zap.String("subject", link.Subject), zap.String("nextcloud_user", link.NextcloudUser))
		fallthrough
	case errors.Is(err, storage.ErrNotFound):
		return b.errOfflineAccessPage(http.StatusBadRequest, "Link expired", "This link is unknown, expired or already used. Call the tool again for a new one.")
	case err != nil:
		return b.errOfflineAccessPage(http.StatusInternalServerError, "Error", "The link could not be read; try again.").
			because(storageFailed("app password: taking link", err))
	}
	unlock, err := ap.store.lock(ctx, link.Subject)
	if err != nil {
		return b.errOfflineAccessPage(http.StatusInternalServerError, "Error", "The login could not be started; try again.").
			because(storageFailed("app password: locking", err))
	}
	defer unlock()
	// The user's flow pending with time left is the one this link continues: links
	// opened in a row start one flow at Nextcloud, not one each (SECURITY.md S1.27).
	if f, err := ap.store.loadFlow(ctx, link.Subject); err == nil && f.loginURL != "" && f.NextcloudUser == link.NextcloudUser &&
		b.now().Sub(f.StartedAt) < nextcloud.FlowLifetime-appPasswordLinkTTL {
		b.log.delegation.Info("the user's pending login flow continues", zap.String("subject", link.Subject))
		redirectToNextcloud(w, r, f.loginURL)
		return nil
	} else if err != nil {
		_ = b.refuseFlow(ctx, f, err)
	}
	flow, err := ap.nc.StartLoginFlow(ctx)
	if err != nil {
		b.noteThrottle(err)
		e := b.errOfflineAccessPage(http.StatusBadGateway, "Try again", "Nextcloud could not start the login; call the tool again for a new link.").
			because(fmt.Errorf("app password: %w", err))
		return e
	}
	pending := PendingLoginFlow{Subject: link.Subject, ClientID: link.ClientID, NextcloudUser: link.NextcloudUser, StartedAt: b.now().UTC(),
		pollToken: flow.PollToken, loginURL: flow.LoginURL}
	if err := ap.store.putFlow(ctx, &pending); err != nil {
		return b.errOfflineAccessPage(http.StatusInternalServerError, "Error", "The login could not be started; try again.").
			because(storageFailed("app password: storing login flow", err))
	}
	b.audit(auditAppPasswordFlowStarted, clientIP(r), zap.String("subject", link.Subject), zap.String("client_id", link.ClientID),
		zap.String("nextcloud_user", link.NextcloudUser))
	redirectToNextcloud(w, r, flow.LoginURL)
	return nil
}

// redirectToNextcloud sends the browser to a flow's login URL, which nothing may keep.
func redirectToNextcloud(w http.ResponseWriter, r *http.Request, loginURL string) {
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Referrer-Policy", "no-referrer")
	http.Redirect(w, r, loginURL, http.StatusFound)
}

// PollLoginFlows polls each pending Login Flow v2 of this site that is due, once, and
// retries the queued deletions of app passwords. Each poll holds its user's storage
// lock, so nodes sharing the storage take turns.
func (b *Broker) PollLoginFlows(ctx context.Context) error {
	if b.appPasswords == nil {
		return nil
	}
	keys, err := b.appPasswords.store.pendingFlowKeys(ctx, loginFlowPollLimit)
	if err != nil {
		return fmt.Errorf("listing login flows: %w", err)
	}
	for _, key := range keys {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := b.pollLoginFlow(ctx, key, ""); err != nil && !errors.Is(err, storage.ErrNotFound) {
			b.log.delegation.Warn("polling a login flow", zap.Error(err))
		}
	}
	return b.retryDeletions(ctx)
}

// PollLoginFlowsEvery runs PollLoginFlows every interval until ctx ends (the caller's
// background goroutine, beside the janitor). Nothing is done outside mode app_password.
func (b *Broker) PollLoginFlowsEvery(ctx context.Context, interval time.Duration) {
	if b.appPasswords == nil {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := b.PollLoginFlows(ctx); err != nil && ctx.Err() == nil {
				b.log.delegation.Warn("polling login flows", zap.Error(err))
			}
		}
	}
}

// pollLoginFlow polls the flow at key (or, with key empty, subject's flow) once, under
// its user's lock, and stores the app password it yields if it is the user's. It
// returns storage.ErrNotFound when there is no flow.
func (b *Broker) pollLoginFlow(ctx context.Context, key, subject string) error {
	ap := b.appPasswords
	var f *PendingLoginFlow
	var err error
	if key != "" {
		f, err = ap.store.loadFlowAt(ctx, key)
	} else {
		f, err = ap.store.loadFlow(ctx, subject)
	}
	if err != nil {
		return b.refuseFlow(ctx, f, err)
	}
	now := b.now()
	if now.Before(f.NextPollAt) || ap.throttled(now) {
		return nil
	}
	unlock, err := ap.store.lock(ctx, f.Subject)
	if err != nil {
		return err
	}
	defer unlock()
	if f, err = ap.store.loadFlowAt(ctx, f.key); err != nil {
		return b.refuseFlow(ctx, f, err) // or another node took it meanwhile
	}
	if now.Before(f.NextPollAt) {
		return nil // another node polled it meanwhile
	}
	if now.Sub(f.StartedAt) > nextcloud.FlowLifetime {
		b.log.delegation.Info("login flow expired without a grant", zap.String("subject", f.Subject))
		return ap.store.deleteFlow(ctx, f)
	}
	creds, err := ap.nc.PollLoginFlow(ctx, f.pollToken)
	switch {
	case errors.Is(err, nextcloud.ErrPending):
		// Held back, cluster-wide: a user's tool calls in a row poll once per
		// loginFlowPendingWait (SECURITY.md S1.27).
		f.NextPollAt = now.Add(loginFlowPendingWait)
		if perr := ap.store.putFlow(ctx, f); perr != nil {
			b.log.delegation.Warn("holding a pending login flow back", zap.Error(perr))
		}
		return nil
	case err != nil:
		f.NextPollAt = now.Add(loginFlowRetry)
		var te *nextcloud.ThrottledError
		if b.noteThrottle(err) && errors.As(err, &te) {
			f.NextPollAt = te.Until
		}
		if perr := ap.store.putFlow(ctx, f); perr != nil {
			b.log.delegation.Warn("holding a login flow back", zap.Error(perr))
		}
		return err
	}
	// Nextcloud answered once and forgot the flow: so does the broker.
	if err := ap.store.deleteFlow(ctx, f); err != nil {
		b.log.delegation.Warn("deleting a finished login flow", zap.Error(err))
	}
	b.storeGrantedAppPassword(ctx, f, creds)
	return nil
}

// refuseFlow deletes a flow whose identity is not the one it was stored with
// (errFlowIdentity), and returns err.
func (b *Broker) refuseFlow(ctx context.Context, f *PendingLoginFlow, err error) error {
	if errors.Is(err, errFlowIdentity) && f != nil {
		b.log.delegation.Error("a login flow's record does not match its key or seal; deleted, nothing polled",
			zap.String("subject", f.Subject), zap.String("nextcloud_user", f.NextcloudUser))
		if derr := b.appPasswords.store.deleteFlow(ctx, f); derr != nil {
			b.log.delegation.Warn("deleting a refused login flow", zap.Error(derr))
		}
	}
	return err
}

// storeGrantedAppPassword stores the app password a flow yielded when it authenticates as
// the Nextcloud user the flow was started for, else deletes it in Nextcloud. The caller
// holds the user's lock.
func (b *Broker) storeGrantedAppPassword(ctx context.Context, f *PendingLoginFlow, creds nextcloud.Credentials) {
	ap := b.appPasswords
	user, err := ap.nc.CurrentUser(ctx, creds)
	if err != nil || subtle.ConstantTimeCompare([]byte(user.ID), []byte(f.NextcloudUser)) != 1 {
		reason, fields := "another_account", []zap.Field{zap.String("authenticates_as", user.ID)}
		if err != nil {
			b.noteThrottle(err)
			reason, fields = "unverifiable", []zap.Field{zap.Error(err)}
		}
		deleted := b.deleteAtNextcloud(ctx, f.Subject, creds)
		b.log.delegation.Warn("the app password granted is not the user's, or could not be checked; nothing stored",
			append(fields, zap.String("subject", f.Subject), zap.String("nextcloud_user", f.NextcloudUser))...)
		b.audit(auditAppPasswordRefused, "", append(fields, zap.String("reason", reason), zap.String("subject", f.Subject),
			zap.String("nextcloud_user", f.NextcloudUser), zap.Bool("deleted_in_nextcloud", deleted))...)
		return
	}
	if old, err := ap.store.loadGrant(ctx, f.Subject); err == nil && old.RevokedAt.IsZero() {
		if pw, err := ap.store.password(old); err == nil && pw != creds.AppPassword {
			b.deleteAtNextcloud(ctx, f.Subject, nextcloud.Credentials{LoginName: old.LoginName, AppPassword: pw})
		}
	}
	now := b.now().UTC()
	g := AppPasswordGrant{
		Subject: f.Subject, ClientID: f.ClientID, NextcloudUser: user.ID, LoginName: creds.LoginName,
		GrantedAt: now, ConfirmedAt: now,
	}
	if err := ap.store.putGrant(ctx, &g, creds.AppPassword); err != nil {
		b.log.delegation.Error("storing the app password; deleting it in Nextcloud", zap.String("subject", f.Subject), zap.Error(err))
		b.deleteAtNextcloud(ctx, f.Subject, creds)
		return
	}
	ap.cache.evict(f.Subject)
	b.audit(auditAppPasswordGranted, "", zap.String("subject", f.Subject), zap.String("client_id", f.ClientID),
		zap.String("nextcloud_user", user.ID))
}

// revokeAppPassword deletes subject's app password in Nextcloud and here, and any flow
// pending for it (the user revoked offline access, or the last session:
// releaseAppPassword). Failures are logged.
func (b *Broker) revokeAppPassword(ctx context.Context, subject, reason, ip string) {
	ap := b.appPasswords
	if ap == nil || subject == "" {
		return
	}
	ctx = context.WithoutCancel(ctx)
	ap.cache.evict(subject)
	unlock, err := ap.store.lock(ctx, subject)
	if err != nil {
		b.log.delegation.Error("revoking the app password: locking", zap.String("subject", subject), zap.Error(err))
		return
	}
	defer unlock()
	defer ap.cache.evict(subject)
	if f, err := ap.store.loadFlow(ctx, subject); err == nil {
		_ = ap.store.deleteFlow(ctx, f)
	}
	g, err := ap.store.loadGrant(ctx, subject)
	if err != nil {
		if !errors.Is(err, storage.ErrNotFound) {
			b.log.delegation.Error("revoking the app password: reading", zap.String("subject", subject), zap.Error(err))
		}
		return
	}
	deleted := !g.RevokedAt.IsZero()
	if !deleted {
		if pw, err := ap.store.password(g); err == nil {
			deleted = b.deleteAtNextcloud(ctx, subject, nextcloud.Credentials{LoginName: g.LoginName, AppPassword: pw})
		}
	}
	if err := ap.store.deleteGrant(ctx, g); err != nil {
		b.log.delegation.Error("revoking the app password: deleting", zap.String("subject", subject), zap.Error(err))
	}
	b.audit(auditAppPasswordRevoked, ip, zap.String("reason", reason), zap.String("subject", subject),
		zap.String("nextcloud_user", g.NextcloudUser), zap.Bool("deleted_in_nextcloud", deleted))
}

// noteAppPasswordSession records a new hybrid session of subject (AppPasswordSessions), so
// that ending another one knows this one lives. Failures are logged: a session not
// recorded only makes an earlier revocation delete the app password.
func (b *Broker) noteAppPasswordSession(ctx context.Context, subject, sessionID string) {
	ap := b.appPasswords
	if ap == nil {
		return
	}
	ctx = context.WithoutCancel(ctx)
	unlock, err := ap.store.lock(ctx, subject)
	if err != nil {
		b.log.delegation.Warn("recording the user's session: locking", zap.Error(err))
		return
	}
	defer unlock()
	ids, key, err := ap.store.sessions(ctx, subject)
	if err != nil {
		b.log.delegation.Warn("recording the user's session: reading", zap.Error(err))
		return
	}
	if len(ids) >= appPasswordSessionsMax {
		ids = b.liveSessions(ctx, ids, "")
	}
	ids = append(ids, sessionID)
	if over := len(ids) - appPasswordSessionsMax; over > 0 {
		ids = ids[over:]
	}
	if err := ap.store.putSessions(ctx, subject, ids, key, b.cfg.SessionMaxLifetime); err != nil {
		b.log.delegation.Warn("recording the user's session", zap.Error(err))
	}
}

// liveSessions are those of ids, but except, whose session still lives, in order. A
// session that cannot be read counts as live.
func (b *Broker) liveSessions(ctx context.Context, ids []string, except string) []string {
	live := make([]string, 0, len(ids))
	for _, id := range ids {
		if id == except {
			continue
		}
		if _, err := b.sessions.load(ctx, id); errors.Is(err, storage.ErrNotFound) {
			continue
		}
		live = append(live, id)
	}
	return live
}

// releaseAppPassword is the end of subject's session sessionID for the user's app
// password: it is the user's, not the session's, so it is revoked (revokeAppPassword)
// only when no other recorded session of the user lives (SECURITY.md S1.29).
func (b *Broker) releaseAppPassword(ctx context.Context, subject, sessionID, reason, ip string) {
	ap := b.appPasswords
	if ap == nil || subject == "" {
		return
	}
	ctx = context.WithoutCancel(ctx)
	if sessionID != "" {
		if others := b.otherAppPasswordSessions(ctx, subject, sessionID); others > 0 {
			b.log.delegation.Info("a session of the user ended; the app password stays for the user's other sessions",
				zap.String("subject", subject), zap.Int("other_sessions", others))
			return
		}
	}
	b.revokeAppPassword(ctx, subject, reason, ip)
}

// otherAppPasswordSessions forgets sessionID and the ended sessions among subject's
// recorded ones, and counts those left. When the record cannot be read or written it
// says 0: the app password is then revoked, as before sessions were recorded.
func (b *Broker) otherAppPasswordSessions(ctx context.Context, subject, sessionID string) int {
	ap := b.appPasswords
	unlock, err := ap.store.lock(ctx, subject)
	if err != nil {
		b.log.delegation.Warn("reading the user's sessions: locking", zap.Error(err))
		return 0
	}
	defer unlock()
	ids, key, err := ap.store.sessions(ctx, subject)
	if err != nil {
		b.log.delegation.Warn("reading the user's sessions", zap.Error(err))
		return 0
	}
	live := b.liveSessions(ctx, ids, sessionID)
	if err := ap.store.putSessions(ctx, subject, live, key, b.cfg.SessionMaxLifetime); err != nil {
		b.log.delegation.Warn("recording the user's sessions", zap.Error(err))
		return 0
	}
	return len(live)
}
