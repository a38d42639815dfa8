package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// Scan hands over live records only, and stops at its limit with ErrScanLimit.
func TestScanBoundedLiveRecords(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	r := New(&certmagic.FileStorage{Path: t.TempDir()}, nil, WithClock(clock))
	ctx := t.Context()
	for i := range 3 {
		if err := r.Put(ctx, Key("things", fmt.Sprint(i)), map[string]int{"n": i}, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Put(ctx, Key("things", "old"), map[string]int{"n": 9}, time.Minute); err != nil {
		t.Fatal(err)
	}
	now = now.Add(2 * time.Minute)
	seen := map[string]int{}
	err := r.Scan(ctx, Key("things"), 10, func(key string, expiresAt time.Time, value json.RawMessage) error {
		var v struct{ N int }
		if err := json.Unmarshal(value, &v); err != nil {
			return err
		}
		if !expiresAt.After(now) {
			t.Errorf("%s expires at %v, before now", key, expiresAt)
		}
		seen[key] = v.N
		return nil
	})
	if err != nil || len(seen) != 3 {
		t.Fatalf("Scan: %v, %v; want the 3 live records", seen, err)
	}
	n := 0
	err = r.Scan(ctx, Key("things"), 2, func(string, time.Time, json.RawMessage) error { n++; return nil })
	if !errors.Is(err, ErrScanLimit) || n > 2 {
		t.Errorf("Scan with limit 2: %d records, %v; want at most 2 and ErrScanLimit", n, err)
	}
	// A directory emptied by deletes is listed too, and skipped.
	if err := r.Put(ctx, Key("things", "dir", "x"), 1, time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := r.Delete(ctx, Key("things", "dir", "x")); err != nil {
		t.Fatal(err)
	}
	if err := r.Scan(ctx, Key("things"), 10, func(string, time.Time, json.RawMessage) error { return nil }); err != nil {
		t.Errorf("Scan with an emptied directory: %v", err)
	}
	if err := r.Scan(ctx, Key("nothing"), 2, func(string, time.Time, json.RawMessage) error { return nil }); err != nil {
		t.Errorf("Scan of a missing prefix: %v", err)
	}
}

// SealedKeyID reads the key id of a sealed value without opening it.
func TestSealedKeyID(t *testing.T) {
	older, newer := make([]byte, KeySize), make([]byte, KeySize)
	newer[0] = 1
	oldRing, _ := NewKeyRing(older)
	ring, _ := NewKeyRing(newer, older)
	sealedOld, _ := oldRing.Seal("k", []byte("secret"))
	sealedNew, _ := ring.Seal("k", []byte("secret"))
	ids := ring.KeyIDs()
	if len(ids) != 2 || ids[0] == ids[1] {
		t.Fatalf("KeyIDs: %v", ids)
	}
	if id, ok := SealedKeyID(sealedNew); !ok || id != ids[0] {
		t.Errorf("sealed with the new key: %q %v, want %q", id, ok, ids[0])
	}
	if id, ok := SealedKeyID(sealedOld); !ok || id != ids[1] {
		t.Errorf("sealed with the old key: %q %v, want %q", id, ok, ids[1])
	}
	for _, bad := range []string{"", "plain", "zzzzzzzz.abc", "0123abcd.", "0123.abc"} {
		if id, ok := SealedKeyID(bad); ok {
			t.Errorf("SealedKeyID(%q) = %q, want not sealed", bad, id)
		}
	}
}

// loadFailing is file storage whose reads fail.
type loadFailing struct{ *certmagic.FileStorage }

func (loadFailing) Load(context.Context, string) ([]byte, error) {
	return nil, errors.New("input/output error")
}

// A record storage cannot read fails the scan: a listing never silently misses it.
func TestScanFailsOnUnreadableRecords(t *testing.T) {
	fsys := &certmagic.FileStorage{Path: t.TempDir()}
	if err := New(fsys, nil).Put(t.Context(), Key("things", "a"), 1, time.Hour); err != nil {
		t.Fatal(err)
	}
	err := New(loadFailing{fsys}, nil).Scan(t.Context(), Key("things"), 10, func(string, time.Time, json.RawMessage) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "input/output error") {
		t.Errorf("Scan over a failing storage: %v, want its error", err)
	}
}
