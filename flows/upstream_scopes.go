package flows

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
)

// The scopes the broker offers clients: the configured ones and, opt-in, those the upstream
// MCP server names in its own RFC 9728 protected-resource metadata (`scopes_supported`),
// read from Config.UpstreamMetadata. The learned scopes join the configured ones wherever
// the broker offers scopes: its metadata documents and challenges, what clients whose
// scopes are not configured may ask for, and so what the IdP login asks (idp_login.go).
//
// The document is fetched in the background, never while Caddy provisions (which also runs
// for `caddy validate`): first a moment after LearnUpstreamScopes starts, then every
// upstreamScopesRefresh; a failure is retried with backoff and logged once at WARN until
// a fetch succeeds again. Until the first success the configured scopes alone apply; after
// one, a failed refresh keeps what was learned. The URL is the administrator's, so it is not
// held to safehttp's public-address rule, but what it answers is bounded: size, time, and
// the number, length and grammar (RFC 6749 §3.3) of the scopes. A document that breaks a
// bound is refused whole.

const (
	// maxUpstreamMetadataBytes bounds the metadata document read.
	maxUpstreamMetadataBytes = 64 << 10
	// maxLearnedScopes bounds how many scopes the document may name.
	maxLearnedScopes = 100
	// maxLearnedScopeLen bounds the length of one scope, in bytes.
	maxLearnedScopeLen = 128
)

// learnSchedule is when LearnUpstreamScopes fetches: start after it begins, refresh after
// a success, retry after a first failure, doubling up to maxRetry.
type learnSchedule struct {
	start, refresh, retry, maxRetry time.Duration
}

// defaultLearnSchedule: the first fetch waits a little, so that a `caddy validate`, which
// provisions and stops at once, fetches nothing.
var defaultLearnSchedule = learnSchedule{
	start:    2 * time.Second,
	refresh:  time.Hour,
	retry:    5 * time.Second,
	maxRetry: 5 * time.Minute,
}

// scopeOffer is what the broker offers at the moment, built whole and replaced whole, read
// without a lock.
type scopeOffer struct {
	// scopes are the configured scopes, then the learned ones not among them.
	scopes []string
	// advertised are scopes less offline_access (advertisedScopes).
	advertised []string
	// base are what a first login is pointed to: Config.BaseScopes less offline_access,
	// or advertised when none are configured. The protected-resource metadata's
	// scopes_supported and the 401 challenge's scope name them.
	base []string
	// managed are compared with what the IdP granted (granted.go).
	managed []string
	// challengeTail is `resource_metadata="…"[, scope="…"]` (base), prebuilt for 401 challenges.
	challengeTail string
	// learned are the scopes the upstream's metadata named, as read.
	learned []string
}

// newScopeOffer builds the offer of cfg with learned added.
func (b *Broker) newScopeOffer(cfg *Config, learned []string) *scopeOffer {
	o := &scopeOffer{scopes: slices.Clone(cfg.Scopes), learned: learned}
	for _, s := range learned {
		o.scopes = appendUnique(o.scopes, s)
	}
	o.advertised = advertisedScopes(o.scopes)
	o.managed = sortedSet(managedScopes(cfg), slices.DeleteFunc(slices.Clone(learned), func(s string) bool {
		return slices.Contains(identityScopes, s)
	}))
	o.base = o.advertised
	if len(cfg.BaseScopes) > 0 {
		o.base = advertisedScopes(cfg.BaseScopes)
	}
	o.challengeTail = `resource_metadata="` + b.metadataURL + `"`
	if len(o.base) > 0 {
		o.challengeTail += `, scope="` + strings.Join(o.base, " ") + `"`
	}
	return o
}

// offer is the broker's scope offer now.
func (b *Broker) offer() *scopeOffer { return b.offered.Load() }

// scopesOf is what client c may ask for: its own scopes, or, for a client whose scopes
// were not set, every scope the broker offers now.
func (b *Broker) scopesOf(c *Client) []string {
	if c.offered {
		return b.offer().scopes
	}
	return c.Scopes
}

