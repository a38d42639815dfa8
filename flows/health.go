package flows

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/caddy-mcp/oauth-broker/idp"
)

// The readiness probe: whether this broker can serve, for a load balancer.
//
// Ready means what logins and the broker's own tokens cannot do without: the storage takes
// a write and gives it back, and the key ring seals and opens. The IdP's state is reported beside it
// but never makes the broker unready: an IdP outage reaches every node and every site at
// once, so failing readiness on it would take them all out of their load balancers
// together, including the requests that need no IdP (warm tokens, metadata). It is read
// from the broker's cached discovery (idp.Provider.Status), never by asking the IdP.
//
// The public answer is at pathHealth on the broker's own site, like its other endpoints:
// each mcp_oauth handler (each site) answers for itself on its own host, with no route to
// add to the Caddyfile; a separate handler module placed on a route of its own would have to
// be told which mcp_oauth handler it speaks for. Not under /.well-known/, which RFC 8615 keeps for registered
// names. Strangers learn ready or not ready (200 or 503, a one-word body) and nothing
// more, and a flood of probes costs one storage write per readinessProbeInterval
// (SECURITY.md S2.21); the detail (which check failed, the error, the IdP's discovery
// state) is for admins, through Caddy's admin endpoint (Broker.Readiness).

// pathHealth is the readiness probe's endpoint.
const pathHealth = "/oauth/health"

const (
	// readinessProbeInterval is how long a probe's result is reused: a storm of probes
	// costs at most one storage write and read per interval per broker.
	readinessProbeInterval = 5 * time.Second
	// readinessProbeTimeout bounds one probe of the storage.
	readinessProbeTimeout = 5 * time.Second
)

// Health is a broker's readiness and the IdP's state beside it.
type Health struct {
	// Ready: the storage and the key ring work. The IdP does not count.
	Ready bool
	// CheckedAt is when the storage and key ring were last probed.
	CheckedAt time.Time
	// KeyRing is nil when the key ring sealed and opened the probe.
	KeyRing error
	// Storage is nil when the storage took the probe record and gave it back.
	Storage error
	// IdP is what the broker's cached discovery knows of the IdP.
	IdP idp.DiscoveryStatus
}

// readinessProbe runs the storage probe at most once per readinessProbeInterval, shared
// by every caller, and keeps its result.
type readinessProbe struct {
	store  healthProbeStore
	flight singleflight.Group

	mu   sync.Mutex
	last *probeResult
}

// probeResult is one probe of the storage and the key ring.
type probeResult struct {
	at                  time.Time
	keyRingErr, storErr error
}

// Readiness reports whether the broker can serve, probing its storage and key ring unless
// a probe ran within readinessProbeInterval, and the IdP's state from its cached
// discovery. A caller whose ctx ends first gets not ready; the probe itself goes on for the
// others.
func (b *Broker) Readiness(ctx context.Context) Health {
	p := b.probeStorage(ctx)
	return Health{
		Ready:     p.keyRingErr == nil && p.storErr == nil,
		CheckedAt: p.at,
		KeyRing:   p.keyRingErr,
		Storage:   p.storErr,
		IdP:       b.idp.Status(),
	}
}

func (b *Broker) probeStorage(ctx context.Context) probeResult {
	rp := &b.readiness
	if last, ok := b.freshProbe(); ok {
		return last
	}
	select {
	case res := <-rp.flight.DoChan("probe", b.runProbe):
		return res.Val.(probeResult)
	case <-ctx.Done():
		return probeResult{at: b.now(), storErr: fmt.Errorf("waiting for the storage probe: %w", ctx.Err())}
	}
}

// freshProbe is the last probe's result while it is younger than readinessProbeInterval.
func (b *Broker) freshProbe() (probeResult, bool) {
	rp := &b.readiness
	rp.mu.Lock()
	last := rp.last
	rp.mu.Unlock()
	if last == nil {
		return probeResult{}, false
	}
	if age := b.now().Sub(last.at); age >= 0 && age < readinessProbeInterval {
		return *last, true
	}
	return probeResult{}, false
}

// runProbe probes under its own timeout, detached from the request that started it, and
// keeps the result; a failure is logged once per probe, not once per request.
func (b *Broker) runProbe() (any, error) {
	// A flight that ended between the caller's look and this one has probed already.
	if last, ok := b.freshProbe(); ok {
		return last, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), readinessProbeTimeout)
	defer cancel()
	keyRingErr, storErr := b.readiness.store.probe(ctx, randomToken())
	res := probeResult{at: b.now(), keyRingErr: keyRingErr, storErr: storErr}
	if keyRingErr != nil || storErr != nil {
		b.logger.Error("not ready", zap.NamedError("key_ring", keyRingErr), zap.NamedError("storage", storErr))
	}
	b.readiness.mu.Lock()
	b.readiness.last = &res
	b.readiness.mu.Unlock()
	return res, nil
}

// serveHealth answers a load balancer: 200 `ready` or 503 `not ready`, never cached, and
// nothing else whoever asks.
func (b *Broker) serveHealth(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		b.writeError(w, r, errMethodNotAllowed("GET, HEAD"))
		return
	}
	status, body := http.StatusOK, "ready\n"
	if !b.Readiness(r.Context()).Ready {
		status, body = http.StatusServiceUnavailable, "not ready\n"
	}
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = io.WriteString(w, body)
	}
}
