package flows

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// Sessions hold the IdP grant behind a hybrid login, sealed. Only the broker's own code
// paths read the grant: it never leaves the broker.

func sessionKey(id string) string { return storage.Key(kindSession, id) }

// createSession stores a new session for subject's login through clientID.
func (b *Broker) createSession(ctx context.Context, subject, clientID string, scopes []string, grant IdPGrant) (*Session, error) {
	s := &Session{
		ID:        randomToken(),
		Subject:   subject,
		ClientID:  clientID,
		Scopes:    scopes,
		CreatedAt: b.now(),
	}
	s.key = sessionKey(s.ID)
	if err := b.sealGrant(s, grant); err != nil {
		return nil, err
	}
	if err := b.cfg.Records.Put(ctx, sessionKey(s.ID), s, b.sessionTTL(s, s.CreatedAt)); err != nil {
		return nil, fmt.Errorf("storing session: %w", err)
	}
	return s, nil
}

// loadSession returns the session with id, or storage.ErrNotFound.
func (b *Broker) loadSession(ctx context.Context, id string) (*Session, error) {
	var s Session
	key := sessionKey(id)
	if err := b.cfg.Records.Get(ctx, key, &s); err != nil {
		return nil, err
	}
	s.key = key
	return &s, nil
}

// sessionGrant opens the IdP grant sealed in s, with the key s was read from as the
// associated data: not its own ID, which a record copied to another key keeps.
func (b *Broker) sessionGrant(s *Session) (IdPGrant, error) {
	var g IdPGrant
	if s.key == "" {
		return g, errors.New("opening session grant: the session was not read from storage")
	}
	plain, err := b.cfg.Records.Open(s.key, s.Grant)
	if err != nil {
		return g, fmt.Errorf("opening session grant: %w", err)
	}
	if err := json.Unmarshal(plain, &g); err != nil {
		return g, fmt.Errorf("decoding session grant: %w", err)
	}
	return g, nil
}

// sealGrant seals grant into s.
func (b *Broker) sealGrant(s *Session, grant IdPGrant) error {
	plain, err := json.Marshal(grant)
	if err != nil {
		return fmt.Errorf("encoding session grant: %w", err)
	}
	s.key = sessionKey(s.ID)
	if s.Grant, err = b.cfg.Records.Seal(s.key, plain); err != nil {
		return fmt.Errorf("sealing session grant: %w", err)
	}
	return nil
}

// storeSessionGrant replaces the IdP grant of s (after a refresh at the IdP rotated it).
// The caller holds the session's lock.
func (b *Broker) storeSessionGrant(ctx context.Context, s *Session, grant IdPGrant) error {
	if err := b.sealGrant(s, grant); err != nil {
		return err
	}
	if err := b.cfg.Records.Put(ctx, s.key, s, b.sessionTTL(s, b.now())); err != nil {
		return fmt.Errorf("storing session: %w", err)
	}
	return nil
}

// deleteSession forgets a session and its IdP grant.
func (b *Broker) deleteSession(ctx context.Context, id string) error {
	return b.cfg.Records.Delete(ctx, sessionKey(id))
}

// sessionLockName is the cluster-wide lock serializing refreshes of a session's IdP grant.
func sessionLockName(id string) string { return "session/" + id }
