package flows

import (
	"context"
	"fmt"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// oneTimeStore keeps records that are put once under a random value handed to a browser
// or the IdP (a login state, a consent ticket, a one-time link) and taken once:
// PendingLogin, PendingOfflineAccess, ConsentTicket, and the links of linkStore. It can peek, for
// checks that must not spend the value (a wrong browser, a malformed form), but never
// rewrite a record.
type oneTimeStore[T any] struct {
	records *storage.Records
	kind    string        // storage key prefix
	ttl     time.Duration // how long the value stays usable
}

func (st oneTimeStore[T]) key(id string) string { return recordKey(st.kind, id) }

// put stores v under id for the store's ttl.
func (st oneTimeStore[T]) put(ctx context.Context, id string, v T) error {
	return st.records.Put(ctx, st.key(id), v, st.ttl)
}

// peek reads the record under id without spending it, or storage.ErrNotFound.
func (st oneTimeStore[T]) peek(ctx context.Context, id string) (T, error) {
	var v T
	err := st.records.Get(ctx, st.key(id), &v)
	return v, err
}

// take spends the record under id: exactly one caller gets it, the others
// storage.ErrNotFound.
func (st oneTimeStore[T]) take(ctx context.Context, id string) (T, error) {
	var v T
	err := st.records.TakeOnce(ctx, st.key(id), &v)
	return v, err
}

// sealVerifier seals a PKCE verifier for the record under id: it opens only from there.
func (st oneTimeStore[T]) sealVerifier(id, verifier string) (string, error) {
	sealed, err := st.records.Seal(st.key(id), []byte(verifier))
	if err != nil {
		return "", fmt.Errorf("sealing PKCE verifier: %w", err)
	}
	return sealed, nil
}

// openVerifier opens a PKCE verifier sealed by sealVerifier for id.
func (st oneTimeStore[T]) openVerifier(id, sealed string) (string, error) {
	plain, err := st.records.Open(st.key(id), sealed)
	if err != nil {
		return "", fmt.Errorf("opening PKCE verifier: %w", err)
	}
	return string(plain), nil
}
