package flows

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/tokencache"
)

// Per-request delegation: the upstream never sees the client's token. It gets a token
// the IdP issued for it (audience = delegation.audience), scoped to what the call needs:
//
//   - token_exchange (RFC 8693): the subject is the client's own token in progressive
//     mode, the session's IdP access token in hybrid mode (refreshed first when it has
//     expired). One token per (session or client token, scope set): a tools/call gets
//     its tool_scope scopes, anything else the client's whole grant (delegation.scopes
//     when configured); with `narrow none` every call gets the whole grant.
//   - refresh (IdPs without RFC 8693, hybrid mode only): the refresh grant on the
//     session's own IdP grant, narrowed to one scope set per session (see
//     refreshScopes). The token a refresh yields is the session's IdP access token from
//     then on, sealed in the session like the login's was, so that every node of a
//     cluster uses the one token a rotation produced.
//   - "" (auto): token_exchange when the IdP's discovery advertises the grant, else
//     refresh (hybrid) or 502 (progressive).
//
// Delegated tokens of token_exchange are never written to storage: they live in the
// delegatedCache (delegation_cache.go), whose bounds the README repeats.

// delegation is the broker's delegation state, built in New.
type delegation struct {
	// configured is the mode asked for: token_exchange, refresh or "" (auto).
	configured string
	// resolved is the mode auto settled on, once discovery answered.
	resolved atomic.Pointer[string]
	// defaultScopes are asked for a call no tool_scope rule covers: delegation.scopes,
	// sorted; nil (not configured): the client's whole grant, its identity scopes
	// included, since an upstream may show its tools by the token's scopes (the Nextcloud
	// MCP server filters tools/list so, and gates its own tools on openid).
	defaultScopes []string
	// refreshScopes are what refresh delegation narrows to: defaultScopes and every
	// tool_scope scope, sorted; nil: the client's whole grant. One set per session,
	// because a refresh at the Nextcloud oidc app (and zitadel) kills the access token
	// the previous one gave, and some IdPs (zitadel) narrow the refresh token along with
	// the access token: per-call scope sets would kill each other's tokens or lose scopes
	// for good.
	refreshScopes []string
	// wholeGrant gives every call, tool calls too, the client's whole grant
	// (delegation `narrow none`).
	wholeGrant bool
	// resource is sent as RFC 8707 `resource` on refresh: the delegation audience when it
	// is an absolute URI (RFC 8707 §2 allows nothing else), else nothing.
	resource string

	cache *delegatedCache

	noExchangeLogged atomic.Bool
}

// identityScopes describe the user to the client (OIDC Core §5.4, §11); they grant no
// access to an upstream API, so the scopes the broker compares with the IdP's grant
// leave them out (granted.go).
var identityScopes = []string{"openid", "offline_access", "profile", "email", "address", "phone"}

// sessionIdentityScopes are the identity scopes every hybrid session's IdP grant holds:
// idpLoginScopes asks them at each login.
var sessionIdentityScopes = []string{"openid"}

// newDelegation builds the delegation state of cfg (defaults filled in).
func newDelegation(cfg *Config) *delegation {
	d := &delegation{
		configured: cfg.DelegationMode,
		cache:      newDelegatedCache(delegationCacheEntries),
	}
	switch {
	case cfg.DelegationNarrow == DelegationNarrowNone:
		d.wholeGrant = true
	case len(cfg.DelegationScopes) > 0:
		d.defaultScopes = sortedSet(nil, cfg.DelegationScopes)
		d.refreshScopes = d.defaultScopes
		for _, rule := range cfg.ToolScopes {
			d.refreshScopes = sortedSet(d.refreshScopes, rule.Scopes)
		}
	}
	if u, err := url.Parse(cfg.DelegationAudience); err == nil && u.IsAbs() && u.Host != "" {
		d.resource = cfg.DelegationAudience
	}
	switch cfg.DelegationMode {
	case DelegationTokenExchange, DelegationRefresh:
		m := cfg.DelegationMode
		d.resolved.Store(&m)
	}
	return d
}

