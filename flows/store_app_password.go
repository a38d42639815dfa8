package flows

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/caddy-mcp/oauth-broker/nextcloud"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// appPasswordStore keeps delegation mode app_password's records: each user's app password
// (AppPasswordGrant) and the Login Flow v2 being polled for it (PendingLoginFlow). Both
// belong to one site and are keyed, like offline access grants (store_offline.go), by a
// keyed hash of the subject, so that a storage reader cannot test whether a given user
// has one. The app password is sealed with its record's key, the poll token with its
// record's key and the flow's identity (S1.30). Beside them: the user's current one-time
// link (S1.27) and the user's hybrid sessions (S1.29). Every change holds the subject's
// lock, but the current link's.
type appPasswordStore struct {
	records *storage.Records
	site    string // see Broker.site
}

const (
	// appPasswordHashLabel keeps the keyed hashes of subjects here apart from other uses.
	appPasswordHashLabel = "app password\x00"
	// appPasswordGrantTTL is how long an app password record is kept without a
	// confirmation at Nextcloud; every confirmation rewrites it.
	appPasswordGrantTTL = 365 * 24 * time.Hour
	// loginFlowTTL outlives Nextcloud's flow by a minute, so that the poller sees it end.
	loginFlowTTL = nextcloud.FlowLifetime + time.Minute
	// appPasswordDeletionTTL is how long the poller keeps retrying a deletion in Nextcloud.
	appPasswordDeletionTTL = 30 * 24 * time.Hour
)

// keys returns where kind's record of subject may be, the current key first. Empty
// without an encryption key.
func (st appPasswordStore) keys(kind, subject string) []string {
	hashes := st.records.KeyedHashes(appPasswordHashLabel + subject)
	keys := make([]string, len(hashes))
	for i, h := range hashes {
		keys[i] = storage.Key(kind, st.site, h)
	}
	return keys
}

func (st appPasswordStore) currentKey(kind, subject string) (string, error) {
	keys := st.keys(kind, subject)
	if len(keys) == 0 {
		return "", errors.New("app passwords: no encryption key configured")
	}
	return keys[0], nil
}

// lock takes the cluster-wide lock serializing changes to subject's app password and
// login flow on this site, under the record's key for each ring key (lockEach: nodes in
// the middle of a key rotation share one).
func (st appPasswordStore) lock(ctx context.Context, subject string) (func(), error) {
	keys := st.keys(kindAppPassword, subject)
	if len(keys) == 0 {
		return nil, errors.New("app passwords: no encryption key configured")
	}
	return lockEach(ctx, st.records, "app_password/", keys)
}

// loadGrant returns subject's app password record, or storage.ErrNotFound.
func (st appPasswordStore) loadGrant(ctx context.Context, subject string) (*AppPasswordGrant, error) {
	g, key, err := getFirst[AppPasswordGrant](ctx, st.records, st.keys(kindAppPassword, subject))
	if err != nil {
		return nil, err
	}
	g.key = key
	return g, nil
}

// putGrant seals password into g and stores it under the current key; an empty
// password stores g revoked. The caller holds the lock.
func (st appPasswordStore) putGrant(ctx context.Context, g *AppPasswordGrant, password string) error {
	key, err := st.currentKey(kindAppPassword, g.Subject)
	if err != nil {
		return err
	}
	g.AppPassword = ""
	if password != "" {
		if g.AppPassword, err = st.records.Seal(key, []byte(password)); err != nil {
			return fmt.Errorf("sealing app password: %w", err)
		}
	}
	if err := st.records.Put(ctx, key, g, appPasswordGrantTTL); err != nil {
		return fmt.Errorf("storing app password: %w", err)
	}
	if g.key != "" && g.key != key {
		_ = st.records.Delete(ctx, g.key) // moved to the current key
	}
	g.key = key
	return nil
}

// password opens the app password sealed in g.
func (st appPasswordStore) password(g *AppPasswordGrant) (string, error) {
	if g.key == "" || g.AppPassword == "" {
		return "", errors.New("opening app password: none stored")
	}
	plain, err := st.records.Open(g.key, g.AppPassword)
	if err != nil {
		return "", fmt.Errorf("opening app password: %w", err)
	}
	return string(plain), nil
}

// deleteGrant removes the record at g's key.
func (st appPasswordStore) deleteGrant(ctx context.Context, g *AppPasswordGrant) error {
	return st.records.Delete(ctx, g.key)
}

