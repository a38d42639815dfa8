package caddyoauthbroker

import (
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-mcp/oauth-broker/flows"
)

// The module's metrics, in Caddy's registry (caddy.Context.GetMetricsRegistry): served
// wherever Caddy serves its metrics (the admin endpoint's /metrics, the `metrics` handler).
// Every series has a `site` label, the resource URL's host and path, which tells the
// mcp_oauth handlers of one configuration apart; the other labels are fixed enumerations
// (flows/metrics.go), never a client id, subject or tool name.

const metricsNamespace = "caddy"
const metricsSubsystem = "mcp_oauth"

// brokerCollectors are the module's metric families, registered once per registry and
// shared by every handler of it.
type brokerCollectors struct {
	requests          *prometheus.CounterVec   // site, outcome
	loginsStarted     *prometheus.CounterVec   // site, flow
	loginsCompleted   *prometheus.CounterVec   // site, flow
	loginsFailed      *prometheus.CounterVec   // site, flow, step, reason
	tokens            *prometheus.CounterVec   // site, event
	delegations       *prometheus.CounterVec   // site, result
	registrations     *prometheus.CounterVec   // site, result
	metadataDocuments *prometheus.CounterVec   // site, result
	storageErrors     *prometheus.CounterVec   // site
	idpDuration       *prometheus.HistogramVec // site, endpoint, result
	storageDuration   *prometheus.HistogramVec // site, operation, result
	// The records counted after each janitor interval (countRecords): gauges, not counters.
	sessions       *prometheus.GaugeVec // site
	offlineGrants  *prometheus.GaugeVec // site
	recordsCounted *prometheus.GaugeVec // site: when the two above were last set
}

func newBrokerCollectors() *brokerCollectors {
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help,
		}, append([]string{"site"}, labels...))
	}
	histogram := func(name, help string, labels ...string) *prometheus.HistogramVec {
		return prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help,
			Buckets: prometheus.DefBuckets,
		}, append([]string{"site"}, labels...))
	}
	gauge := func(name, help string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help,
		}, []string{"site"})
	}
	return &brokerCollectors{
		requests: counter("requests_total",
			"Requests to the MCP endpoint, by outcome.", "outcome"),
		loginsStarted: counter("logins_started_total",
			"Logins that sent the browser to the identity provider, by flow (hybrid, offline_access).", "flow"),
		loginsCompleted: counter("logins_completed_total",
			"Logins that stored a session or an offline access grant, by flow.", "flow"),
		loginsFailed: counter("logins_failed_total",
			"Logins that failed, by flow, the step that failed and why.", "flow", "step", "reason"),
		tokens: counter("tokens_total",
			"Broker token events: issued, refreshed, reuse_detected, revoked, background_issued.", "event"),
		delegations: counter("delegations_total",
			"Delegated tokens for the upstream, by result: cache_hit, cache_miss, exchanged, refreshed, failed, refused_by_upstream.", "result"),
		registrations: counter("registrations_total",
			"Dynamic client registrations (RFC 7591), by result.", "result"),
		metadataDocuments: counter("metadata_document_fetches_total",
			"Client metadata document fetches, by result.", "result"),
		storageErrors: counter("storage_errors_total",
			"Requests answered with an error because storage could not be read or written."),
		idpDuration: histogram("idp_request_duration_seconds",
			"Latency of requests to the identity provider, by endpoint and result.", "endpoint", "result"),
		storageDuration: histogram("storage_operation_duration_seconds",
			"Latency of the broker's storage operations, by operation and result (ok, not_found, error).", "operation", "result"),
		sessions: gauge("sessions",
			"Live sessions of the site, as last counted (sessions of earlier releases, without a site, count for every site of their storage)."),
		offlineGrants: gauge("offline_access_grants",
			"Live offline access grants of the site, as last counted."),
		recordsCounted: gauge("records_counted_timestamp_seconds",
			"When the site's sessions and offline access grants were last counted, in seconds since the Unix epoch; 0 before the first count."),
	}
}

// register registers c's families with reg, or takes those already there: two handlers
// of one configuration share Caddy's registry.
func (c *brokerCollectors) register(reg prometheus.Registerer) error {
	for _, v := range []**prometheus.CounterVec{&c.requests, &c.loginsStarted, &c.loginsCompleted,
		&c.loginsFailed, &c.tokens, &c.delegations, &c.registrations, &c.metadataDocuments, &c.storageErrors} {
		if err := registerOrReuse(reg, v); err != nil {
			return err
		}
	}
	for _, v := range []**prometheus.HistogramVec{&c.idpDuration, &c.storageDuration} {
		if err := registerOrReuse(reg, v); err != nil {
			return err
		}
	}
	for _, v := range []**prometheus.GaugeVec{&c.sessions, &c.offlineGrants, &c.recordsCounted} {
		if err := registerOrReuse(reg, v); err != nil {
			return err
		}
	}
	return nil
}

// registerOrReuse registers *col with reg, or replaces it with the collector of the same
// description registered before it.
func registerOrReuse[C prometheus.Collector](reg prometheus.Registerer, col *C) error {
	err := reg.Register(*col)
	if err == nil {
		return nil
	}
	var already prometheus.AlreadyRegisteredError
	if errors.As(err, &already) {
		if existing, ok := already.ExistingCollector.(C); ok {
			*col = existing
			return nil
		}
	}
	return fmt.Errorf("registering metrics: %w", err)
}