// sortedSet returns the sorted union of list and add, without duplicates.
func sortedSet(list, add []string) []string {
	out := slices.Clone(list)
	for _, s := range add {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	slices.Sort(out)
	return out
}

// narrowScopes appends to dst the scopes of want that granted holds, once each, sorted.
// It allocates nothing while dst has room.
func narrowScopes(dst, want, granted []string) []string {
	for _, s := range want {
		if slices.Contains(granted, s) && !slices.Contains(dst, s) {
			dst = append(dst, s)
		}
	}
	slices.Sort(dst)
	return dst
}

// delegationFlightTimeout bounds one cold delegation: a wait for the session lock and
// up to three IdP calls, each bounded by the IdP timeout on its own.
func (b *Broker) delegationFlightTimeout() time.Duration { return 3 * b.cfg.IdPTimeout }

// delegateInto gives the upstream request out what the configured delegation mode says
// in place of the client's token, or returns the error to answer the client with.
// tok is the client's token (the subject of a token exchange in progressive mode); need
// is what this call needs by the tool_scope rules (empty: the default scopes).
func (b *Broker) delegateInto(out *http.Request, who *idp.Principal, tok presentedToken, need []string) error {
	if b.cfg.DelegationMode == DelegationNone {
		out.Header.Set(b.cfg.SubjectHeader, who.Subject)
		return nil
	}
	d := b.delegation
	ctx := out.Context()
	var mode string
	if m := d.resolved.Load(); m != nil {
		mode = *m
	} else {
		var err error
		if mode, err = b.resolveDelegationMode(ctx); err != nil {
			return b.delegationFailed(who, nil, err)
		}
	}
	hybrid := b.cfg.Mode == ModeHybrid
	if !hybrid && mode == DelegationRefresh {
		return b.delegationFailed(who, nil, errNoTokenExchange)
	}
	if hybrid && who.SessionID == "" {
		return b.delegationFailed(who, nil, &delegationError{failInternal, errors.New("delegating: hybrid principal without a session")})
	}

	var buf [8]string
	want := need
	switch {
	case mode == DelegationRefresh:
		want = d.refreshScopes
	case d.wholeGrant:
		want = nil
	case len(want) == 0:
		want = d.defaultScopes
	}
	whole := want == nil
	if whole {
		want = who.Scopes
	}
	scopes := narrowScopes(buf[:0], want, who.Scopes)
	if hybrid && len(scopes) == 0 && (len(want) > 0 || whole) {
		// Nothing left to narrow to: asking without `scope` (or refreshing the whole
		// grant) would hand the upstream every scope of the session's IdP grant, which
		// may hold more than this client was granted (sessions of earlier releases hold
		// every configured scope).
		step := want
		switch {
		case whole:
			step = b.offer().advertised
		case mode == DelegationRefresh && len(d.defaultScopes) > 0:
			step = d.defaultScopes
		}
		return b.errInsufficientScope(who, step)
	}
	if whole && hybrid && mode != DelegationRefresh {
		// The session's grant holds openid whether the client asked it or not (the login
		// always asks it: idpLoginScopes), and a refresh of the whole grant hands it on;
		// a token exchange does so only when asked (Keycloak puts openid in a token's
		// scope only then). An upstream may gate tools on it: the Nextcloud MCP server
		// its provisioning tools.
		scopes = narrowScopes(scopes, sessionIdentityScopes, sessionIdentityScopes)
	}
	var key delegationKey
	if hybrid {
		key = sessionDelegationKey(who.SessionID, scopes)
	} else {
		if tok.digest == ([sha256.Size]byte{}) {
			tok.digest = tokencache.Key(tok.raw) // never one cache entry for every token
		}
		key = tokenDelegationKey(tok.digest, scopes)
	}
	if h, ok := d.cache.get(key, b.now().UnixNano()); ok {
		b.count(DelegationCacheHit)
		out.Header.Set("Authorization", h)
		b.debugDelegated("delegated token from the cache", mode, who, scopes)
		return nil
	}
	b.count(DelegationCacheMiss)

	h, err := b.delegateCold(ctx, mode, key, who, tok.raw, scopes)
	if err != nil {
		return b.delegationFailed(who, scopes, err)
	}
	out.Header.Set("Authorization", h)
	b.debugDelegated("delegated token obtained", mode, who, scopes)
	return nil
}

// debugDelegated logs at DEBUG which delegated token a request carries on: whose, for
// which scopes, never the token. Checked first, so that nothing is built (and scopes,
// which may live on the caller's stack, is only read) unless DEBUG is on.
func (b *Broker) debugDelegated(msg, mode string, who *idp.Principal, scopes []string) {
	if ce := b.log.delegation.Check(zap.DebugLevel, msg); ce != nil {
		ce.Write(zap.String("delegation", mode), zap.String("subject", who.Subject),
			zap.String("session", fingerprintOrEmpty(who.SessionID)), zap.String("scopes", strings.Join(scopes, " ")))
	}
}

// delegateCold obtains the delegated token for key, once for all concurrent callers.
func (b *Broker) delegateCold(ctx context.Context, mode string, key delegationKey, who *idp.Principal, raw string, scopes []string) (string, error) {
	own := slices.Clone(scopes) // the caller's array lives on its stack
	var session string
	var limit time.Time
	if b.cfg.Mode == ModeHybrid {
		session = who.SessionID
	} else {
		limit = who.Expiry // never serve a token exchanged for a client token that has expired
	}
	return b.delegation.cache.obtain(ctx, key, b.now, b.delegationFlightTimeout(), func(ctx context.Context) (delegatedEntry, error) {
		var tok IdPGrant
		var err error
		switch {
		case mode == DelegationRefresh:
			tok, err = b.refreshDelegated(ctx, session, own)
		case session != "":
			tok, err = b.exchangeForSession(ctx, session, own)
		default:
			tok, err = b.exchangeSubject(ctx, raw, own)
		}
		if err == nil {
			bound := tok.Scopes
			if session == "" {
				bound = who.Scopes // progressive: the client's token is the grant
			}
			err = b.checkDelegatedToken(tok, who.Subject, mode != DelegationRefresh, bound)
		}
		if err != nil {
			return delegatedEntry{}, err
		}
		if mode == DelegationRefresh {
			b.count(DelegationRefreshed)
		} else {
			b.count(DelegationExchanged)
		}
		return delegatedEntry{
			header:  "Bearer " + tok.AccessToken,
			expires: cacheUntil(b.now(), tok.Expiry, limit).UnixNano(),
			session: session,
		}, nil
	})
}

// resolveDelegationMode settles auto mode from the IdP's discovery document, once.
func (b *Broker) resolveDelegationMode(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.IdPTimeout)
	defer cancel()
	disc, err := b.idp.Discovery(ctx)
	if err != nil {
		return "", unavailable("choosing the delegation mode", err)
	}
	mode := DelegationRefresh
	if disc.SupportsTokenExchange() {
		mode = DelegationTokenExchange
	}
	if b.delegation.resolved.CompareAndSwap(nil, &mode) {
		b.log.delegation.Info("delegation mode chosen from the identity provider's discovery", zap.String("delegation", mode))
	}
	return *b.delegation.resolved.Load(), nil
}