// errFlowIdentity refuses a pending flow whose identity is not the one it was stored with:
// its key is not its subject's, or its poll token does not open with its identity.
var errFlowIdentity = errors.New("login flow: the record's identity does not match its key or seal (altered in storage?)")

// flowAAD is the associated data of a flow's sealed field: its key, identity and the
// field, so that a record whose subject, client or Nextcloud user was changed in storage
// does not open. JSON keeps the parts apart whatever they hold.
func flowAAD(key string, f *PendingLoginFlow, field string) string {
	aad, _ := json.Marshal([]string{key, f.Subject, f.ClientID, f.NextcloudUser, field})
	return string(aad)
}

// putFlow seals f's poll token and login URL into it and stores it under its subject's
// current key, replacing any flow pending for subject. The caller holds the lock.
func (st appPasswordStore) putFlow(ctx context.Context, f *PendingLoginFlow) error {
	key, err := st.currentKey(kindLoginFlow, f.Subject)
	if err != nil {
		return err
	}
	if f.PollToken, err = st.records.Seal(flowAAD(key, f, "poll_token"), []byte(f.pollToken)); err != nil {
		return fmt.Errorf("sealing poll token: %w", err)
	}
	f.LoginURL = ""
	if f.loginURL != "" {
		if f.LoginURL, err = st.records.Seal(flowAAD(key, f, "login_url"), []byte(f.loginURL)); err != nil {
			return fmt.Errorf("sealing login URL: %w", err)
		}
	}
	if err := st.records.Put(ctx, key, f, loginFlowTTL); err != nil {
		return fmt.Errorf("storing login flow: %w", err)
	}
	if f.key != "" && f.key != key {
		_ = st.records.Delete(ctx, f.key)
	}
	f.key = key
	return nil
}

// loadFlow returns the flow pending for subject, or storage.ErrNotFound, or
// errFlowIdentity (with the flow, to delete).
func (st appPasswordStore) loadFlow(ctx context.Context, subject string) (*PendingLoginFlow, error) {
	f, key, err := getFirst[PendingLoginFlow](ctx, st.records, st.keys(kindLoginFlow, subject))
	if err != nil {
		return nil, err
	}
	return st.checkFlow(f, key)
}

// loadFlowAt reads the flow at key, or storage.ErrNotFound, or errFlowIdentity (with the
// flow, to delete).
func (st appPasswordStore) loadFlowAt(ctx context.Context, key string) (*PendingLoginFlow, error) {
	var f PendingLoginFlow
	if err := st.records.Get(ctx, key, &f); err != nil {
		return nil, err
	}
	return st.checkFlow(&f, key)
}

// checkFlow binds f, read at key, to its identity: key must be one of its subject's, and
// its poll token must open with its identity as associated data.
func (st appPasswordStore) checkFlow(f *PendingLoginFlow, key string) (*PendingLoginFlow, error) {
	f.key = key
	if !slices.Contains(st.keys(kindLoginFlow, f.Subject), key) {
		return f, errFlowIdentity
	}
	plain, err := st.records.Open(flowAAD(key, f, "poll_token"), f.PollToken)
	if err != nil {
		return f, errFlowIdentity
	}
	f.pollToken = string(plain)
	if f.LoginURL != "" {
		if plain, err = st.records.Open(flowAAD(key, f, "login_url"), f.LoginURL); err != nil {
			return f, errFlowIdentity
		}
		f.loginURL = string(plain)
	}
	return f, nil
}

// pendingFlowKeys lists the keys of this site's pending flows, at most limit.
func (st appPasswordStore) pendingFlowKeys(ctx context.Context, limit int) ([]string, error) {
	keys, err := st.records.List(ctx, storage.Key(kindLoginFlow, st.site))
	if err != nil {
		return nil, err
	}
	out := keys[:0]
	for _, k := range keys {
		if strings.HasPrefix(k, storage.Key(kindLoginFlow, st.site)+"/") && len(out) < limit {
			out = append(out, k)
		}
	}
	return out, nil
}

// deleteFlow removes the flow at f's key.
func (st appPasswordStore) deleteFlow(ctx context.Context, f *PendingLoginFlow) error {
	return st.records.Delete(ctx, f.key)
}

