package storage

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

func newKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, KeySize)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

func mustRing(t *testing.T, keys ...[]byte) *KeyRing {
	t.Helper()
	ring, err := NewKeyRing(keys...)
	if err != nil {
		t.Fatal(err)
	}
	return ring
}

func keyID(k []byte) string {
	sum := sha256.Sum256(k)
	return hex.EncodeToString(sum[:])[:8]
}

func TestSealOpenRoundTrip(t *testing.T) {
	a := newKey(t)
	ring := mustRing(t, a)
	for _, pt := range [][]byte{[]byte("refresh-token-secret"), {}, bytes.Repeat([]byte{0xff}, 4096)} {
		sealed, err := ring.Seal("mcp_oauth/grants/x", pt)
		if err != nil {
			t.Fatal(err)
		}
		id, body, ok := strings.Cut(sealed, ".")
		if !ok || id != keyID(a) {
			t.Fatalf("sealed value %q does not start with key id %s", sealed, keyID(a))
		}
		if _, err := base64.RawURLEncoding.DecodeString(body); err != nil {
			t.Fatalf("body is not unpadded base64url: %v", err)
		}
		if len(pt) > 0 && bytes.Contains([]byte(sealed), pt) {
			t.Fatal("sealed value contains the plaintext")
		}
		got, err := ring.Open("mcp_oauth/grants/x", sealed)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, pt) {
			t.Fatalf("Open = %q, want %q", got, pt)
		}
	}
	s1, _ := ring.Seal("k", []byte("same"))
	s2, _ := ring.Seal("k", []byte("same"))
	if s1 == s2 {
		t.Error("two seals of the same plaintext are identical; nonce reused")
	}
}

func TestOpenRejects(t *testing.T) {
	a, b := newKey(t), newKey(t)
	ringA := mustRing(t, a)
	sealed, err := ringA.Seal("mcp_oauth/grants/x", []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	id, body, _ := strings.Cut(sealed, ".")
	raw, _ := base64.RawURLEncoding.DecodeString(body)

	flip := func(i int) string {
		c := bytes.Clone(raw)
		c[i] ^= 0x01
		return id + "." + base64.RawURLEncoding.EncodeToString(c)
	}
	tests := []struct {
		name   string
		ring   *KeyRing
		key    string
		sealed string
	}{
		{"flipped nonce byte", ringA, "mcp_oauth/grants/x", flip(0)},
		{"flipped ciphertext byte", ringA, "mcp_oauth/grants/x", flip(12)},
		{"flipped tag byte", ringA, "mcp_oauth/grants/x", flip(len(raw) - 1)},
		{"truncated", ringA, "mcp_oauth/grants/x", id + "." + base64.RawURLEncoding.EncodeToString(raw[:len(raw)-1])},
		{"too short for a nonce", ringA, "mcp_oauth/grants/x", id + ".AAAA"},
		{"wrong record key", ringA, "mcp_oauth/grants/y", sealed},
		{"ring without the key", mustRing(t, b), "mcp_oauth/grants/x", sealed},
		{"changed key id", ringA, "mcp_oauth/grants/x", "00000000." + body},
		{"no separator", ringA, "mcp_oauth/grants/x", id + body},
		{"bad base64", ringA, "mcp_oauth/grants/x", id + ".!!!"},
		{"empty", ringA, "mcp_oauth/grants/x", ""},
		{"oversized", ringA, "mcp_oauth/grants/x", id + "." + strings.Repeat("A", maxSealedLen)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.ring.Open(tt.key, tt.sealed)
			if !errors.Is(err, ErrUnsealable) || got != nil {
				t.Fatalf("Open = %q, %v; want ErrUnsealable", got, err)
			}
			if strings.Contains(err.Error(), "secret") {
				t.Error("error mentions the plaintext")
			}
		})
	}
}

