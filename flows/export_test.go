package flows

// Methods only tests call, kept out of the production files.

// len is the number of entries, expired ones included.
func (c *tokenCache[V]) len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.entries)
}

// clear empties the cache.
func (c *tokenCache[V]) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.removals++
	clear(c.entries)
}

// flightCount is how many fetches are under way.
func (c *delegatedCache) flightCount() int {
	return int(c.flying.Load())
}
