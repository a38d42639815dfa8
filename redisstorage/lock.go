package redisstorage

import (
	"context"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// defaultLease is how long a lock outlives its holder's last renewal: a holder that dies
// (or loses Redis) frees its locks after at most this long. Holders renew every third of it.
const defaultLease = 10 * time.Second

// Waiting for a held lock polls, backing off from the first to the last interval.
const (
	lockPollFirst = 5 * time.Millisecond
	lockPollMax   = 200 * time.Millisecond
)

// acquireScript takes the lock KEYS[1] for the token ARGV[1] for ARGV[2] milliseconds. It
// also answers 1 when the token already holds it, so a command the client retried after a
// lost reply does not lock its own holder out.
var acquireScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v == false then
	redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
	return 1
end
if v == ARGV[1] then
	redis.call('PEXPIRE', KEYS[1], ARGV[2])
	return 1
end
return 0`)

// renewScript extends the lock KEYS[1] by ARGV[2] milliseconds if the token ARGV[1] still
// holds it.
var renewScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0`)

// releaseScript deletes the lock KEYS[1] only if the token ARGV[1] holds it: a holder
// whose lease ran out never releases the lock its successor took.
var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return redis.call('DEL', KEYS[1])
end
return 0`)

// heldLock is a lock this process holds: its token and the renewal to stop.
type heldLock struct {
	token string
	stop  chan struct{}
}

// lockKey is the Redis key of the lock name.
func (s *Storage) lockKey(name string) string {
	return s.KeyPrefix + ":lock:" + name
}

// Lock takes the lock for name, waiting while another holder has it, until ctx ends. The
// lock lives for the lease and is renewed while held; Unlock releases it.
func (s *Storage) Lock(ctx context.Context, name string) error {
	s.conn.used()
	token := rand.Text()
	wait := lockPollFirst
	for {
		got, err := s.acquire(ctx, name, token)
		if err != nil {
			return err
		}
		if got {
			return nil
		}
		// Jitter spreads the waiters of one lock over the interval.
		t := time.NewTimer(wait/2 + mrand.N(wait/2+1))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("acquiring lock %q: %w", name, ctx.Err())
		}
		wait = min(2*wait, lockPollMax)
	}
}

// TryLock takes the lock for name if it is free, without waiting.
func (s *Storage) TryLock(ctx context.Context, name string) (bool, error) {
	s.conn.used()
	return s.acquire(ctx, name, rand.Text())
}

// acquire makes one attempt to take the lock for name with token; on success it starts
// the lock's renewal.
func (s *Storage) acquire(ctx context.Context, name, token string) (bool, error) {
	lease := s.conn.lease
	key := s.lockKey(name)
	got, err := acquireScript.Run(ctx, s.conn.client, []string{key}, token, lease.Milliseconds()).Int()
	if err != nil {
		return false, fmt.Errorf("acquiring lock %q: %w", name, err)
	}
	if got != 1 {
		return false, nil
	}
	h := &heldLock{token: token, stop: make(chan struct{})}
	s.conn.mu.Lock()
	if old := s.conn.locks[key]; old != nil {
		// Its lease ran out and this process took the lock again: the old renewal is moot.
		close(old.stop)
	}
	s.conn.locks[key] = h
	s.conn.mu.Unlock()
	go s.conn.renew(key, h, lease)
	return true, nil
}

// renew extends the lock at key every third of the lease while h holds it, until Unlock,
// the client's close, or the lock is found lost.
func (c *conn) renew(key string, h *heldLock, lease time.Duration) {
	tick := time.NewTicker(lease / 3)
	defer tick.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-c.done:
			return
		case <-tick.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), lease/3)
		ok, err := renewScript.Run(ctx, c.client, []string{key}, h.token, lease.Milliseconds()).Int()
		cancel()
		switch {
		case err != nil:
			// Tried again at the next tick; the lease covers two missed renewals.
			c.logger.Warn("renewing a storage lock", zap.String("lock", key), zap.Error(err))
		case ok != 1:
			c.logger.Error("a storage lock expired while held (its holder could not renew it in time); another may hold it now",
				zap.String("lock", key))
			c.mu.Lock()
			if c.locks[key] == h {
				delete(c.locks, key)
			}
			c.mu.Unlock()
			return
		}
	}
}

// Unlock releases the lock for name if this process holds it. A lock another holds (or
// whose lease ran out and another took) is left alone, and Unlock says so.
func (s *Storage) Unlock(ctx context.Context, name string) error {
	key := s.lockKey(name)
	s.conn.mu.Lock()
	h := s.conn.locks[key]
	if h != nil {
		delete(s.conn.locks, key)
		close(h.stop)
	}
	s.conn.mu.Unlock()
	if h == nil {
		if s.conn.closed() {
			return nil // released when the client closed
		}
		return fmt.Errorf("releasing lock %q: not held by this process", name)
	}
	n, err := releaseScript.Run(ctx, s.conn.client, []string{key}, h.token).Int()
	if err != nil {
		return fmt.Errorf("releasing lock %q: %w (it expires within %s)", name, err, s.conn.lease)
	}
	if n != 1 {
		return fmt.Errorf("releasing lock %q: its lease had run out", name)
	}
	return nil
}
