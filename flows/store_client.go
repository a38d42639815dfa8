package flows

import (
	"context"
	"fmt"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// clientStore keeps dynamically registered clients (RFC 7591). A client is registered,
// loaded, and renewed by its logins and refreshes; it is never rewritten otherwise.
type clientStore struct {
	records *storage.Records
	// lifetime is how long a registration lives after its last renewal (see
	// Broker.registrationLifetime).
	lifetime time.Duration
}

// register stores a new registration, which lives unusedRegistrationTTL until renewed.
func (st clientStore) register(ctx context.Context, rec *RegisteredClient) error {
	return st.records.Put(ctx, recordKey(kindClient, rec.ClientID), rec, unusedRegistrationTTL)
}

// load returns the registration of id, or storage.ErrNotFound.
func (st clientStore) load(ctx context.Context, id string) (*RegisteredClient, error) {
	rec, _, err := st.loadExpiring(ctx, id)
	return rec, err
}

// loadExpiring is load that also returns when the registration's record expires.
func (st clientStore) loadExpiring(ctx context.Context, id string) (*RegisteredClient, time.Time, error) {
	var rec RegisteredClient
	expires, err := st.records.GetExpiring(ctx, recordKey(kindClient, id), &rec)
	if err != nil {
		return nil, time.Time{}, err
	}
	return &rec, expires, nil
}

// renew gives the registration of id a whole lifetime again from now.
func (st clientStore) renew(ctx context.Context, id string, now time.Time) error {
	rec, err := st.load(ctx, id)
	if err != nil {
		return err
	}
	rec.RenewedAt = now
	if err := st.records.Put(ctx, recordKey(kindClient, id), rec, st.lifetime+registrationRenewInterval); err != nil {
		return fmt.Errorf("storing renewed registration: %w", err)
	}
	return nil
}
