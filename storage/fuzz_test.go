package storage

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzOpenSealed: whatever a storage writer puts in a record, Open answers ErrUnsealable or
// the plaintext sealed for that very record key (SECURITY.md W4, S2.18); it never panics,
// and what Seal wrote opens again only under the key it was sealed for.
func FuzzOpenSealed(f *testing.F) {
	ring, err := NewKeyRing(bytes.Repeat([]byte{7}, 32), bytes.Repeat([]byte{9}, 32))
	if err != nil {
		f.Fatal(err)
	}
	sealed, err := ring.Seal("sessions/a", []byte("refresh-token"))
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{sealed, "", ".", "x.y", sealed[:len(sealed)-1], sealed + "A", "00000000." + sealed[9:]} {
		f.Add("sessions/a", s, []byte("p"))
	}
	f.Add("sessions/b", sealed, []byte{})
	f.Fuzz(func(t *testing.T, recordKey, stored string, plaintext []byte) {
		if pt, err := ring.Open(recordKey, stored); err != nil {
			if !errors.Is(err, ErrUnsealable) {
				t.Fatalf("Open failed with %v, not ErrUnsealable", err)
			}
		} else if stored == sealed && recordKey != "sessions/a" {
			t.Fatalf("a value sealed for sessions/a opened under %q: %q", recordKey, pt)
		}
		s, err := ring.Seal(recordKey, plaintext)
		if err != nil {
			t.Fatal(err)
		}
		pt, err := ring.Open(recordKey, s)
		if err != nil && len(s) <= maxSealedLen {
			t.Fatalf("what Seal wrote does not open: %v", err)
		}
		if err == nil && !bytes.Equal(pt, plaintext) {
			t.Fatalf("opened %q, sealed %q", pt, plaintext)
		}
		if _, err := ring.Open(recordKey+"x", s); err == nil {
			t.Fatal("a sealed value opened under another record key")
		}
	})
}