// siteMetrics is flows.Metrics for one site: every series resolved once, so that counting
// is an atomic add.
type siteMetrics struct {
	events [flows.NumEvents]prometheus.Counter
	logins [flows.NumLoginFlows][flows.NumLoginOutcomes]prometheus.Counter
	idp    [flows.NumIdPEndpoints][flows.NumIdPResults]prometheus.Observer
	// storage times the site's storage operations (timeStorage).
	storage *storageObservers
	// sessions, offlineGrants and recordsCounted are the site's gauges (setRecordCount).
	sessions, offlineGrants, recordsCounted prometheus.Gauge
}

// eventSeries says which family and label value counts each flows.Event.
func (c *brokerCollectors) eventSeries(e flows.Event) (*prometheus.CounterVec, string) {
	switch e {
	case flows.RequestPassed:
		return c.requests, "passed"
	case flows.RequestNoToken:
		return c.requests, "no_token"
	case flows.RequestInvalidToken:
		return c.requests, "invalid_token"
	case flows.RequestInsufficientScope:
		return c.requests, "insufficient_scope"
	case flows.RequestRefused:
		return c.requests, "refused"
	case flows.RequestOfflineAccessNeeded:
		return c.requests, "offline_access_required"
	case flows.RequestAppPasswordNeeded:
		return c.requests, "app_password_required"
	case flows.RequestRateLimited:
		return c.requests, "rate_limited"
	case flows.RequestUnavailable:
		return c.requests, "unavailable"
	case flows.RequestFailed:
		return c.requests, "error"
	case flows.TokenIssued:
		return c.tokens, "issued"
	case flows.TokenRefreshed:
		return c.tokens, "refreshed"
	case flows.TokenReuseDetected:
		return c.tokens, "reuse_detected"
	case flows.TokenRevoked:
		return c.tokens, "revoked"
	case flows.BackgroundTokenIssued:
		return c.tokens, "background_issued"
	case flows.DelegationCacheHit:
		return c.delegations, "cache_hit"
	case flows.DelegationCacheMiss:
		return c.delegations, "cache_miss"
	case flows.DelegationExchanged:
		return c.delegations, "exchanged"
	case flows.DelegationRefreshed:
		return c.delegations, "refreshed"
	case flows.DelegationFailed:
		return c.delegations, "failed"
	case flows.DelegationRefusedUpstream:
		return c.delegations, "refused_by_upstream"
	case flows.RegistrationAccepted:
		return c.registrations, "accepted"
	case flows.RegistrationRefused:
		return c.registrations, "refused"
	case flows.MetadataDocumentFetched:
		return c.metadataDocuments, "fetched"
	case flows.MetadataDocumentRefused:
		return c.metadataDocuments, "refused"
	case flows.StorageError:
		return c.storageErrors, ""
	}
	return nil, ""
}

// forSite resolves every series of site.
func (c *brokerCollectors) forSite(site string) (*siteMetrics, error) {
	m := new(siteMetrics)
	for e := range flows.NumEvents {
		vec, value := c.eventSeries(e)
		switch {
		case vec == nil:
			return nil, fmt.Errorf("metrics: flows event %d has no series", e)
		case vec == c.storageErrors:
			m.events[e] = vec.WithLabelValues(site)
		default:
			m.events[e] = vec.WithLabelValues(site, value)
		}
	}
	for f := range flows.NumLoginFlows {
		for o := range flows.NumLoginOutcomes {
			switch {
			case o == flows.LoginStarted:
				m.logins[f][o] = c.loginsStarted.WithLabelValues(site, f.String())
			case o == flows.LoginCompleted:
				m.logins[f][o] = c.loginsCompleted.WithLabelValues(site, f.String())
			default:
				m.logins[f][o] = c.loginsFailed.WithLabelValues(site, f.String(), o.Step(), o.Reason())
			}
		}
	}
	for e := range flows.NumIdPEndpoints {
		for r := range flows.NumIdPResults {
			m.idp[e][r] = c.idpDuration.WithLabelValues(site, e.String(), r.String())
		}
	}
	m.storage = newStorageObservers(c.storageDuration, site)
	m.sessions = c.sessions.WithLabelValues(site)
	m.offlineGrants = c.offlineGrants.WithLabelValues(site)
	m.recordsCounted = c.recordsCounted.WithLabelValues(site)
	return m, nil
}

func (m *siteMetrics) Count(e flows.Event) {
	if e < flows.NumEvents {
		m.events[e].Inc()
	}
}

func (m *siteMetrics) Login(f flows.LoginFlow, o flows.LoginOutcome) {
	if f < flows.NumLoginFlows && o < flows.NumLoginOutcomes {
		m.logins[f][o].Inc()
	}
}

func (m *siteMetrics) IdPRequest(e flows.IdPEndpoint, r flows.IdPResult, took time.Duration) {
	if e < flows.NumIdPEndpoints && r < flows.NumIdPResults {
		m.idp[e][r].Observe(took.Seconds())
	}
}

// setRecordCount sets the site's gauges to n, counted at.
func (m *siteMetrics) setRecordCount(n flows.RecordCount, at time.Time) {
	m.sessions.Set(float64(n.Sessions))
	m.offlineGrants.Set(float64(n.OfflineAccessGrants))
	m.recordsCounted.Set(float64(at.UnixNano()) / 1e9)
}

// metricsSite is the site label of the handler protecting resource: its host and path,
// which the configuration names, so the label's values are bounded by it.
func metricsSite(resource string) string {
	u, err := url.Parse(resource)
	if err != nil {
		return resource
	}
	return u.Host + u.Path
}

// newSiteMetrics registers the module's families with reg, once per registry, and
// resolves the series of the site serving resource.
func newSiteMetrics(reg prometheus.Registerer, resource string) (*siteMetrics, error) {
	c := newBrokerCollectors()
	if err := c.register(reg); err != nil {
		return nil, err
	}
	return c.forSite(metricsSite(resource))
}

var _ flows.Metrics = (*siteMetrics)(nil)
