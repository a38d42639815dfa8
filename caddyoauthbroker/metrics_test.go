package caddyoauthbroker

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-mcp/oauth-broker/flows"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// scrapeValue reads the value of the sample name that has every one of labels (`k="v"`)
// from a Prometheus text exposition; -1 when there is none.
func scrapeValue(exposition, name string, labels ...string) float64 {
line:
	for _, l := range strings.Split(exposition, "\n") {
		if !strings.HasPrefix(l, name+"{") {
			continue
		}
		end := strings.LastIndexByte(l, '}')
		if end < 0 {
			continue
		}
		for _, want := range labels {
			if !strings.Contains(l[:end], want) {
				continue line
			}
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(l[end+1:]), 64)
		if err != nil {
			return -1
		}
		return v
	}
	return -1
}

// TestMetricsScrapedAfterAFlow runs a progressive login, tool calls and a step-up through
// a whole Caddy, scrapes its /metrics (Caddy's `metrics` handler over its registry) and
// finds the requests counted by outcome and the IdP's requests timed.
func TestMetricsScrapedAfterAFlow(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	port := freePort(t)
	resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
	site := fmt.Sprintf(`site="127.0.0.1:%d/mcp"`, port)
	upstream, _ := url.Parse(up.URL)
	base := startCaddyRoutes(t, port, []any{
		map[string]any{
			"match":  []any{map[string]any{"path": []string{"/metrics"}}},
			"handle": []any{map[string]any{"handler": "metrics"}},
		},
		map[string]any{"handle": []any{
			map[string]any{
				"handler":         "mcp_oauth",
				"mode":            "progressive",
				"issuer":          o.Issuer,
				"client_id":       testenv.BrokerClientID,
				"client_secret":   testenv.BrokerClientSecret,
				"resource":        resource,
				"scopes":          []string{"openid", "notes:read", "notes:write"},
				"encryption_keys": []string{testKey},
				"clients":         []any{map[string]any{"client_id": testenv.NativeClientID, "redirect_uris": []string{"http://127.0.0.1/callback"}}},
				"delegation":      map[string]any{"mode": "none"},
				"tool_scopes":     []any{map[string]any{"tool": "notes_write", "scopes": []string{"notes:write"}}},
			},
			map[string]any{"handler": "reverse_proxy", "upstreams": []any{map[string]any{"dial": upstream.Host}}},
		}},
	})

	var visited []string
	session := connectSteppingUp(t, o, base, "metrics", &visited)
	defer session.Close()
	if _, err := session.ListTools(t.Context(), nil); err != nil {
		t.Fatalf("tools/list: %v", err)
	}
	if res, err := session.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "hi"}}); err != nil || res.IsError {
		t.Fatalf("notes_write after step-up: %v", err)
	}

	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	exposition := string(body)
	for _, c := range []struct {
		name   string
		labels []string
	}{
		{"caddy_mcp_oauth_requests_total", []string{site, `outcome="passed"`}},
		{"caddy_mcp_oauth_requests_total", []string{site, `outcome="no_token"`}},
		{"caddy_mcp_oauth_requests_total", []string{site, `outcome="insufficient_scope"`}},
		{"caddy_mcp_oauth_idp_request_duration_seconds_count", []string{site, `endpoint="discovery"`, `result="ok"`}},
		{"caddy_mcp_oauth_idp_request_duration_seconds_count", []string{site, `endpoint="jwks"`, `result="ok"`}},
	} {
		if v := scrapeValue(exposition, c.name, c.labels...); v < 1 {
			t.Errorf("%s%v = %v after the flow, want at least 1", c.name, c.labels, v)
		}
	}
	if v := scrapeValue(exposition, "caddy_mcp_oauth_requests_total", site, `outcome="invalid_token"`); v != 0 {
		t.Errorf("invalid_token requests: %v, want 0", v)
	}
	for _, bad := range []string{o.User.Subject, testenv.NativeClientID, "notes_write"} {
		if strings.Contains(exposition, bad) {
			t.Errorf("the metrics name %q: labels must stay bounded", bad)
		}
	}
}

