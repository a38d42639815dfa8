package storage

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// KeySize is the length in bytes of an AES-256 key.
const KeySize = 32

// maxSealedLen bounds the input Open will decode; sealed values may arrive
// from clients.
const maxSealedLen = 1 << 20

// ErrUnsealable is returned by Open for any sealed value it cannot open:
// tampered, sealed under a key the ring does not hold, or sealed for a
// different record key. It deliberately says no more.
var ErrUnsealable = errors.New("sealed value cannot be opened")

// KeyRing seals with its newest key and opens with any of its keys, so keys
// can be rotated by prepending a new one and dropping the old one once
// nothing sealed under it is still alive.
type KeyRing struct {
	keys []ringKey // keys[0] seals
}

type ringKey struct {
	id   string // first 8 hex chars of SHA-256 of the key
	aead cipher.AEAD
	hash []byte // HMAC key of KeyedHashes, derived from the key
	tag  []byte // HMAC key of Tag, derived from the key
}

// keyedHashLabel derives the KeyedHashes key from an encryption key, so that the one
// is never used as the other.
const keyedHashLabel = "mcp_oauth keyed hash v1"

// tagLabel derives the Tag key from an encryption key, apart from the other two uses.
const tagLabel = "mcp_oauth tag v1"

// NewKeyRing takes raw 32-byte AES-256 keys; the first encrypts, all decrypt. Its
// errors name a key by its index; the caller names the configuration field.
func NewKeyRing(keys ...[]byte) (*KeyRing, error) {
	if len(keys) == 0 {
		return nil, errors.New("at least one key is required")
	}
	ring := &KeyRing{keys: make([]ringKey, 0, len(keys))}
	for i, k := range keys {
		if len(k) != KeySize {
			return nil, fmt.Errorf("key %d: want %d bytes, got %d", i, KeySize, len(k))
		}
		block, err := aes.NewCipher(k)
		if err != nil {
			return nil, fmt.Errorf("key %d: %w", i, err)
		}
		// The random-nonce GCM prepends a fresh 96-bit nonce to every
		// ciphertext, so callers cannot get nonce handling wrong.
		aead, err := cipher.NewGCMWithRandomNonce(block)
		if err != nil {
			return nil, fmt.Errorf("key %d: %w", i, err)
		}
		sum := sha256.Sum256(k)
		mac := hmac.New(sha256.New, k)
		mac.Write([]byte(keyedHashLabel))
		tag := hmac.New(sha256.New, k)
		tag.Write([]byte(tagLabel))
		ring.keys = append(ring.keys, ringKey{id: hex.EncodeToString(sum[:4]), aead: aead, hash: mac.Sum(nil), tag: tag.Sum(nil)})
	}
	return ring, nil
}

// DecodeKey decodes a key as users write it in config: base64 of KeySize bytes,
// standard or URL alphabet, padded or not, surrounding whitespace ignored. Its
// error never repeats the key.
func DecodeKey(encoded string) ([]byte, error) {
	k, err := decodeKey(encoded)
	if err != nil {
		return nil, fmt.Errorf("want %d bytes of base64, got invalid base64", KeySize)
	}
	if len(k) != KeySize {
		return nil, fmt.Errorf("want %d bytes of base64, got %d", KeySize, len(k))
	}
	return k, nil
}

func decodeKey(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	s = strings.TrimRight(s, "=")
	s = strings.NewReplacer("-", "+", "_", "/").Replace(s)
	return base64.RawStdEncoding.DecodeString(s)
}

// Seal encrypts plaintext with the newest key. recordKey is bound as
// associated data, so a sealed value copied into another record fails to
// open. The result is printable: "<key id>.<base64url(nonce||ciphertext)>".
func (k *KeyRing) Seal(recordKey string, plaintext []byte) (string, error) {
	if k == nil || len(k.keys) == 0 {
		return "", errors.New("sealing: no encryption key configured")
	}
	key := k.keys[0]
	ct := key.aead.Seal(nil, nil, plaintext, []byte(recordKey))
	return key.id + "." + base64.RawURLEncoding.EncodeToString(ct), nil
}

// Open reverses Seal for the same recordKey. Every failure to open is
// ErrUnsealable; neither errors nor logs ever carry plaintext or keys.
func (k *KeyRing) Open(recordKey, sealed string) ([]byte, error) {
	if k == nil || len(k.keys) == 0 {
		return nil, errors.New("opening: no encryption key configured")
	}
	if len(sealed) > maxSealedLen {
		return nil, ErrUnsealable
	}
	id, body, ok := strings.Cut(sealed, ".")
	if !ok {
		return nil, ErrUnsealable
	}
	ct, err := base64.RawURLEncoding.DecodeString(body)
	if err != nil {
		return nil, ErrUnsealable
	}
	for _, key := range k.keys {
		if key.id != id {
			continue
		}
		// Two keys may share an id by chance (32 bits), so try each match.
		if pt, err := key.aead.Open(nil, nil, ct, []byte(recordKey)); err == nil {
			return pt, nil
		}
	}
	return nil, ErrUnsealable
}

// KeyID returns the id of the key that Seal uses, for logs and metrics.
func (k *KeyRing) KeyID() string {
	if k == nil || len(k.keys) == 0 {
		return ""
	}
	return k.keys[0].id
}

// KeyedHashes turns text into key segments that only holders of the ring can compute:
// the unpadded base64url HMAC-SHA256 of text under a key derived from each ring key,
// the sealing key's first. Unlike Hash, a storage reader cannot test a guess (whether a
// given user has a record). A lookup tries each, so that records keyed before a key
// rotation are still found; writes use the first.
func (k *KeyRing) KeyedHashes(text string) []string {
	if k == nil {
		return nil
	}
	out := make([]string, len(k.keys))
	for i, key := range k.keys {
		mac := hmac.New(sha256.New, key.hash)
		mac.Write([]byte(text))
		out[i] = base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
	}
	return out
}

// Tag authenticates data, which travels through someone else's hands and comes back
// (a value a client must echo), for purpose: "<key id>.<base64url HMAC-SHA256>" under a
// key derived from the sealing key, over purpose, a NUL and data. The purpose keeps a
// tag made for one use from passing for another.
func (k *KeyRing) Tag(purpose string, data []byte) (string, error) {
	if k == nil || len(k.keys) == 0 {
		return "", errors.New("tagging: no encryption key configured")
	}
	return k.keys[0].id + "." + base64.RawURLEncoding.EncodeToString(k.keys[0].mac(purpose, data)), nil
}

// CheckTag tells whether tag is Tag(purpose, data) under any key of the ring, compared
// in constant time, so that a value tagged before a key rotation passes while its key is
// in the ring.
func (k *KeyRing) CheckTag(purpose string, data []byte, tag string) bool {
	if k == nil {
		return false
	}
	id, encoded, ok := strings.Cut(tag, ".")
	if !ok || len(encoded) != base64.RawURLEncoding.EncodedLen(sha256.Size) {
		return false
	}
	sum, err := base64.RawURLEncoding.DecodeString(encoded)
	if err != nil {
		return false
	}
	for _, key := range k.keys {
		if key.id == id && hmac.Equal(key.mac(purpose, data), sum) {
			return true
		}
	}
	return false
}

func (key *ringKey) mac(purpose string, data []byte) []byte {
	mac := hmac.New(sha256.New, key.tag)
	mac.Write([]byte(purpose))
	mac.Write([]byte{0})
	mac.Write(data)
	return mac.Sum(nil)
}
