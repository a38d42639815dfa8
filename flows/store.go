package flows

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// The typed record stores sit between the handlers and storage.Records: one per kind of
// record, each with only the operations its records allow. A code is issued and taken
// once; a pending login, a consent ticket or an offline access link is put and taken once;
// a session is created, loaded, renewed, its grant rotated, and ended; a token family is
// started, extended and revoked; an offline access grant is put, moved and deleted under its
// subject's lock; a registered client is registered and renewed; a cookie the broker
// reads back is sealed and opened (cookieSealer). The sealing of what a
// record keeps secret (IdP grants, PKCE verifiers, successor pairs, refresh tokens) is
// done in the store too, with the record's key as associated data, so a handler never
// sees a sealed value's key.
//
// The stores are types inside package flows, not a package of their own: the record
// types (Session, AuthorizationCode, …) are the handlers' vocabulary, and tests of every
// handler build and inspect them. The seam is that only the store_*.go files touch
// storage.Records (TestOnlyStoresTouchRecords enforces it), so a fast path for a
// backend, or a new record kind, changes these files alone. storage knows records,
// TTLs, encryption and locks, never OAuth.

// openStores builds the broker's record stores over b.cfg.Records. The clock is read
// through b.now, which tests may replace after New.
func (b *Broker) openStores() {
	records := b.cfg.Records
	now := func() time.Time { return b.now() }
	b.sessions = sessionStore{records: records, now: now, site: b.site, ttl: b.cfg.SessionTTL, maxLifetime: b.cfg.SessionMaxLifetime}
	b.families = familyStore{
		records: records, logger: b.log.storage, now: now,
		accessTTL: b.cfg.AccessTokenTTL, refreshTTL: b.cfg.RefreshTokenTTL, grace: b.cfg.RefreshGrace,
	}
	b.codes = codeStore{records: records, ttl: b.cfg.CodeTTL}
	b.consents = oneTimeStore[ConsentTicket]{records: records, kind: kindConsent, ttl: consentTicketTTL}
	b.logins = oneTimeStore[PendingLogin]{records: records, kind: kindIdPState, ttl: idpStateTTL}
	b.offlineLogins = oneTimeStore[PendingOfflineAccess]{records: records, kind: kindOfflineAccessState, ttl: offlineAccessStateTTL}
	b.offlineAccessLinks = linkStore[OfflineAccessLink]{oneTimeStore[OfflineAccessLink]{records: records, kind: kindOfflineAccessLink, ttl: offlineAccessLinkTTL}}
	b.offlineAccessCurrentLinks = offlineAccessCurrentLinkStore{records: records, site: b.site}
	b.offline = offlineAccessGrantStore{records: records, site: b.site}
	b.registrations = clientStore{records: records, lifetime: b.registrationLifetime()}
	b.cookies = cookieSealer{records: records}
	b.requestStates = requestStateTagger{records: records}
	b.assertionIDs = assertionIDStore{records: records, now: now}
	if b.appPasswords != nil {
		b.appPasswords.store = appPasswordStore{records: records, site: b.site}
		b.appPasswords.links = linkStore[AppPasswordLink]{oneTimeStore[AppPasswordLink]{records: records, kind: kindAppPasswordLink, ttl: appPasswordLinkTTL}}
	}
	// Each broker instance probes a record of its own (health.go).
	b.readiness.store = healthProbeStore{records: records, key: storage.Key(kindHealthProbe, b.site, randomToken())}
}

// cookieSealer seals the values of cookies the broker reads back (the remembered
// consent), under the key ring of the records.
type cookieSealer struct {
	records *storage.Records
}

// seal seals plain for the cookie named by key (built with storage.Key).
func (c cookieSealer) seal(key string, plain []byte) (string, error) {
	return c.records.Seal(key, plain)
}

// open opens a cookie value sealed by seal for key.
func (c cookieSealer) open(key, sealed string) ([]byte, error) {
	return c.records.Open(key, sealed)
}

// getFirst reads the record at the first of keys that holds one, a fresh T for each key
// tried, and returns it with its key: the stores look a record up under the key of every
// ring key (newest first) and of earlier releases. storage.ErrNotFound when none holds one;
// any other error ends the search.
func getFirst[T any](ctx context.Context, r *storage.Records, keys []string) (*T, string, error) {
	for _, key := range keys {
		var v T
		switch err := r.Get(ctx, key, &v); {
		case err == nil:
			return &v, key, nil
		case !errors.Is(err, storage.ErrNotFound):
			return nil, "", err
		}
	}
	return nil, "", storage.ErrNotFound
}

// lockEach takes the storage lock of prefix+key for each of keys (a record's key under
// every ring key), in sorted order, and returns the func that releases them all. Locking
// under the current key alone would not do while a cluster rolls a key rotation: nodes
// that seal with different keys would take different locks for one user. Any two rings
// of the rotation's neighbouring steps share a key, so they share a lock; the order
// keeps two nodes from each holding the lock the other waits for.
func lockEach(ctx context.Context, r *storage.Records, prefix string, keys []string) (func(), error) {
	names := make([]string, len(keys))
	for i, k := range keys {
		names[i] = prefix + k
	}
	slices.Sort(names)
	names = slices.Compact(names)
	unlocks := make([]func(), 0, len(names))
	unlockAll := func() {
		for _, u := range slices.Backward(unlocks) {
			u()
		}
	}
	for _, name := range names {
		u, err := r.Lock(ctx, name)
		if err != nil {
			unlockAll()
			return nil, err
		}
		unlocks = append(unlocks, u)
	}
	return unlockAll, nil
}
