package flows

// Methods only tests call, kept out of the production files.

// flightCount is how many fetches are under way.
func (c *delegatedCache) flightCount() int {
	return int(c.flying.Load())
}
