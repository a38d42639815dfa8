package flows

// SweepCaches drops the entries expired by now from the broker's memory caches (the
// verdicts on its own access tokens and on the IdP's, the delegated tokens) and returns
// how many went. A full cache evicts expired entries itself; the sweep gives their memory
// back when it is not, so that a node's heap falls back after a burst of logins instead of
// holding up to each cache's bound of dead entries. It walks each cache once under its
// lock: run it every minute or so in the background, never on a request's path.
func (b *Broker) SweepCaches() int {
	now := b.now()
	n := b.brokerTokens.DeleteExpired(now.UnixNano()) + b.verifier.DeleteExpired(now)
	if b.delegation != nil {
		n += b.delegation.cache.entries.DeleteExpired(now.UnixNano())
	}
	return n
}
