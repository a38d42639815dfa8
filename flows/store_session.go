package flows

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// sessionStore keeps sessions: the IdP grant behind a hybrid login, sealed. Only the
// broker's own code paths read the grant: it never leaves the broker. A session is
// created at login, loaded, renewed, its grant rotated, and ended.
type sessionStore struct {
	records *storage.Records
	now     func() time.Time
	site    string // see Broker.site
	// ttl is how long a session lives unused; maxLifetime how long it lives at all.
	ttl, maxLifetime time.Duration
}

func sessionKey(id string) string { return storage.Key(kindSession, id) }

// sessionLockName is the cluster-wide lock serializing refreshes of a session's IdP grant.
func sessionLockName(id string) string { return "session/" + id }

// create stores a new session for subject's login through clientID.
func (st sessionStore) create(ctx context.Context, subject, clientID string, scopes []string, grant IdPGrant) (*Session, error) {
	s := &Session{
		ID:        randomToken(),
		Subject:   subject,
		ClientID:  clientID,
		Scopes:    scopes,
		Site:      st.site,
		CreatedAt: st.now(),
	}
	if err := st.seal(s, grant); err != nil {
		return nil, err
	}
	if err := st.records.Put(ctx, s.key, s, st.lifetime(s, s.CreatedAt)); err != nil {
		return nil, fmt.Errorf("storing session: %w", err)
	}
	return s, nil
}

// createFromAssertion stores a new session for subject's ID-JAG from issuer, redeemed by
// clientID: no IdP grant behind it, and it lives as long as the tokens issued for it.
func (st sessionStore) createFromAssertion(ctx context.Context, subject, clientID, issuer string, scopes []string, lifetime time.Duration) (*Session, error) {
	s := &Session{
		ID:               randomToken(),
		Subject:          subject,
		ClientID:         clientID,
		Scopes:           scopes,
		Site:             st.site,
		CreatedAt:        st.now(),
		EnterpriseIssuer: issuer,
	}
	s.key = sessionKey(s.ID)
	if err := st.records.Put(ctx, s.key, s, max(min(lifetime, st.lifetime(s, s.CreatedAt)), time.Second)); err != nil {
		return nil, fmt.Errorf("storing session: %w", err)
	}
	return s, nil
}

// load returns the session with id, or storage.ErrNotFound.
func (st sessionStore) load(ctx context.Context, id string) (*Session, error) {
	var s Session
	key := sessionKey(id)
	if err := st.records.Get(ctx, key, &s); err != nil {
		return nil, err
	}
	s.key = key
	return &s, nil
}

// lock takes the session's cluster-wide lock: whoever rotates its grant or ends it holds it.
func (st sessionStore) lock(ctx context.Context, id string) (func(), error) {
	return st.records.Lock(ctx, sessionLockName(id))
}

// grant opens the IdP grant sealed in s, with the key s was read from as the associated
// data: not its own ID, which a record copied to another key keeps.
func (st sessionStore) grant(s *Session) (IdPGrant, error) {
	var g IdPGrant
	if s.key == "" {
		return g, errors.New("opening session grant: the session was not read from storage")
	}
	plain, err := st.records.Open(s.key, s.Grant)
	if err != nil {
		return g, fmt.Errorf("opening session grant: %w", err)
	}
	if err := json.Unmarshal(plain, &g); err != nil {
		return g, fmt.Errorf("decoding session grant: %w", err)
	}
	return g, nil
}

// seal seals grant into s.
func (st sessionStore) seal(s *Session, grant IdPGrant) error {
	plain, err := json.Marshal(grant)
	if err != nil {
		return fmt.Errorf("encoding session grant: %w", err)
	}
	s.key = sessionKey(s.ID)
	if s.Grant, err = st.records.Seal(s.key, plain); err != nil {
		return fmt.Errorf("sealing session grant: %w", err)
	}
	return nil
}

// rotateGrant replaces the IdP grant of s (after a refresh at the IdP rotated it). The
// caller holds the session's lock.
func (st sessionStore) rotateGrant(ctx context.Context, s *Session, grant IdPGrant) error {
	if err := st.seal(s, grant); err != nil {
		return err
	}
	if err := st.records.Put(ctx, s.key, s, st.lifetime(s, st.now())); err != nil {
		return fmt.Errorf("storing session: %w", err)
	}
	return nil
}

// renew extends the life of s from now, as it is. The caller holds the session's lock.
func (st sessionStore) renew(ctx context.Context, s *Session, now time.Time) error {
	if err := st.records.Put(ctx, sessionKey(s.ID), s, st.lifetime(s, now)); err != nil {
		return fmt.Errorf("renewing session: %w", err)
	}
	return nil
}

// end forgets a session and its IdP grant.
func (st sessionStore) end(ctx context.Context, id string) error {
	return st.records.Delete(ctx, sessionKey(id))
}

// lifetime is how long a session's record is kept when written now: the session TTL, but
// never past the session's absolute lifetime.
func (st sessionStore) lifetime(s *Session, now time.Time) time.Duration {
	return max(min(st.ttl, s.CreatedAt.Add(st.maxLifetime).Sub(now)), time.Second)
}
