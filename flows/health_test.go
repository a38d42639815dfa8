package flows

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// writeCountingStorage counts the writes that reach the storage.
type writeCountingStorage struct {
	certmagic.Storage
	writes atomic.Int64
}

func (s *writeCountingStorage) Store(ctx context.Context, key string, value []byte) error {
	s.writes.Add(1)
	return s.Storage.Store(ctx, key, value)
}

// newHealthBroker is a test broker on st whose IdP is at issuer, on clock.
func newHealthBroker(t *testing.T, st certmagic.Storage, issuer string, clock *testenv.Clock) *Broker {
	t.Helper()
	o := &testenv.OP{Issuer: issuer}
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		t.Fatal(err)
	}
	b := newTestBroker(t, o, func(c *Config) { c.Records = storage.New(st, ring) })
	b.now = clock.Now
	return b
}

// probe asks b's health endpoint with method, as a stranger.
func probe(t *testing.T, b *Broker, method string) *httptest.ResponseRecorder {
	t.Helper()
	rec := httptest.NewRecorder()
	if pass, _ := b.Handle(rec, httptest.NewRequest(method, "https://mcp.example.com/oauth/health", nil)); pass != nil {
		t.Fatal("the health endpoint passed the request on")
	}
	return rec
}

// downIdP is an issuer URL where nothing answers.
func downIdP(t *testing.T) string {
	srv := httptest.NewServer(http.NotFoundHandler())
	srv.Close()
	return srv.URL
}

func TestHealthReadyWhenStorageAndKeyRingWork(t *testing.T) {
	b := newHealthBroker(t, &certmagic.FileStorage{Path: t.TempDir()}, downIdP(t), &testenv.Clock{})
	rec := probe(t, b, http.MethodGet)
	if rec.Code != http.StatusOK || rec.Body.String() != "ready\n" {
		t.Fatalf("got %d %q, want 200 ready", rec.Code, rec.Body)
	}
	if cc := rec.Header().Get("Cache-Control"); cc != "no-store" {
		t.Errorf("Cache-Control %q, want no-store", cc)
	}
	h := b.Readiness(context.Background())
	if !h.Ready || h.KeyRing != nil || h.Storage != nil || h.CheckedAt.IsZero() {
		t.Errorf("detail: %+v", h)
	}
	if rec := probe(t, b, http.MethodHead); rec.Code != http.StatusOK || rec.Body.Len() != 0 {
		t.Errorf("HEAD: %d %q, want 200 without a body", rec.Code, rec.Body)
	}
	if rec := probe(t, b, http.MethodPost); rec.Code != http.StatusMethodNotAllowed || rec.Header().Get("Allow") != "GET, HEAD" {
		t.Errorf("POST: %d Allow %q, want 405 GET, HEAD", rec.Code, rec.Header().Get("Allow"))
	}
}

// A storage that fails makes the broker unready; a stranger learns that and nothing of
// why, which the detail for admins says.
func TestHealthNotReadyWhenStorageFails(t *testing.T) {
	st := &failingStorage{Storage: &certmagic.FileStorage{Path: t.TempDir()}, text: "fake storage outage at /var/lib/caddy"}
	clock := &testenv.Clock{}
	b := newHealthBroker(t, st, downIdP(t), clock)
	st.fail.Store(true)
	rec := probe(t, b, http.MethodGet)
	if rec.Code != http.StatusServiceUnavailable || rec.Body.String() != "not ready\n" {
		t.Fatalf("got %d %q, want 503 not ready", rec.Code, rec.Body)
	}
	for k := range rec.Header() {
		if k != "Content-Type" && k != "Cache-Control" {
			t.Errorf("header %s: %q tells a stranger more than ready or not", k, rec.Header().Get(k))
		}
	}
	h := b.Readiness(context.Background())
	if h.Ready || h.Storage == nil || !strings.Contains(h.Storage.Error(), "fake storage outage") || h.KeyRing != nil {
		t.Errorf("detail: %+v, want the storage's error", h)
	}

	st.fail.Store(false)
	clock.Advance(readinessProbeInterval)
	if rec := probe(t, b, http.MethodGet); rec.Code != http.StatusOK {
		t.Errorf("after the storage is back: %d, want 200", rec.Code)
	}
}

// An IdP that cannot be reached does not make the broker unready: the detail says what
// the cached discovery knows, and the probe never asks the IdP itself.
func TestHealthReadyWhileTheIdPIsDown(t *testing.T) {
	var asked atomic.Int64
	idpSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		http.Error(w, "down", http.StatusBadGateway)
	}))
	t.Cleanup(idpSrv.Close)
	b := newHealthBroker(t, &certmagic.FileStorage{Path: t.TempDir()}, idpSrv.URL, &testenv.Clock{})

	if h := b.Readiness(context.Background()); !h.Ready || h.IdP.Known || h.IdP.Err != nil {
		t.Errorf("before any discovery: %+v, want ready and the IdP not yet known", h)
	}
	if _, err := b.idp.Discovery(context.Background()); err == nil {
		t.Fatal("discovery at a down IdP succeeded")
	}
	before := asked.Load()
	rec := probe(t, b, http.MethodGet)
	if rec.Code != http.StatusOK || rec.Body.String() != "ready\n" {
		t.Fatalf("got %d %q, want 200 ready", rec.Code, rec.Body)
	}
	h := b.Readiness(context.Background())
	if !h.Ready || h.IdP.Known || h.IdP.Err == nil || h.IdP.FailedAt.IsZero() {
		t.Errorf("detail: %+v, want ready with the IdP's failure", h)
	}
	if n := asked.Load() - before; n != 0 {
		t.Errorf("the probes asked the IdP %d times, want 0", n)
	}
}

// The IdP's state once discovery succeeded: known, with when.
func TestHealthReportsTheKnownIdP(t *testing.T) {
	o := testenv.StartOP(t)
	b := newHealthBroker(t, &certmagic.FileStorage{Path: t.TempDir()}, o.Issuer, &testenv.Clock{})
	if _, err := b.idp.Discovery(context.Background()); err != nil {
		t.Fatal(err)
	}
	if h := b.Readiness(context.Background()); !h.Ready || !h.IdP.Known || h.IdP.FetchedAt.IsZero() || h.IdP.Err != nil {
		t.Errorf("detail: %+v, want ready and the IdP known", h)
	}
}

// A storm of probes costs one storage write per readinessProbeInterval, whether the
// storage works or not.
func TestHealthProbeStormWritesOncePerInterval(t *testing.T) {
	for _, failing := range []bool{false, true} {
		name := map[bool]string{false: "storage up", true: "storage down"}[failing]
		t.Run(name, func(t *testing.T) {
			down := &failingStorage{Storage: &certmagic.FileStorage{Path: t.TempDir()}, text: "fake storage outage"}
			st := &writeCountingStorage{Storage: down}
			clock := &testenv.Clock{Base: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
			b := newHealthBroker(t, st, downIdP(t), clock)
			down.fail.Store(failing)
			storm := func() {
				var wg sync.WaitGroup
				for range 200 {
					wg.Go(func() { probe(t, b, http.MethodGet) })
				}
				wg.Wait()
			}
			storm()
			clock.Advance(readinessProbeInterval - time.Second)
			storm()
			if n := st.writes.Load(); n != 1 {
				t.Errorf("%d storage writes for 400 probes within an interval, want 1", n)
			}
			clock.Advance(time.Second)
			storm()
			if n := st.writes.Load(); n != 2 {
				t.Errorf("%d storage writes after the interval, want 2", n)
			}
		})
	}
}
