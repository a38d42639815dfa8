package idp

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/internal/ratelimit"
)

// The cold-verification budget bounds what strangers can make the broker ask the IdP
// (SECURITY.md: strangers can make the broker call out): each junk opaque token costs an
// introspection with the broker's credentials, each JWT naming an unknown key a JWKS
// fetch. Only such cold verifications draw on it; a token whose verdict is cached, or a
// JWT signed by a known key, never does. Past it the answer is 429 (this address) or 503
// (everyone), with Retry-After, never 401: a 401 on a valid token makes a hosted client
// throw the token away and send its user through login again.
//
// Hosted clients (claude.ai, ChatGPT) reach the broker from a few shared egress addresses,
// so the per-address budget is generous.

// Defaults of the budget, in cold verifications a minute; each is also the burst.
const (
	DefaultColdVerifyRate       = 60
	DefaultColdVerifyRateGlobal = 600
)

// singleSourceEvidence is how many cold verifications from one private or loopback
// address, and no other, make the broker warn that trusted_proxies is probably missing.
const singleSourceEvidence = 50

// RetryLaterError turns a request away before it reaches the IdP. It says nothing about
// the token: it is never cached, and never answered with 401.
type RetryLaterError struct {
	// Status is the HTTP status to answer: 429 when this address spent its budget, 503
	// when everyone did (or the IdP's keys were fetched moments ago).
	Status int
	// RetryAfter is when to come back, for Retry-After.
	RetryAfter time.Duration
	reason     string
}

func (e *RetryLaterError) Error() string {
	return fmt.Sprintf("%s; retry in %v", e.reason, e.RetryAfter)
}

// AsRetryLater finds a *RetryLaterError in err, or returns nil. Its own function so that
// the warm path, where err is nil, does not pay for the variable errors.As needs.
func AsRetryLater(err error) *RetryLaterError {
	if err == nil {
		return nil
	}
	var later *RetryLaterError
	if errors.As(err, &later) {
		return later
	}
	return nil
}

// coldBudget is the token buckets of the cold verifications: one per client address (an
// IPv6 /56, as ratelimit.Key groups them), one for all.
type coldBudget struct {
	perIP, global int // a minute; <0: unlimited
	ips           *ratelimit.Limiter
	all           *ratelimit.Limiter
	logger        *zap.Logger

	mu      sync.Mutex
	source  string // the one address seen so far, while there is only one
	seen    int
	settled bool // a second address was seen, or the warning was given
}

func newColdBudget(perIP, global int, logger *zap.Logger) *coldBudget {
	if perIP == 0 {
		perIP = DefaultColdVerifyRate
	}
	if global == 0 {
		global = DefaultColdVerifyRateGlobal
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	return &coldBudget{perIP: perIP, global: global, ips: ratelimit.New(ratelimit.MaxAddresses), all: ratelimit.New(1), logger: logger}
}

// admit takes one cold verification from ip's bucket and the global one, or says when
// to come back. An unknown ip ("") draws on the global bucket only.
func (c *coldBudget) admit(ip string, now time.Time) error {
	if c == nil {
		return nil
	}
	c.observe(ip)
	if ip != "" && c.perIP > 0 {
		if ok, wait := c.ips.Allow(ratelimit.Key(ip), c.perIP, now); !ok {
			return &RetryLaterError{Status: http.StatusTooManyRequests, RetryAfter: wait,
				reason: "too many token verifications from this address"}
		}
	}
	if c.global > 0 {
		if ok, wait := c.all.Allow("", c.global, now); !ok {
			return &RetryLaterError{Status: http.StatusServiceUnavailable, RetryAfter: wait,
				reason: "too many token verifications"}
		}
	}
	return nil
}

// observe watches for every cold verification coming from one private or loopback
// address: the sign of a load balancer in front of Caddy without trusted_proxies, which
// puts every client in one per-address bucket. It warns once.
func (c *coldBudget) observe(ip string) {
	c.mu.Lock()
	if c.settled {
		c.mu.Unlock()
		return
	}
	switch {
	case c.seen == 0:
		c.source = ip
	case ip != c.source:
		c.settled = true
		c.mu.Unlock()
		return
	}
	c.seen++
	warn := c.seen >= singleSourceEvidence
	if warn {
		c.settled = true
	}
	source := c.source
	c.mu.Unlock()
	if !warn {
		return
	}
	if a, err := netip.ParseAddr(source); err == nil && (a.IsPrivate() || a.IsLoopback()) {
		c.logger.Warn("every token verification so far came from one private address: behind a load balancer or proxy, set Caddy's trusted_proxies, or all clients share one rate limit",
			zap.String("client_ip", source), zap.Int("requests", singleSourceEvidence))
	}
}
