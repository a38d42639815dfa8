package flows

import "context"

// Methods only tests call, kept out of the production files.

// flightCount is how many fetches are under way.
func (c *delegatedCache) flightCount() int {
	return int(c.flying.Load())
}

// What flows/upgrade_test.go, the fixture of the previous release, reads through the
// broker; the record stores (store.go) are what production code uses.

func (b *Broker) loadSession(ctx context.Context, id string) (*Session, error) {
	return b.sessions.load(ctx, id)
}

func (b *Broker) sessionGrant(s *Session) (IdPGrant, error) { return b.sessions.grant(s) }

func (b *Broker) offlineAccessGrantKey(subject string) (string, error) {
	return b.offline.currentKey(subject)
}
