package flows

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// healthProbeStore writes the readiness probe's record and reads it back (health.go).
// The record is this broker's own (its key names the site and a random id of this
// instance), so nodes sharing a storage never read each other's probes; it is
// overwritten by each probe and expires unless probed again.
type healthProbeStore struct {
	records *storage.Records
	key     string
}

// healthProbeTTL is how long a probe record outlives the last probe; the janitor
// sweeps the records of instances gone.
const healthProbeTTL = 10 * time.Minute

// HealthProbe is the readiness probe's record: a fresh random value sealed under the
// key ring.
type HealthProbe struct {
	Sealed string `json:"sealed"`
}

// errProbeMismatch means storage gave back something other than what was just written.
var errProbeMismatch = errors.New("the probe record read back differs from the one written")

// probe seals value, stores it, loads it back and opens it: the key ring can seal and
// open (keyRingErr), and the storage takes a write and returns it (storageErr).
func (s healthProbeStore) probe(ctx context.Context, value string) (keyRingErr, storageErr error) {
	sealed, err := s.records.Seal(s.key, []byte(value))
	if err != nil {
		return fmt.Errorf("sealing the probe: %w", err), nil
	}
	if err := s.records.Put(ctx, s.key, HealthProbe{Sealed: sealed}, healthProbeTTL); err != nil {
		return nil, fmt.Errorf("writing the probe record: %w", err)
	}
	var back HealthProbe
	if err := s.records.Get(ctx, s.key, &back); err != nil {
		return nil, fmt.Errorf("reading the probe record back: %w", err)
	}
	if back.Sealed != sealed {
		return nil, errProbeMismatch
	}
	plain, err := s.records.Open(s.key, back.Sealed)
	if err != nil {
		return fmt.Errorf("opening the probe: %w", err), nil
	}
	if string(plain) != value {
		return errors.New("opening the probe: a different value came out"), nil
	}
	return nil, nil
}
