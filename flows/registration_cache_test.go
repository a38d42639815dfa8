package flows

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// registrationNodes are brokers of one site on one folder, as nodes of a cluster, on one
// clock (their b.now and their records' expiry).
type registrationNodes struct {
	nodes []*Broker
	st    *countedStorage
	clock *testenv.Clock
}

func newRegistrationNodes(t *testing.T, n int, wrap func(certmagic.Storage) certmagic.Storage) *registrationNodes {
	t.Helper()
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		t.Fatal(err)
	}
	rn := &registrationNodes{st: newCountedStorage(t.TempDir()), clock: newRegistrationClock()}
	var st certmagic.Storage = rn.st
	if wrap != nil {
		st = wrap(st)
	}
	for range n {
		b := newRegistrationBroker(t, func(c *Config) {
			c.Records = storage.New(st, ring, storage.WithClock(rn.clock.Now))
		})
		b.now = rn.clock.Now
		rn.nodes = append(rn.nodes, b)
	}
	return rn
}

// register registers a public client through node 0, as a client would.
func (rn *registrationNodes) register(t *testing.T) string {
	t.Helper()
	return registerClient(t, rn.nodes[0], `{"redirect_uris":["`+tokenTestRedirect+`"],"token_endpoint_auth_method":"none"}`).ClientID
}

// known tells whether node i finds the client id.
func (rn *registrationNodes) known(t *testing.T, i int, id string) bool {
	t.Helper()
	_, err := rn.nodes[i].findClient(t.Context(), id)
	if err != nil && !errors.Is(err, ErrUnknownClient) {
		t.Fatal(err)
	}
	return err == nil
}

// A login asks for its registered client at authorize, the consent page and the token
// endpoint: the registration is read from storage once, then again only after
// registrationCacheTTL.
func TestRegisteredClientReadOnceWithinItsCacheTime(t *testing.T) {
	rn := newRegistrationNodes(t, 1, nil)
	id := rn.register(t)
	rn.st.loads.Store(0)
	for range 3 {
		if !rn.known(t, 0, id) {
			t.Fatal("the registered client is unknown")
		}
	}
	if n := rn.st.loads.Load(); n != 1 {
		t.Errorf("three look-ups read storage %d times, want 1", n)
	}
	rn.clock.Advance(registrationCacheTTL)
	if !rn.known(t, 0, id) || rn.st.loads.Load() != 2 {
		t.Errorf("after %s: %d reads, want the registration read again", registrationCacheTTL, rn.st.loads.Load())
	}
}

// A registration deleted through the admin API is refused at once on the node that
// deleted it, and on another node sharing the storage once that node's copy is
// registrationCacheTTL old (README: "Deleting a registered client").
func TestDeletedRegistrationRefusedHereAtOnceElsewhereWithinTheBound(t *testing.T) {
	rn := newRegistrationNodes(t, 2, nil)
	id := rn.register(t)
	if !rn.known(t, 0, id) || !rn.known(t, 1, id) {
		t.Fatal("the registered client is unknown")
	}
	rn.clock.Advance(time.Second)
	if ok, err := rn.nodes[0].DeleteClient(t.Context(), id); !ok || err != nil {
		t.Fatalf("DeleteClient = %v, %v", ok, err)
	}
	if rn.known(t, 0, id) {
		t.Error("the node that deleted the registration still serves it")
	}
	if !rn.known(t, 1, id) {
		t.Error("the other node forgot it before its copy was old: the test no longer shows the bound")
	}
	rn.clock.Advance(registrationCacheTTL - time.Second)
	if rn.known(t, 1, id) {
		t.Errorf("the other node served the deleted registration %s after reading it", registrationCacheTTL)
	}
}

