package flows

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// linkStore keeps one-time links (OfflineAccessLink, AppPasswordLink): put under a random
// token handed to the user, peeked, taken once, like oneTimeStore. A link's identity (the
// subject it provisions for, its client, its Nextcloud user) is bound to the record's key
// by a seal of nothing with both as associated data (the pending flows' pattern,
// store_app_password.go), so that a storage writer can neither change whose link it is
// nor copy it under another token: a link whose binding does not open is refused with
// errLinkIdentity, and deleted (SECURITY.md S1.36). A seal, not a storage.Records.Tag,
// so that the admin API's key usage counts it during a key rotation.
type linkStore[T oneTimeLink[T]] struct {
	links oneTimeStore[T]
}

// oneTimeLink is a link record: its identity, and its tag.
type oneTimeLink[T any] interface {
	// identity is what the binding binds: every field that says for whom the link provisions.
	identity() []string
	// binding is the record's binding.
	binding() string
	// withBinding is the record with binding b.
	withBinding(b string) T
}

func (l OfflineAccessLink) identity() []string { return []string{l.Subject, l.ClientID} }
func (l OfflineAccessLink) binding() string    { return l.Binding }
func (l OfflineAccessLink) withBinding(b string) OfflineAccessLink {
	l.Binding = b
	return l
}

func (l AppPasswordLink) identity() []string { return []string{l.Subject, l.ClientID, l.NextcloudUser} }
func (l AppPasswordLink) binding() string    { return l.Binding }
func (l AppPasswordLink) withBinding(b string) AppPasswordLink {
	l.Binding = b
	return l
}

// errLinkIdentity refuses a link whose identity is not the one it was stored with (or that
// was stored by a release that did not bind links).
var errLinkIdentity = errors.New("one-time link: the record's identity does not match its tag (altered in storage?)")

// linkAAD is the associated data of a link's binding: its key and identity, JSON keeping
// the parts apart whatever they hold.
func linkAAD(key string, identity []string) string {
	aad, _ := json.Marshal(append([]string{key, "link binding"}, identity...))
	return string(aad)
}

// put binds v to its key and stores it under id for the store's ttl.
func (st linkStore[T]) put(ctx context.Context, id string, v T) error {
	b, err := st.links.records.Seal(linkAAD(st.links.key(id), v.identity()), nil)
	if err != nil {
		return fmt.Errorf("binding link: %w", err)
	}
	return st.links.put(ctx, id, v.withBinding(b))
}

// check refuses v, read from id, unless its binding opens.
func (st linkStore[T]) check(id string, v T) error {
	if _, err := st.links.records.Open(linkAAD(st.links.key(id), v.identity()), v.binding()); err != nil {
		return errLinkIdentity
	}
	return nil
}

// peek reads the link under id without spending it, or storage.ErrNotFound, or
// errLinkIdentity (the link deleted).
func (st linkStore[T]) peek(ctx context.Context, id string) (T, error) {
	v, err := st.links.peek(ctx, id)
	if err != nil {
		return v, err
	}
	if err := st.check(id, v); err != nil {
		_ = st.links.records.Delete(ctx, st.links.key(id))
		return v, err
	}
	return v, nil
}

// take spends the link under id: exactly one caller gets it, the others
// storage.ErrNotFound; errLinkIdentity when its binding does not open (taken, so deleted).
func (st linkStore[T]) take(ctx context.Context, id string) (T, error) {
	v, err := st.links.take(ctx, id)
	if err != nil {
		return v, err
	}
	return v, st.check(id, v)
}

// offlineAccessCurrentLinkStore keeps each user's current offline access link per client
// (CurrentOfflineAccessLink): the token of the link the user's tool calls and starts are
// answered with while it is unused and young, so that calls in a row store one link, not
// one each (SECURITY.md S1.35). Keyed, per site, by a keyed hash of subject and client, so
// that a storage reader cannot test whether a given user has one; the token is sealed with
// the record's key and identity. Written without a lock: two calls at one instant may each
// store a link, the last one staying current.
type offlineAccessCurrentLinkStore struct {
	records *storage.Records
	site    string // see Broker.site
}

// offlineAccessCurrentLinkHashLabel keeps the keyed hashes here apart from other uses.
const offlineAccessCurrentLinkHashLabel = "offline access link\x00"

// keys returns where subject's current link through clientID may be, the current key
// first. Empty without an encryption key.
func (st offlineAccessCurrentLinkStore) keys(subject, clientID string) []string {
	id, _ := json.Marshal([]string{subject, clientID})
	hashes := st.records.KeyedHashes(offlineAccessCurrentLinkHashLabel + string(id))
	keys := make([]string, len(hashes))
	for i, h := range hashes {
		keys[i] = storage.Key(kindOfflineAccessCurrentLink, st.site, h)
	}
	return keys
}

// get returns the token of subject's current link through clientID, or
// storage.ErrNotFound.
func (st offlineAccessCurrentLinkStore) get(ctx context.Context, subject, clientID string) (string, error) {
	c, key, err := getFirst[CurrentOfflineAccessLink](ctx, st.records, st.keys(subject, clientID))
	if err != nil {
		return "", err
	}
	token, err := st.records.Open(currentLinkAAD(key, subject, clientID), c.Link)
	if err != nil {
		return "", storage.ErrNotFound
	}
	return string(token), nil
}

// put makes token subject's current link through clientID for ttl.
func (st offlineAccessCurrentLinkStore) put(ctx context.Context, subject, clientID, token string, now time.Time, ttl time.Duration) error {
	keys := st.keys(subject, clientID)
	if len(keys) == 0 {
		return errors.New("offline access links: no encryption key configured")
	}
	sealed, err := st.records.Seal(currentLinkAAD(keys[0], subject, clientID), []byte(token))
	if err != nil {
		return fmt.Errorf("sealing link: %w", err)
	}
	if err := st.records.Put(ctx, keys[0], &CurrentOfflineAccessLink{Link: sealed, CreatedAt: now}, ttl); err != nil {
		return fmt.Errorf("storing current link: %w", err)
	}
	return nil
}