// clientAllows tells whether every scope asked is one c may ask for; `openid` is always
// allowed.
func (b *Broker) clientAllows(c *Client, asked []string) bool {
	allowed := b.scopesOf(c)
	for _, s := range asked {
		if s != "openid" && !slices.Contains(allowed, s) {
			return false
		}
	}
	return true
}

// LearnUpstreamScopes reads the upstream's protected-resource metadata in the background
// until ctx ends (see the top of this file). It returns at once when no
// Config.UpstreamMetadata is configured.
func (b *Broker) LearnUpstreamScopes(ctx context.Context) {
	if b.cfg.UpstreamMetadata == "" {
		return
	}
	s := b.learnSchedule
	retry, failing := s.retry, false
	timer := time.NewTimer(s.start)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		learned, err := b.fetchUpstreamScopes(ctx)
		switch {
		case err == nil:
			changed := !slices.Equal(learned, b.offer().learned)
			b.offered.Store(b.newScopeOffer(&b.cfg, learned))
			if changed || failing {
				b.log.resource.Info("scopes learned from the upstream's protected-resource metadata",
					zap.String("upstream_metadata", b.cfg.UpstreamMetadata), zap.Strings("scopes", learned))
			}
			retry, failing = s.retry, false
			timer.Reset(s.refresh)
		case ctx.Err() != nil:
			return
		default:
			fields := []zap.Field{zap.String("upstream_metadata", b.cfg.UpstreamMetadata), zap.Error(err),
				zap.Duration("retry_in", retry)}
			if !failing {
				b.log.resource.Warn("reading the upstream's protected-resource metadata failed; offering the configured scopes and those learned before, and trying again", fields...)
			} else {
				b.log.resource.Debug("reading the upstream's protected-resource metadata failed again", fields...)
			}
			failing = true
			timer.Reset(retry)
			retry = min(2*retry, s.maxRetry)
		}
	}
}

// errUpstreamMetadata marks a metadata document the broker refuses.
var errUpstreamMetadata = errors.New("upstream metadata refused")

// fetchUpstreamScopes reads scopes_supported from Config.UpstreamMetadata, bounded by
// idp_timeout and the limits above.
func (b *Broker) fetchUpstreamScopes(ctx context.Context) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.IdPTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.cfg.UpstreamMetadata, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := b.upstreamClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%w: status %d", errUpstreamMetadata, resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxUpstreamMetadataBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading: %w", err)
	}
	if len(body) > maxUpstreamMetadataBytes {
		return nil, fmt.Errorf("%w: over %d bytes", errUpstreamMetadata, maxUpstreamMetadataBytes)
	}
	var doc struct {
		ScopesSupported *[]string `json:"scopes_supported"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, fmt.Errorf("%w: not a JSON object with scopes_supported a list of strings", errUpstreamMetadata)
	}
	if doc.ScopesSupported == nil {
		return nil, fmt.Errorf("%w: no scopes_supported", errUpstreamMetadata)
	}
	scopes := *doc.ScopesSupported
	if len(scopes) > maxLearnedScopes {
		return nil, fmt.Errorf("%w: scopes_supported names %d scopes, over %d", errUpstreamMetadata, len(scopes), maxLearnedScopes)
	}
	var learned []string
	for i, s := range scopes {
		if len(s) > maxLearnedScopeLen || !IsScopeToken(s) {
			return nil, fmt.Errorf("%w: scopes_supported[%d] is not a scope token of at most %d bytes (RFC 6749 §3.3)",
				errUpstreamMetadata, i, maxLearnedScopeLen)
		}
		learned = appendUnique(learned, s)
	}
	return learned, nil
}

// IsScopeToken tells whether s is an RFC 6749 §3.3 scope token: printable ASCII without
// space, `"` or `\`, at least one character. Anything else would break the space-separated
// scope strings and the quoted `scope` of WWW-Authenticate challenges.
func IsScopeToken(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if c <= ' ' || c > '~' || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// newUpstreamClient is the HTTP client of the metadata fetch: bounded by timeout, and
// following no redirect (the configured URL is the document).
func newUpstreamClient(timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}