// A deletion through the admin API of another broker of this process (another site on
// the same storage) reaches this one at once through ForgetClient; a deletion that finds
// nothing left (done on another node) still drops this node's copy.
func TestForgetClientDropsTheCopyAtOnce(t *testing.T) {
	rn := newRegistrationNodes(t, 2, nil)
	id := rn.register(t)
	if !rn.known(t, 1, id) {
		t.Fatal("the registered client is unknown")
	}
	if ok, err := rn.nodes[0].DeleteClient(t.Context(), id); !ok || err != nil {
		t.Fatalf("DeleteClient = %v, %v", ok, err)
	}
	rn.nodes[1].ForgetClient(id)
	if rn.known(t, 1, id) {
		t.Error("a broker told to forget the client still serves it")
	}

	other := rn.register(t)
	if !rn.known(t, 1, other) {
		t.Fatal("the registered client is unknown")
	}
	if ok, err := rn.nodes[0].DeleteClient(t.Context(), other); !ok || err != nil {
		t.Fatalf("DeleteClient = %v, %v", ok, err)
	}
	if ok, err := rn.nodes[1].DeleteClient(t.Context(), other); ok || err != nil {
		t.Fatalf("DeleteClient of a deleted registration = %v, %v; want false", ok, err)
	}
	if rn.known(t, 1, other) {
		t.Error("a node asked to delete a registration already gone still serves its copy")
	}
}

// A registration is never served from memory past its record's expiry, even when read
// less than registrationCacheTTL before it.
func TestExpiredRegistrationNotServedFromMemory(t *testing.T) {
	rn := newRegistrationNodes(t, 1, nil)
	id := rn.register(t)
	rn.clock.Advance(unusedRegistrationTTL - 10*time.Second)
	if !rn.known(t, 0, id) {
		t.Fatal("the registration expired early")
	}
	rn.clock.Advance(10 * time.Second)
	if rn.known(t, 0, id) {
		t.Error("an expired registration was served from memory")
	}
}

// Anyone may register clients: the memory of registrations stays bounded, whatever
// number of them are looked up.
func TestRegistrationCacheBounded(t *testing.T) {
	rn := newRegistrationNodes(t, 1, nil)
	b := rn.nodes[0]
	var last string
	for i := range maxCachedRegistrations + 20 {
		last = randomToken()
		rec := &RegisteredClient{ClientID: last, RedirectURIs: []string{tokenTestRedirect}, TokenEndpointAuthMethod: AuthMethodNone,
			IssuedAt: rn.clock.Now()}
		if err := b.registrations.register(t.Context(), rec); err != nil {
			t.Fatal(err)
		}
		if !rn.known(t, 0, last) {
			t.Fatalf("registration %d is unknown", i)
		}
	}
	if n := b.clients.registered.len(); n > maxCachedRegistrations {
		t.Errorf("%d registrations in memory, want at most %d", n, maxCachedRegistrations)
	}
	loads := rn.st.loads.Load()
	if !rn.known(t, 0, last) || rn.st.loads.Load() != loads {
		t.Error("the newest registration was not kept")
	}
}

// forgetDuringLoadStorage is a fault wrapper: when armed, the first Load of key calls
// forget after reading, as a deletion through the admin API landing between a read of a
// registration and its keeping in memory would.
type forgetDuringLoadStorage struct {
	certmagic.Storage
	key    string
	forget func()
}

func (s *forgetDuringLoadStorage) Load(ctx context.Context, key string) ([]byte, error) {
	data, err := s.Storage.Load(ctx, key)
	if key == s.key && s.forget != nil {
		f := s.forget
		s.forget = nil
		f()
	}
	return data, err
}

// A registration read while it is being forgotten is not kept: the deleting node must
// not serve it again for registrationCacheTTL.
func TestRegistrationForgottenDuringItsReadNotKept(t *testing.T) {
	fault := &forgetDuringLoadStorage{}
	rn := newRegistrationNodes(t, 1, func(st certmagic.Storage) certmagic.Storage {
		fault.Storage = st
		return fault
	})
	id := rn.register(t)
	b := rn.nodes[0]
	fault.key = recordKey(kindClient, id)
	fault.forget = func() { b.ForgetClient(id) }
	if !rn.known(t, 0, id) {
		t.Fatal("the registered client is unknown")
	}
	if n := b.clients.registered.len(); n != 0 {
		t.Errorf("%d registrations kept after a forget during their read, want 0", n)
	}
}
