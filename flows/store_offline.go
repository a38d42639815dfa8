package flows

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// offlineAccessGrantStore keeps offline access grants. The refresh token inside is sealed
// with the record's key and opened only through refreshToken. A grant is looked up by
// subject, put (sealed) under the current key, taken once from where an earlier release
// left it, and deleted; every change holds the subject's lock.
//
// Where offline access grants live: a grant belongs to one site (the broker's issuer and
// resource: two sites on one storage never share one) and is keyed by a keyed hash of
// the subject, so that a storage reader cannot test whether a given user granted offline access.
// The hash changes with the encryption key: a lookup tries each key of the ring, then the
// key of earlier releases (by the plain hash of the subject, for any site), and a grant
// found anywhere but under the current key is moved there on its next use
// (Broker.moveOfflineAccessGrant).
type offlineAccessGrantStore struct {
	records *storage.Records
	site    string // see Broker.site
}

// offlineAccessGrantHashLabel keeps the keyed hashes of subjects for offline access grants apart from
// any other use of keyed hashes.
const offlineAccessGrantHashLabel = "offline grant\x00"

// keys returns where this site may keep subject's offline access grant, the current key first.
// It is empty without an encryption key.
func (st offlineAccessGrantStore) keys(subject string) []string {
	hashes := st.records.KeyedHashes(offlineAccessGrantHashLabel + subject)
	keys := make([]string, len(hashes))
	for i, h := range hashes {
		keys[i] = storage.Key(kindOfflineAccessGrant, st.site, h)
	}
	return keys
}

// currentKey is where subject's offline access grant is written.
func (st offlineAccessGrantStore) currentKey(subject string) (string, error) {
	keys := st.keys(subject)
	if len(keys) == 0 {
		return "", errors.New("offline access grants: no encryption key configured")
	}
	return keys[0], nil
}

// legacyOfflineAccessGrantKey is where releases before grants were kept per site stored them.
func legacyOfflineAccessGrantKey(subject string) string {
	return recordKey(kindLegacyOfflineAccessGrant, subject)
}

// lock takes the cluster-wide lock serializing changes to subject's offline access grant on
// this site (rotation, replacement, revocation), under the grant's key for each ring key
// (lockEach: nodes in the middle of a key rotation share one). Its names have no plain
// hash of the subject.
func (st offlineAccessGrantStore) lock(ctx context.Context, subject string) (func(), error) {
	keys := st.keys(subject)
	if len(keys) == 0 {
		return nil, errors.New("offline access grants: no encryption key configured")
	}
	return lockEach(ctx, st.records, "offline/", keys)
}

// load returns subject's offline access grant wherever this site may find it, or
// storage.ErrNotFound.
func (st offlineAccessGrantStore) load(ctx context.Context, subject string) (*OfflineAccessGrant, error) {
	keys := append(st.keys(subject), legacyOfflineAccessGrantKey(subject))
	if len(keys) == 1 {
		return nil, errors.New("offline access grants: no encryption key configured")
	}
	g, key, err := getFirst[OfflineAccessGrant](ctx, st.records, keys)
	if err != nil {
		return nil, err
	}
	g.key = key
	return g, nil
}

// take takes the grant at key once, so that of several sites on one storage exactly one
// gets a grant of an earlier release; the others get storage.ErrNotFound.
func (st offlineAccessGrantStore) take(ctx context.Context, key string) (*OfflineAccessGrant, error) {
	var g OfflineAccessGrant
	if err := st.records.TakeOnce(ctx, key, &g); err != nil {
		return nil, err
	}
	g.key = key
	return &g, nil
}

// putBack stores g, as taken, where it was taken from: a failed move loses nothing.
func (st offlineAccessGrantStore) putBack(ctx context.Context, g *OfflineAccessGrant) error {
	return st.records.Put(ctx, g.key, g, offlineAccessGrantTTL)
}

// put seals refreshToken into g and stores it under the current key. The caller holds
// the lock.
func (st offlineAccessGrantStore) put(ctx context.Context, g *OfflineAccessGrant, refreshToken string) error {
	key, err := st.currentKey(g.Subject)
	if err != nil {
		return err
	}
	sealed, err := st.records.Seal(key, []byte(refreshToken))
	if err != nil {
		return fmt.Errorf("sealing refresh token: %w", err)
	}
	g.RefreshToken = sealed
	if g.BackgroundClients == nil {
		g.BackgroundClients = []string{}
	}
	if err := st.records.Put(ctx, key, g, offlineAccessGrantTTL); err != nil {
		return fmt.Errorf("storing offline access grant: %w", err)
	}
	g.key = key
	return nil
}

// accessTokenAAD is the associated data of the access token sealed in a grant at key: not
// key alone, so that a storage writer cannot swap the sealed refresh token into the access
// token's field and have it handed to a worker.
func accessTokenAAD(key string) string { return key + "#access_token" }

// putAccessToken seals tok into g (its expiry and scopes beside) and stores g with
// refreshToken. The caller holds the lock.
func (st offlineAccessGrantStore) putAccessToken(ctx context.Context, g *OfflineAccessGrant, refreshToken, accessToken string, expiry time.Time, scopes []string) error {
	key, err := st.currentKey(g.Subject)
	if err != nil {
		return err
	}
	g.AccessToken, g.AccessTokenExpiry, g.AccessTokenScopes = "", time.Time{}, nil
	if !expiry.IsZero() {
		sealed, err := st.records.Seal(accessTokenAAD(key), []byte(accessToken))
		if err != nil {
			return fmt.Errorf("sealing access token: %w", err)
		}
		g.AccessToken, g.AccessTokenExpiry, g.AccessTokenScopes = sealed, expiry.UTC(), scopes
	}
	return st.put(ctx, g, refreshToken)
}

// accessToken opens the access token sealed in g; "" when there is none.
func (st offlineAccessGrantStore) accessToken(g *OfflineAccessGrant) (string, error) {
	if g.AccessToken == "" {
		return "", nil
	}
	plain, err := st.records.Open(accessTokenAAD(g.key), g.AccessToken)
	if err != nil {
		return "", fmt.Errorf("opening offline access token: %w", err)
	}
	return string(plain), nil
}

// refreshToken opens the refresh token sealed in g, with the key g was read from as the
// associated data: a grant copied to another user's key does not open.
func (st offlineAccessGrantStore) refreshToken(g *OfflineAccessGrant) (string, error) {
	if g.key == "" {
		return "", errors.New("opening offline refresh token: the grant was not read from storage")
	}
	plain, err := st.records.Open(g.key, g.RefreshToken)
	if err != nil {
		return "", fmt.Errorf("opening offline refresh token: %w", err)
	}
	return string(plain), nil
}

// delete removes the grant at key; a missing one is not an error.
func (st offlineAccessGrantStore) delete(ctx context.Context, key string) error {
	return st.records.Delete(ctx, key)
}
