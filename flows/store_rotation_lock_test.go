package flows

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// TestSubjectLocksHoldAcrossAKeyRotation: while a cluster rolls a new key in (README,
// "Rotating the key ring across nodes"), nodes whose rings put different keys first still
// exclude each other from changing one user's offline access grant or app password: two
// nodes refreshing one grant at once would each rotate its IdP refresh token, and one
// rotation would be lost. Each pair is two neighbouring steps of the procedure.
func TestSubjectLocksHoldAcrossAKeyRotation(t *testing.T) {
	dir := t.TempDir()
	oldKey, newKey := bytes.Repeat([]byte{1}, storage.KeySize), bytes.Repeat([]byte{2}, storage.KeySize)
	records := func(keys ...[]byte) *storage.Records {
		ring, err := storage.NewKeyRing(keys...)
		if err != nil {
			t.Fatal(err)
		}
		return storage.New(&certmagic.FileStorage{Path: dir}, ring)
	}
	type locker func(*storage.Records) func(context.Context, string) (func(), error)
	lockers := map[string]locker{
		"offline access grant": func(r *storage.Records) func(context.Context, string) (func(), error) {
			return offlineAccessGrantStore{records: r, site: "site"}.lock
		},
		"app password": func(r *storage.Records) func(context.Context, string) (func(), error) {
			return appPasswordStore{records: r, site: "site"}.lock
		},
	}
	steps := []struct {
		name string
		a, b [][]byte
	}{
		{"step 1 under way: [old] and [old, new]", [][]byte{oldKey}, [][]byte{oldKey, newKey}},
		{"step 2 under way: [old, new] and [new, old]", [][]byte{oldKey, newKey}, [][]byte{newKey, oldKey}},
		{"step 3 under way: [new, old] and [new]", [][]byte{newKey, oldKey}, [][]byte{newKey}},
	}
	for what, lock := range lockers {
		for _, s := range steps {
			t.Run(what+": "+s.name, func(t *testing.T) {
				onA, onB := lock(records(s.a...)), lock(records(s.b...))
				unlock, err := onA(t.Context(), "alice")
				if err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
				defer cancel()
				if other, err := onB(ctx, "alice"); err == nil {
					other()
					t.Error("both nodes hold the lock of one user")
				}
				unlock()
				other, err := onB(t.Context(), "alice")
				if err != nil {
					t.Fatalf("the lock once released: %v", err)
				}
				other()
			})
		}
	}
}
