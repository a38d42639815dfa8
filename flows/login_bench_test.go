package flows

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// countedStorage is a file_system storage with its fast path (storage.FastPath) that
// counts its operations, for the storage round trips a login costs.
type countedStorage struct {
	certmagic.Storage
	native                                       storage.Native
	stores, loads, deletes, locks, takes, others atomic.Int64
}

func newCountedStorage(dir string) *countedStorage {
	st := storage.FastPath(&certmagic.FileStorage{Path: dir})
	n, _ := st.(storage.Native)
	return &countedStorage{Storage: st, native: n}
}

func (s *countedStorage) StoreTTL(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	s.stores.Add(1)
	return s.native.StoreTTL(ctx, key, value, ttl)
}

func (s *countedStorage) ExpiresRecords() bool { return s.native.ExpiresRecords() }

func (s *countedStorage) LoadAndDelete(ctx context.Context, key string) ([]byte, error) {
	s.takes.Add(1)
	return s.native.LoadAndDelete(ctx, key)
}

func (s *countedStorage) LoadAndMove(ctx context.Context, from, to string) ([]byte, error) {
	s.takes.Add(1)
	return s.native.LoadAndMove(ctx, from, to)
}

func (s *countedStorage) Store(ctx context.Context, key string, value []byte) error {
	s.stores.Add(1)
	return s.Storage.Store(ctx, key, value)
}

func (s *countedStorage) Load(ctx context.Context, key string) ([]byte, error) {
	s.loads.Add(1)
	return s.Storage.Load(ctx, key)
}

func (s *countedStorage) Delete(ctx context.Context, key string) error {
	s.deletes.Add(1)
	return s.Storage.Delete(ctx, key)
}

func (s *countedStorage) Lock(ctx context.Context, name string) error {
	s.locks.Add(1)
	return s.Storage.Lock(ctx, name)
}

func (s *countedStorage) Exists(ctx context.Context, key string) bool {
	s.others.Add(1)
	return s.Storage.Exists(ctx, key)
}

func (s *countedStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	s.others.Add(1)
	return s.Storage.Stat(ctx, key)
}

func (s *countedStorage) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	s.others.Add(1)
	return s.Storage.List(ctx, prefix, recursive)
}

// BenchmarkHybridLogin is one full hybrid login over a file_system storage in a temp
// folder: authorize, the consent page and its approval, the redirect to the IdP, the
// IdP's login (zitadel's OP, in this process: profile the flows package's functions for
// the broker's part), the callback with its code exchange and ID token check, and the
// token endpoint. It reports the storage operations per login: Lock counts the storage
// locks (Unlock is one per Lock), take the fast path's LoadAndDelete. The client is a
// configured one (client=configured) or one registered by RFC 7591 (client=registered),
// as MCP clients register themselves, whose registration is a record in storage.
func BenchmarkHybridLogin(b *testing.B) {
	b.Run("client=configured", func(b *testing.B) { benchmarkHybridLogin(b, false) })
	b.Run("client=registered", func(b *testing.B) { benchmarkHybridLogin(b, true) })
}

func benchmarkHybridLogin(b *testing.B, registered bool) {
	o := testenv.SharedOP(b)
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		b.Fatal(err)
	}
	st := newCountedStorage(b.TempDir())
	_, front := startHybridFront(b, o, "", func(c *Config) {
		c.Records = storage.New(st, ring)
		c.Registration = registered
	})
	clientID := testenv.NativeClientID
	if registered {
		resp, err := http.Post(front.URL+pathRegister, "application/json", strings.NewReader(
			`{"redirect_uris":["`+tokenTestRedirect+`"],"token_endpoint_auth_method":"none","client_name":"Bench"}`))
		if err != nil {
			b.Fatal(err)
		}
		var info struct {
			ClientID string `json:"client_id"`
		}
		err = json.NewDecoder(resp.Body).Decode(&info)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusCreated || info.ClientID == "" {
			b.Fatalf("registration: %s, %v", resp.Status, err)
		}
		clientID = info.ClientID
	}
	// The broker limits authorizations per client address (60 a minute): the logins come
	// from 64 loopback addresses in turn, each with its own connections, so that a run of
	// any length measures logins, not 429s.
	transports := make([]*http.Transport, 64)
	for i := range transports {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 1, byte(i+1))}}
		transports[i] = &http.Transport{DialContext: d.DialContext}
		b.Cleanup(transports[i].CloseIdleConnections)
	}
	n := 0
	login := func() {
		br := newHybridBrowser(b)
		br.client.Transport = transports[n%len(transports)]
		n++
		verifier := oauth2.GenerateVerifier()
		code := br.login(front, o, clientID, tokenTestRedirect, verifier, []string{"notes:read"})
		form := url.Values{
			"grant_type": {"authorization_code"}, "client_id": {clientID}, "code": {code},
			"redirect_uri": {tokenTestRedirect}, "code_verifier": {verifier},
		}
		resp, err := br.client.Post(front.URL+pathToken, "application/x-www-form-urlencoded", strings.NewReader(form.Encode()))
		if err != nil {
			b.Fatal(err)
		}
		defer resp.Body.Close()
		var tok TokenResponse
		if err := json.NewDecoder(resp.Body).Decode(&tok); err != nil || resp.StatusCode != http.StatusOK || tok.AccessToken == "" {
			b.Fatalf("token endpoint: %s, %v", resp.Status, err)
		}
	}
	login() // the IdP's discovery and keys fetched, the consent page's template parsed, a registration renewed
	counters := []*atomic.Int64{&st.stores, &st.loads, &st.deletes, &st.locks, &st.takes, &st.others}
	for _, c := range counters {
		c.Store(0)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		login()
	}
	for i, unit := range []string{"stores/op", "loads/op", "deletes/op", "locks/op", "takes/op", "other-storage/op"} {
		b.ReportMetric(float64(counters[i].Load())/float64(b.N), unit)
	}
}