func TestKeyRotation(t *testing.T) {
	a, b := newKey(t), newKey(t)
	old := mustRing(t, a)
	sealed, err := old.Seal("mcp_oauth/grants/x", []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	rotated := mustRing(t, b, a)
	got, err := rotated.Open("mcp_oauth/grants/x", sealed)
	if err != nil || string(got) != "secret" {
		t.Fatalf("rotated ring cannot open the old value: %q, %v", got, err)
	}
	fresh, err := rotated.Seal("mcp_oauth/grants/x", []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(fresh, keyID(b)+".") || rotated.KeyID() != keyID(b) {
		t.Errorf("new seal %q does not carry the newest key id %s", fresh, keyID(b))
	}
	if _, err := old.Open("mcp_oauth/grants/x", fresh); !errors.Is(err, ErrUnsealable) {
		t.Errorf("old ring opened a value sealed with the new key: %v", err)
	}
}

func TestNewKeyRingErrors(t *testing.T) {
	_, err := NewKeyRing(make([]byte, 32), make([]byte, 24))
	if err == nil || err.Error() != "key 1: want 32 bytes, got 24" {
		t.Errorf("err = %v", err)
	}
	if _, err := NewKeyRing(); err == nil {
		t.Error("empty ring accepted")
	}
}

func TestDecodeKey(t *testing.T) {
	k := newKey(t)
	forms := map[string]string{
		"std padded":          base64.StdEncoding.EncodeToString(k),
		"std unpadded":        base64.RawStdEncoding.EncodeToString(k),
		"url padded":          base64.URLEncoding.EncodeToString(k),
		"url unpadded":        base64.RawURLEncoding.EncodeToString(k),
		"surrounding newline": base64.StdEncoding.EncodeToString(k) + "\n",
	}
	for name, enc := range forms {
		t.Run(name, func(t *testing.T) {
			got, err := DecodeKey(enc)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, k) {
				t.Errorf("decoded a different key")
			}
		})
	}

	errs := []struct {
		name    string
		encoded string
		want    string
	}{
		{"short key names the length", base64.StdEncoding.EncodeToString(make([]byte, 24)), "want 32 bytes of base64, got 24"},
		{"long key", base64.StdEncoding.EncodeToString(make([]byte, 33)), "want 32 bytes of base64, got 33"},
		{"invalid base64", "not*base64", "want 32 bytes of base64, got invalid base64"},
		{"empty string", "", "want 32 bytes of base64, got 0"},
	}
	for _, tt := range errs {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeKey(tt.encoded)
			if err == nil || err.Error() != tt.want {
				t.Errorf("err = %v, want %q", err, tt.want)
			}
		})
	}
}

func TestNilRingRefusesToSeal(t *testing.T) {
	r := New(nil, nil)
	if _, err := r.Seal("k", []byte("x")); err == nil {
		t.Error("sealed without a key")
	}
	if _, err := r.Open("k", "x.y"); err == nil {
		t.Error("opened without a key")
	}
}

func TestKeyedHashes(t *testing.T) {
	a, b := newKey(t), newKey(t)
	old, rotated := mustRing(t, a), mustRing(t, b, a)
	h := old.KeyedHashes("test-user")
	if len(h) != 1 || !safeSegment(h[0]) || len(h[0]) != 43 {
		t.Fatalf("keyed hashes %q: want one 43-character key segment", h)
	}
	if h[0] == Hash("test-user") {
		t.Error("the keyed hash is the plain hash: anyone can compute it")
	}
	if again := old.KeyedHashes("test-user"); again[0] != h[0] {
		t.Error("the keyed hash is not deterministic")
	}
	if other := old.KeyedHashes("other-user"); other[0] == h[0] {
		t.Error("two texts hash alike")
	}
	// After a rotation the newest key's hash comes first, the old one's still follows.
	r := rotated.KeyedHashes("test-user")
	if len(r) != 2 || r[1] != h[0] || r[0] == h[0] {
		t.Errorf("rotated ring's hashes %q, want [new, %q]", r, h[0])
	}
	if (*KeyRing)(nil).KeyedHashes("x") != nil {
		t.Error("a nil ring hashed")
	}
}

func TestTag(t *testing.T) {
	a, b := newKey(t), newKey(t)
	old, rotated, other := mustRing(t, a), mustRing(t, b, a), mustRing(t, b)
	data := []byte(`{"p":"x"}`)
	tag, err := old.Tag("request state", data)
	if err != nil {
		t.Fatal(err)
	}
	if !old.CheckTag("request state", data, tag) {
		t.Fatal("a tag does not check under its own ring")
	}
	if !rotated.CheckTag("request state", data, tag) {
		t.Error("a tag made before a rotation does not check while its key is in the ring")
	}
	for name, ok := range map[string]bool{
		"another ring":        other.CheckTag("request state", data, tag),
		"other data":          old.CheckTag("request state", []byte(`{"p":"y"}`), tag),
		"another purpose":     old.CheckTag("cookie", data, tag),
		"the keyed hash":      old.CheckTag("request state", data, old.KeyedHashes("request state\x00" + string(data))[0]),
		"no key id":           old.CheckTag("request state", data, strings.SplitN(tag, ".", 2)[1]),
		"a truncated tag":     old.CheckTag("request state", data, tag[:len(tag)-1]),
		"another key id":      old.CheckTag("request state", data, "00000000"+tag[8:]),
		"a nil ring":          (*KeyRing)(nil).CheckTag("request state", data, tag),
		"a tag of empty data": old.CheckTag("request state", nil, tag),
	} {
		if ok {
			t.Errorf("%s: the tag checks", name)
		}
	}
	if _, err := (*KeyRing)(nil).Tag("x", data); err == nil {
		t.Error("a nil ring tagged")
	}
}