// evictDelegated forgets the delegated tokens of a session on this node at once (on
// revocation). Other nodes stop using theirs within the cache bounds (delegation_cache.go).
func (b *Broker) evictDelegated(sessionID string) {
	if b.delegation != nil {
		b.delegation.cache.evictSession(sessionID)
	}
}

// Kinds of delegation failure, each with its answer to the client.
type delegationFailure int

const (
	failInternal    delegationFailure = iota // 500
	failUnavailable                          // the IdP is down or slow: 503, Retry-After
	failStorage                              // the session store failed: 503, Retry-After
	failRejected                             // the IdP refused the subject or grant: 401
	failSessionGone                          // the session no longer exists: 401
	failScope                                // the IdP will not grant the scopes: 403
	failMalformed                            // the IdP's answer is unusable: 502
	failRefused                              // the IdP refused the broker itself: 502
	failNoExchange                           // progressive mode, IdP without RFC 8693: 502
	failNoIdPGrant                           // a session from an ID-JAG, a mode that needs an IdP grant: 500
)

// delegationError is a failure of delegation, of a kind. Its text never holds a token.
type delegationError struct {
	kind delegationFailure
	err  error
}

func (e *delegationError) Error() string { return e.err.Error() }
func (e *delegationError) Unwrap() error { return e.err }

