package storage

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// DefaultJanitorInterval is used when StartJanitor is given no interval.
const DefaultJanitorInterval = 10 * time.Minute

// janitorLock is the storage lock that keeps sweeps to one node at a time.
const janitorLock = "mcp_oauth_janitor"

// janitorMarkerKey records when some node last swept.
var janitorMarkerKey = Key("janitor", "last_run")

type janitorMarker struct {
	RanAt time.Time `json:"ran_at"`
}

// Janitor periodically deletes expired records; see StartJanitor.
type Janitor struct {
	cancel   context.CancelFunc
	done     chan struct{}
	stopOnce sync.Once
}

// StartJanitor starts deleting expired records under mcp_oauth/ every
// interval (DefaultJanitorInterval if interval <= 0), beginning at once so
// that frequent config reloads cannot starve it. Each round takes the storage
// lock "mcp_oauth_janitor" and reads the marker record mcp_oauth/janitor/last_run;
// if another node swept within the interval the round is skipped, so a
// cluster sweeps about once per interval in total.
//
// On a backend that expires records itself (Native.ExpiresRecords) there is nothing to sweep: every record
// is stored with its TTL and the backend drops it itself. A sweep there would only
// list every key and read every record (at 400k records on Redis, 22 s and a
// transient 86 MiB of heap on the sweeping node), so the janitor does not run.
//
// StartJanitor returns at once. The goroutine stops when ctx is cancelled or
// Stop is called.
func (r *Records) StartJanitor(ctx context.Context, interval time.Duration) *Janitor {
	if interval <= 0 {
		interval = DefaultJanitorInterval
	}
	ctx, cancel := context.WithCancel(ctx)
	j := &Janitor{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(j.done)
		if r.native != nil && r.native.ExpiresRecords() {
			<-ctx.Done()
			return
		}
		ticker := time.NewTicker(interval)
		defer ticker.Stop()
		for {
			ran, deleted, err := r.janitorRound(ctx, interval)
			switch {
			case err != nil && ctx.Err() == nil:
				r.logger.Warn("sweeping expired records", zap.Error(err))
			case ran:
				r.logger.Debug("swept expired records", zap.Int("deleted", deleted))
			}
			select {
			case <-ctx.Done():
				return
			case <-ticker.C:
			}
		}
	}()
	return j
}

// Stop stops the janitor and waits for its goroutine to exit. It may be
// called more than once.
func (j *Janitor) Stop() {
	j.stopOnce.Do(j.cancel)
	<-j.done
}

// Done is closed once the janitor's goroutine has exited.
func (j *Janitor) Done() <-chan struct{} { return j.done }

// janitorRound sweeps unless another node holds the janitor lock or swept
// within the interval. ran reports whether a sweep happened.
func (r *Records) janitorRound(ctx context.Context, interval time.Duration) (ran bool, deleted int, err error) {
	if tl, ok := r.store.(certmagic.TryLocker); ok {
		got, err := tl.TryLock(ctx, janitorLock)
		if err != nil {
			return false, 0, fmt.Errorf("acquiring janitor lock: %w", err)
		}
		if !got {
			return false, 0, nil // another node is sweeping
		}
	} else if err := r.store.Lock(ctx, janitorLock); err != nil {
		return false, 0, fmt.Errorf("acquiring janitor lock: %w", err)
	}
	defer func() {
		if err := r.store.Unlock(context.WithoutCancel(ctx), janitorLock); err != nil {
			r.logger.Error("releasing janitor lock", zap.Error(err))
		}
	}()

	var m janitorMarker
	switch err := r.Get(ctx, janitorMarkerKey, &m); {
	case err == nil:
		// A tenth of slack so that this node's own ticks, which arrive a
		// little early or late, do not skip every other round.
		if r.now().Sub(m.RanAt) < interval-interval/10 {
			return false, 0, nil
		}
	case errors.Is(err, ErrNotFound):
	default:
		// An unreadable marker must not stop the cleanup; it is rewritten below.
		r.logger.Warn("reading janitor marker", zap.Error(err))
	}

	deleted, err = r.Sweep(ctx)
	// The marker outlives one interval so other nodes see it, and is itself
	// swept once the whole cluster has stopped.
	if perr := r.Put(ctx, janitorMarkerKey, janitorMarker{RanAt: r.now().UTC()}, 2*interval); perr != nil {
		err = errors.Join(err, perr)
	}
	return true, deleted, err
}

// Sweep makes one pass over every record under mcp_oauth/, deleting the
// expired ones, and reports how many it deleted. It takes no lock and ignores
// the marker; the janitor adds those. Entries that are not records are left
// alone.
//
// certmagic storage has no compare-and-delete, so a Put that rewrites an
// expired record's key between Sweep's read and delete is lost. Keys are
// almost always hashes of fresh random values, which makes this theoretical.
func (r *Records) Sweep(ctx context.Context) (deleted int, err error) {
	keys, err := r.listRecords(ctx, Namespace)
	if err != nil {
		return 0, fmt.Errorf("sweeping: %w", err)
	}
	var (
		failed   int
		firstErr error
	)
	for _, k := range keys {
		if err := ctx.Err(); err != nil {
			return deleted, fmt.Errorf("sweeping: %w", err)
		}
		if !validKey(k, true) {
			continue // not ours to judge, e.g. a temp file of another backend
		}
		env, err := r.load(ctx, k)
		if err != nil {
			if !errors.Is(err, ErrNotFound) {
				r.logger.Debug("skipping unreadable entry", zap.String("key", k), zap.Error(err))
			}
			continue
		}
		if !r.expired(env) {
			continue
		}
		if err := r.store.Delete(ctx, k); err != nil {
			// Keep going: one undeletable entry must not stall all cleanup.
			failed++
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		deleted++
	}
	if firstErr != nil {
		return deleted, fmt.Errorf("sweeping: deleting %d expired records: %w", failed, firstErr)
	}
	return deleted, nil
}