// TestMetricsTwoSitesAndAReprovision: two mcp_oauth handlers in one configuration share
// Caddy's registry, and provisioning one again (a reload on the same registry) does not
// fail on the families already registered; each site counts its own requests.
func TestMetricsTwoSitesAndAReprovision(t *testing.T) {
	ctx, _ := provisionContext(t)
	sites := map[string]string{
		"https://a.example.com/mcp":       "a.example.com/mcp",
		"https://b.example.com/tools/mcp": "b.example.com/tools/mcp",
	}
	handlers := map[string]*Handler{}
	for _, resource := range []string{"https://a.example.com/mcp", "https://b.example.com/tools/mcp", "https://a.example.com/mcp"} {
		cfg := progressiveConfig()
		cfg["resource"] = resource
		h, err := load(t, ctx, cfg)
		if err != nil {
			t.Fatalf("provisioning %s: %v", resource, err)
		}
		handlers[resource] = h
	}
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })
	request := func(h *Handler, resource string) {
		r := httptest.NewRequest(http.MethodPost, resource, strings.NewReader(`{}`))
		r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), nil, nil)
		if err := h.ServeHTTP(httptest.NewRecorder(), r, next); err != nil {
			t.Fatal(err)
		}
	}
	request(handlers["https://a.example.com/mcp"], "https://a.example.com/mcp")
	request(handlers["https://a.example.com/mcp"], "https://a.example.com/mcp")
	request(handlers["https://b.example.com/tools/mcp"], "https://b.example.com/tools/mcp")

	reg := ctx.GetMetricsRegistry()
	want := map[string]float64{"a.example.com/mcp": 2, "b.example.com/tools/mcp": 1}
	for _, site := range sites {
		got := metricValue(t, reg, "caddy_mcp_oauth_requests_total", map[string]string{"site": site, "outcome": "no_token"})
		if got != want[site] {
			t.Errorf("site %s: %v requests without a token, want %v", site, got, want[site])
		}
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == "caddy_mcp_oauth_requests_total" {
			if n, want := len(f.GetMetric()), 2*int(flows.RequestFailed-flows.RequestPassed+1); n != want {
				t.Errorf("%d request series, want %d: every outcome of both sites, resolved at Provision", n, want)
			}
		}
	}
}

// metricValue is the value of the counter or gauge name with labels in reg, failing when
// absent.
func metricValue(t *testing.T, reg prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	metric:
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if v, ok := labels[l.GetName()]; ok && v != l.GetValue() {
					continue metric
				}
			}
			if g := m.GetGauge(); g != nil {
				return g.GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no %s%v", name, labels)
	return 0
}

// TestStorageOperationsAreTimed: the records' storage is timed by operation and result,
// a missing key apart from a failure, and keeps TryLock for the janitor.
func TestStorageOperationsAreTimed(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	m, err := newSiteMetrics(reg, "https://mcp.example.com/mcp")
	if err != nil {
		t.Fatal(err)
	}
	st := timeStorage(&certmagic.FileStorage{Path: t.TempDir()}, m.storage)
	if _, ok := st.(certmagic.TryLocker); !ok {
		t.Fatal("the timed file storage lost TryLock")
	}
	if err := st.Store(t.Context(), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Load(t.Context(), "k"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Load(t.Context(), "missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("loading a missing key: %v", err)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]uint64{}
	for _, f := range families {
		if f.GetName() != "caddy_mcp_oauth_storage_operation_duration_seconds" {
			continue
		}
		for _, s := range f.GetMetric() {
			l := map[string]string{}
			for _, p := range s.GetLabel() {
				l[p.GetName()] = p.GetValue()
			}
			if n := s.GetHistogram().GetSampleCount(); n > 0 {
				got[l["site"]+" "+l["operation"]+" "+l["result"]] = n
			}
		}
	}
	want := map[string]uint64{
		"mcp.example.com/mcp store ok":       1,
		"mcp.example.com/mcp load ok":        1,
		"mcp.example.com/mcp load not_found": 1,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("storage observations %v, want %v", got, want)
	}
}

// TestLoginFailuresCarryStepAndReason: a failed login's series names the flow, the step
// that failed and why.
func TestLoginFailuresCarryStepAndReason(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := newSiteMetrics(reg, "https://a.example.com/mcp")
	if err != nil {
		t.Fatal(err)
	}
	m.Login(flows.LoginOfflineAccess, flows.LoginFailedWrongAccount)
	m.Login(flows.LoginHybrid, flows.LoginFailedWrongBrowser)
	m.Login(flows.LoginHybrid, flows.LoginFailedWrongBrowser)
	for _, c := range []struct {
		labels map[string]string
		want   float64
	}{
		{map[string]string{"site": "a.example.com/mcp", "flow": "offline_access", "step": "code_exchange", "reason": "wrong_account"}, 1},
		{map[string]string{"site": "a.example.com/mcp", "flow": "hybrid", "step": "callback", "reason": "wrong_browser"}, 2},
		{map[string]string{"site": "a.example.com/mcp", "flow": "hybrid", "step": "callback", "reason": "unknown_state"}, 0},
	} {
		if got := metricValue(t, reg, "caddy_mcp_oauth_logins_failed_total", c.labels); got != c.want {
			t.Errorf("%v: %v, want %v", c.labels, got, c.want)
		}
	}
}
