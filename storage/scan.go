package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"
)

// ErrScanLimit is returned by Scan when there were more records under the prefix than it
// was allowed to read: what was handed to fn is a part of them.
var ErrScanLimit = errors.New("scan stopped at its limit")

// Scan calls fn with the key, expiry and raw JSON value of each live record under prefix
// (recursive), reading at most limit records; when there are more it stops there and
// returns ErrScanLimit. A record storage fails to read fails the scan. It is for operators' listings, never a request's path: certmagic
// storage has no index, so it costs one read per record. An error from fn stops the scan
// and is returned.
func (r *Records) Scan(ctx context.Context, prefix string, limit int, fn func(key string, expiresAt time.Time, value json.RawMessage) error) error {
	if !validKey(prefix, false) {
		return errInvalidKey
	}
	keys, err := r.listRecords(ctx, prefix)
	if err != nil {
		return err
	}
	for i, k := range keys {
		if i >= limit {
			return ErrScanLimit
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("scanning records: %w", err)
		}
		data, err := r.store.Load(ctx, k)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue // deleted meanwhile
		case err != nil:
			// An emptied directory is listed like a record and fails to load: not an error.
			if info, serr := r.store.Stat(ctx, k); serr == nil && !info.IsTerminal {
				continue
			}
			return fmt.Errorf("scanning records: %w", err)
		}
		env, err := decodeEnvelope(data)
		if err != nil || r.expired(env) {
			continue // not a record, or expired: not live
		}
		if err := fn(k, env.ExpiresAt, env.Value); err != nil {
			return err
		}
	}
	return nil
}

// SealedKeyID is the id of the ring key a value produced by Seal was sealed with, read
// from its envelope without opening it; false for anything Seal did not produce.
func SealedKeyID(sealed string) (string, bool) {
	id, body, ok := strings.Cut(sealed, ".")
	if !ok || len(id) != 8 || body == "" || strings.Trim(id, "0123456789abcdef") != "" {
		return "", false
	}
	return id, true
}

// KeyIDs are the ids of the ring's keys, the sealing key first.
func (k *KeyRing) KeyIDs() []string {
	if k == nil {
		return nil
	}
	out := make([]string, len(k.keys))
	for i, key := range k.keys {
		out[i] = key.id
	}
	return out
}

// KeyIDs are the ids of the keys of the records' ring, the sealing key first; empty
// without a ring.
func (r *Records) KeyIDs() []string { return r.ring.KeyIDs() }