var errNoTokenExchange = &delegationError{failNoExchange,
	errors.New("delegating: the identity provider advertises no token exchange and progressive mode holds no grant to refresh")}

// errNoIdPGrant: the session was created from an enterprise ID-JAG and holds no IdP
// grant, which this delegation mode needs. New refuses such configurations; this is the
// guard behind that.
var errNoIdPGrant = &delegationError{failNoIdPGrant,
	errors.New("delegating: the session comes from an enterprise ID-JAG and holds no IdP grant to delegate with")}

// unavailable marks err, met while doing something, as the IdP being unreachable.
func unavailable(doing string, err error) error {
	return &delegationError{failUnavailable, fmt.Errorf("%s: %w", doing, err)}
}

// delegationFailed logs a failed delegation and returns the error to answer the client
// with. No path forwards the client's token instead.
func (b *Broker) delegationFailed(who *idp.Principal, scopes []string, err error) error {
	b.count(DelegationFailed)
	kind := failInternal
	var de *delegationError
	switch {
	case errors.As(err, &de):
		kind = de.kind
	case errors.Is(err, idp.ErrUnavailable), errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		kind = failUnavailable
	}
	fields := []zap.Field{zap.String("subject", who.Subject), zap.Error(err)}
	if who.SessionID != "" {
		fields = append(fields, zap.String("session", Fingerprint(who.SessionID)))
	}
	// Each kind is logged here, with whose delegation failed; the error answered carries
	// no cause, so the writer does not log it again.
	switch kind {
	case failUnavailable:
		b.log.delegation.Warn("identity provider unavailable", fields...)
		return errIdPUnavailable(nil)
	case failStorage:
		b.log.delegation.Error("session storage failed", fields...)
		e := newRequestError(http.StatusServiceUnavailable, "temporarily_unavailable", "the session store cannot be reached; try again shortly")
		e.retryAfter = unavailableRetry
		return e
	case failRejected:
		b.log.delegation.Info("identity provider refused the user's grant", fields...)
		return b.errBearer("invalid_token", "the identity provider refused the user's grant; sign in again")
	case failSessionGone:
		b.log.delegation.Debug("session gone", fields...)
		return b.errBearer("invalid_token", "the session has ended; sign in again")
	case failScope:
		b.log.delegation.Warn("identity provider refused the scopes", append(fields, zap.String("scopes", strings.Join(scopes, " ")))...)
		return b.errInsufficientScope(who, scopes)
	case failMalformed:
		b.log.delegation.Error("unusable answer from the identity provider", fields...)
		return newRequestError(http.StatusBadGateway, "server_error", "the identity provider gave an unusable answer")
	case failRefused:
		b.log.delegation.Error("identity provider refused the broker's request; check its client configuration", fields...)
		return newRequestError(http.StatusBadGateway, "server_error", "the identity provider refused the broker's delegation request")
	case failNoIdPGrant:
		b.log.delegation.Error("a session from an enterprise ID-JAG holds no IdP grant; use delegation none or app_password with enterprise_managed", fields...)
		return newRequestError(http.StatusInternalServerError, "server_error",
			"this session comes from an enterprise assertion and the broker's delegation mode needs an identity provider grant it does not hold")
	case failNoExchange:
		if b.delegation.noExchangeLogged.CompareAndSwap(false, true) {
			b.log.delegation.Error("the identity provider offers no token exchange (RFC 8693), which progressive mode needs; use mode hybrid or an IdP with token exchange")
		}
		return newRequestError(http.StatusBadGateway, "server_error", "the identity provider offers no token exchange")
	default:
		b.log.delegation.Error("delegation failed", fields...)
		return newRequestError(http.StatusInternalServerError, "server_error", "delegation failed")
	}
}
