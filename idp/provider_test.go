package idp

import (
	"context"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// faultHoldDiscovery is a fault injector in front of the real OP: while holding, it keeps
// each request for the discovery document until released (or until its caller gives up),
// announcing it on arrived. Everything else passes straight through.
type faultHoldDiscovery struct {
	mu      sync.Mutex
	holding bool
	release chan struct{}
	arrived chan struct{}
}

func newFaultHoldDiscovery() *faultHoldDiscovery {
	return &faultHoldDiscovery{arrived: make(chan struct{}, 16)}
}

// hold starts holding discovery requests until the returned func is called.
func (f *faultHoldDiscovery) hold() (release func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.holding, f.release = true, make(chan struct{})
	ch := f.release
	var once sync.Once
	return func() {
		once.Do(func() {
			f.mu.Lock()
			f.holding = false
			f.mu.Unlock()
			close(ch)
		})
	}
}

func (f *faultHoldDiscovery) RoundTrip(r *http.Request) (*http.Response, error) {
	if strings.HasSuffix(r.URL.Path, "/.well-known/openid-configuration") {
		f.mu.Lock()
		holding, release := f.holding, f.release
		f.mu.Unlock()
		if holding {
			select {
			case f.arrived <- struct{}{}:
			default:
			}
			select {
			case <-release:
			case <-r.Context().Done():
				return nil, r.Context().Err()
			}
		}
	}
	return http.DefaultTransport.RoundTrip(r)
}

// A caller that goes away while discovery is being fetched (a client closing its
// connection right after asking for the protected-resource metadata) must not fail
// discovery for everyone else (SECURITY.md: discovery kept failing).
func TestDiscoveryCancelledCallerDoesNotFailOthers(t *testing.T) {
	o := testenv.SharedOP(t)
	fault := newFaultHoldDiscovery()
	idp := NewProvider(ProviderConfig{Issuer: o.Issuer, HTTPClient: &http.Client{Transport: fault}})
	now := time.Unix(1_800_000_000, 0)
	idp.now = func() time.Time { return now } // frozen: a cached failure would still be in force

	release := fault.hold()
	defer release()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := idp.Discovery(ctx)
		errc <- err
	}()
	<-fault.arrived
	cancel()
	if err := <-errc; err == nil {
		t.Fatal("a caller whose context was cancelled got a discovery document")
	}
	release()

	d, err := idp.Discovery(context.Background())
	if err != nil {
		t.Fatalf("discovery after a caller went away: %v", err)
	}
	if d.Issuer != o.Issuer {
		t.Fatalf("issuer = %q, want %q", d.Issuer, o.Issuer)
	}
}

// While a stale document is revalidated against a slow IdP, callers get the last good
// one at once instead of queueing behind the fetch.
func TestDiscoveryRefreshDoesNotStallCallers(t *testing.T) {
	o := testenv.SharedOP(t)
	fault := newFaultHoldDiscovery()
	idp := NewProvider(ProviderConfig{Issuer: o.Issuer, HTTPClient: &http.Client{Transport: fault}})
	var mu sync.Mutex
	now := time.Unix(1_800_000_000, 0)
	idp.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }

	first, err := idp.Discovery(context.Background())
	if err != nil {
		t.Fatalf("first discovery: %v", err)
	}
	mu.Lock()
	now = now.Add(DiscoveryMaxAge + time.Minute)
	mu.Unlock()

	release := fault.hold()
	defer release()
	const callers = 4
	got := make(chan *Discovery, callers)
	for range callers {
		go func() {
			d, _ := idp.Discovery(context.Background())
			got <- d
		}()
	}
	<-fault.arrived // the refresh is under way and held
	for range callers {
		select {
		case d := <-got:
			if d != first {
				t.Fatalf("a caller got %p, want the last good document %p", d, first)
			}
		case <-time.After(10 * time.Second): // a deadlock detector, not a timing assertion
			t.Fatal("a caller with a last good document waited for the refresh of a slow IdP")
		}
	}
	release()

	// Once the refresh has landed, the new document is served.
	for deadline := time.Now().Add(10 * time.Second); ; {
		d, err := idp.Discovery(context.Background())
		if err == nil && d != first {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the refresh: document %p (first %p), err %v; want a new document", d, first, err)
		}
		runtime.Gosched()
	}
}

// A caller waiting for the first document is bounded by its own context, not by the
// fetch, which goes on for the others.
func TestDiscoveryWaiterBoundedByItsContext(t *testing.T) {
	o := testenv.SharedOP(t)
	fault := newFaultHoldDiscovery()
	idp := NewProvider(ProviderConfig{Issuer: o.Issuer, HTTPClient: &http.Client{Transport: fault}})

	release := fault.hold()
	defer release()
	leader := make(chan error, 1)
	go func() {
		_, err := idp.Discovery(context.Background())
		leader <- err
	}()
	<-fault.arrived
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	waiter := make(chan error, 1)
	go func() {
		_, err := idp.Discovery(ctx)
		waiter <- err
	}()
	select {
	case err := <-waiter:
		if err == nil {
			t.Fatal("a caller with a cancelled context got a document while the fetch was held")
		}
	case <-time.After(10 * time.Second): // a deadlock detector, not a timing assertion
		t.Fatal("a caller with a cancelled context waited for the fetch")
	}
	release()
	if err := <-leader; err != nil {
		t.Fatalf("the caller that waited on: %v", err)
	}
}