// putDeletion stores an app password to delete in Nextcloud later, sealed, under a random
// id of this site.
func (st appPasswordStore) putDeletion(ctx context.Context, d *AppPasswordDeletion, password string) error {
	key := storage.Key(kindAppPasswordDeletion, st.site, storage.Hash(randomToken()))
	sealed, err := st.records.Seal(key, []byte(password))
	if err != nil {
		return fmt.Errorf("sealing app password: %w", err)
	}
	d.AppPassword = sealed
	if err := st.records.Put(ctx, key, d, appPasswordDeletionTTL); err != nil {
		return fmt.Errorf("storing app password deletion: %w", err)
	}
	d.key = key
	return nil
}

// deletionKeys lists this site's pending deletions, at most limit.
func (st appPasswordStore) deletionKeys(ctx context.Context, limit int) ([]string, error) {
	keys, err := st.records.List(ctx, storage.Key(kindAppPasswordDeletion, st.site))
	if err != nil {
		return nil, err
	}
	return keys[:min(len(keys), limit)], nil
}

// loadDeletionAt reads the deletion at key and opens its app password.
func (st appPasswordStore) loadDeletionAt(ctx context.Context, key string) (*AppPasswordDeletion, string, error) {
	var d AppPasswordDeletion
	if err := st.records.Get(ctx, key, &d); err != nil {
		return nil, "", err
	}
	d.key = key
	plain, err := st.records.Open(key, d.AppPassword)
	if err != nil {
		return &d, "", fmt.Errorf("opening app password: %w", err)
	}
	return &d, string(plain), nil
}

// deleteDeletion removes a deletion record, done.
func (st appPasswordStore) deleteDeletion(ctx context.Context, d *AppPasswordDeletion) error {
	return st.records.Delete(ctx, d.key)
}

// currentLinkAAD is the associated data of the token sealed in a current link (an app
// password's, an offline access one's): its key and whose it is.
func currentLinkAAD(key string, identity ...string) string {
	aad, _ := json.Marshal(append([]string{key}, identity...))
	return string(aad)
}

// currentLink returns the token of subject's current link for nextcloudUser, or
// storage.ErrNotFound.
func (st appPasswordStore) currentLink(ctx context.Context, subject, nextcloudUser string) (string, error) {
	c, key, err := getFirst[CurrentAppPasswordLink](ctx, st.records, st.keys(kindAppPasswordCurrentLink, subject))
	if err != nil {
		return "", err
	}
	if c.Subject != subject || c.NextcloudUser != nextcloudUser {
		return "", storage.ErrNotFound
	}
	token, err := st.records.Open(currentLinkAAD(key, subject), c.Link)
	if err != nil {
		return "", storage.ErrNotFound
	}
	return string(token), nil
}

// putCurrentLink makes token subject's current link for ttl.
func (st appPasswordStore) putCurrentLink(ctx context.Context, subject, nextcloudUser, token string, now time.Time, ttl time.Duration) error {
	key, err := st.currentKey(kindAppPasswordCurrentLink, subject)
	if err != nil {
		return err
	}
	sealed, err := st.records.Seal(currentLinkAAD(key, subject), []byte(token))
	if err != nil {
		return fmt.Errorf("sealing link: %w", err)
	}
	c := CurrentAppPasswordLink{Subject: subject, NextcloudUser: nextcloudUser, Link: sealed, CreatedAt: now}
	if err := st.records.Put(ctx, key, &c, ttl); err != nil {
		return fmt.Errorf("storing current link: %w", err)
	}
	return nil
}

// sessions returns the sessions recorded for subject (none: empty), and the key they
// were read from.
func (st appPasswordStore) sessions(ctx context.Context, subject string) ([]string, string, error) {
	s, key, err := getFirst[AppPasswordSessions](ctx, st.records, st.keys(kindAppPasswordSessions, subject))
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return nil, "", nil
	case err != nil:
		return nil, "", err
	case s.Subject != subject:
		return nil, key, nil
	}
	return s.Sessions, key, nil
}

// putSessions records ids as subject's sessions for ttl (none: the record is deleted). The
// caller holds the lock.
func (st appPasswordStore) putSessions(ctx context.Context, subject string, ids []string, oldKey string, ttl time.Duration) error {
	key, err := st.currentKey(kindAppPasswordSessions, subject)
	if err != nil {
		return err
	}
	if len(ids) == 0 {
		if oldKey != "" {
			return st.records.Delete(ctx, oldKey)
		}
		return nil
	}
	if err := st.records.Put(ctx, key, &AppPasswordSessions{Subject: subject, Sessions: ids}, ttl); err != nil {
		return fmt.Errorf("storing the user's sessions: %w", err)
	}
	if oldKey != "" && oldKey != key {
		_ = st.records.Delete(ctx, oldKey)
	}
	return nil
}
