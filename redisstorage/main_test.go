package redisstorage

import (
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"go.uber.org/zap"
)

// newStorage is a Storage on srv with a client of its own, as one Caddy instance would
// have: two of them on one server are two instances sharing it. The client closes at the
// test's cleanup.
func newStorage(t testing.TB, srv *testenv.RedisServer, configure ...func(*Storage)) *Storage {
	t.Helper()
	s := &Storage{Addresses: []string{srv.Addr}, KeyPrefix: "test"}
	for _, c := range configure {
		c(s)
	}
	s.setDefaults()
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	client, err := s.newClient()
	if err != nil {
		t.Fatal(err)
	}
	s.logger = zap.NewNop()
	s.conn = newConn(client, s.logger)
	t.Cleanup(func() { _ = s.conn.Destruct() })
	return s
}

// withLease shortens the lock lease, so that tests of expiry and renewal take a second.
func withLease(s *Storage, lease time.Duration) *Storage {
	s.conn.lease = lease
	return s
}
