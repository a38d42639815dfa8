package testenv

import (
	"sync/atomic"
	"time"
)

// Clock is a clock a test moves by hand, safe to move while servers read it: Base plus
// what Advance added, or, with Base zero, the real time plus what Advance added. A Clock
// with Base set stands still, for rate limits and expiries a slow machine must not move.
type Clock struct {
	Base   time.Time
	offset atomic.Int64
}

// Now is the clock's time, for the Now or now func of what is under test.
func (c *Clock) Now() time.Time {
	if c.Base.IsZero() {
		return time.Now().Add(time.Duration(c.offset.Load()))
	}
	return c.Base.Add(time.Duration(c.offset.Load()))
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) { c.offset.Add(int64(d)) }
