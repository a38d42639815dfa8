package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// ErrNotFound is returned for a record that is missing or expired. It also
// matches fs.ErrNotExist under errors.Is.
var ErrNotFound error = &notFoundError{}

type notFoundError struct{}

func (*notFoundError) Error() string        { return "record not found" }
func (*notFoundError) Is(target error) bool { return target == fs.ErrNotExist }

var errInvalidKey = errors.New("invalid record key: build it with storage.Key")

// Native is the optional fast path a backend may offer (the mcp_oauth_redis
// storage module does): native TTL and atomic get-and-delete. When the
// certmagic.Storage passed to New also implements Native, Put uses StoreTTL
// and TakeOnce uses LoadAndDelete without taking any lock.
type Native interface {
	// StoreTTL stores value at key; the backend may drop it after ttl.
	StoreTTL(ctx context.Context, key string, value []byte, ttl time.Duration) error
	// LoadAndDelete atomically returns and removes the value at key;
	// fs.ErrNotExist when missing.
	LoadAndDelete(ctx context.Context, key string) ([]byte, error)
	// ExpiresRecords tells whether the backend drops a value once the ttl given to
	// StoreTTL has passed (Redis); if not (a folder), the janitor sweeps expired records.
	ExpiresRecords() bool
	// LoadAndMove atomically moves the value at from to to, replacing any value there
	// and keeping from's expiry, and returns it; fs.ErrNotExist when from is missing.
	// Of concurrent moves of one key exactly one succeeds, and to holds the value as
	// soon as any of the others fails.
	LoadAndMove(ctx context.Context, from, to string) ([]byte, error)
}

// Records stores typed, expiring records in a certmagic.Storage. It is safe
// for concurrent use.
type Records struct {
	store  certmagic.Storage
	native Native // nil unless store implements it
	ring   *KeyRing
	now    func() time.Time
	logger *zap.Logger
	local  keyedLocks // in front of storage locks; see TakeOnce
}

// Option configures Records.
type Option func(*Records)

// WithClock injects the clock used for expiry. Default: time.Now.
func WithClock(now func() time.Time) Option {
	return func(r *Records) {
		if now != nil {
			r.now = now
		}
	}
}

// WithLogger sets the logger. Default: zap.NewNop().
func WithLogger(l *zap.Logger) Option {
	return func(r *Records) {
		if l != nil {
			r.logger = l
		}
	}
}

// New returns Records over s, with its FastPath. ring may be nil when nothing
// is sealed; Seal and Open then return an error.
func New(s certmagic.Storage, ring *KeyRing, opts ...Option) *Records {
	s = FastPath(s)
	r := &Records{
		store:  s,
		ring:   ring,
		now:    time.Now,
		logger: zap.NewNop(),
	}
	r.native, _ = s.(Native)
	for _, o := range opts {
		o(r)
	}
	return r
}

// Seal seals plaintext for the record at key; see KeyRing.Seal.
func (r *Records) Seal(key string, plaintext []byte) (string, error) {
	return r.ring.Seal(key, plaintext)
}

// Open opens a value sealed for the record at key; see KeyRing.Open.
func (r *Records) Open(key, sealed string) ([]byte, error) {
	return r.ring.Open(key, sealed)
}

// KeyedHashes returns the keyed hashes of text for record keys; see KeyRing.KeyedHashes.
// It is empty when Records has no key ring.
func (r *Records) KeyedHashes(text string) []string {
	return r.ring.KeyedHashes(text)
}

// Tag authenticates data for purpose; see KeyRing.Tag.
func (r *Records) Tag(purpose string, data []byte) (string, error) {
	return r.ring.Tag(purpose, data)
}

// CheckTag tells whether tag is Tag(purpose, data) under a key of the ring; see
// KeyRing.CheckTag.
func (r *Records) CheckTag(purpose string, data []byte, tag string) bool {
	return r.ring.CheckTag(purpose, data, tag)
}

// envelope is what is stored: the expiry lives inside the value because
// certmagic storage has no TTL.
type envelope struct {
	ExpiresAt time.Time       `json:"expires_at"`
	Value     json.RawMessage `json:"value"`
}

func (r *Records) expired(e *envelope) bool {
	return !r.now().Before(e.ExpiresAt)
}

// Put stores v as JSON at key for ttl, replacing any record there.
func (r *Records) Put(ctx context.Context, key string, v any, ttl time.Duration) error {
	if !validKey(key, true) {
		return errInvalidKey
	}
	if ttl <= 0 {
		return fmt.Errorf("storing record: ttl must be positive, got %s", ttl)
	}
	value, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding record: %w", err)
	}
	data, err := encodeEnvelope(r.now().Add(ttl).UTC(), value)
	if err != nil {
		return fmt.Errorf("encoding record: %w", err)
	}
	if r.native != nil {
		err = r.native.StoreTTL(ctx, key, data, ttl)
	} else {
		err = r.store.Store(ctx, key, data)
	}
	if err != nil {
		return fmt.Errorf("storing record: %w", err)
	}
	return nil
}

// Get decodes the record at key into v. A missing or expired record is
// ErrNotFound. Expired records are left for the janitor rather than deleted
// here, so that a Get never races a concurrent Put of the same key.
func (r *Records) Get(ctx context.Context, key string, v any) error {
	_, err := r.GetExpiring(ctx, key, v)
	return err
}

// GetExpiring is Get that also returns when the record expires, for a caller that keeps
// the value in memory and must not keep it longer.
func (r *Records) GetExpiring(ctx context.Context, key string, v any) (time.Time, error) {
	if !validKey(key, true) {
		return time.Time{}, errInvalidKey
	}
	env, err := r.load(ctx, key)
	if err != nil {
		return time.Time{}, err
	}
	if r.expired(env) {
		return time.Time{}, ErrNotFound
	}
	return env.ExpiresAt, decodeValue(env, v)
}

// Delete removes the record at key; a missing record is not an error.
func (r *Records) Delete(ctx context.Context, key string) error {
	if !validKey(key, true) {
		return errInvalidKey
	}
	if err := r.store.Delete(ctx, key); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("deleting record: %w", err)
	}
	return nil
}

// List returns the keys of live records anywhere under prefix (recursive),
// in the order the backend returns them. Expired records are excluded, which
// costs one read per key; so are entries that are not records (directories,
// files being written). A missing prefix yields an empty list.
func (r *Records) List(ctx context.Context, prefix string) ([]string, error) {
	if !validKey(prefix, false) {
		return nil, errInvalidKey
	}
	keys, err := r.listRecords(ctx, prefix)
	if err != nil {
		return nil, err
	}
	live := keys[:0]
	for _, k := range keys {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("listing records: %w", err)
		}
		env, err := r.load(ctx, k)
		if err != nil {
			// Deleted meanwhile, or not a record: either way not listed.
			continue
		}
		if !r.expired(env) {
			live = append(live, k)
		}
	}
	return live, nil
}

// listRecords lists candidate record keys under prefix without reading them.
func (r *Records) listRecords(ctx context.Context, prefix string) ([]string, error) {
	var (
		keys []string
		err  error
	)
	// FileStorage aborts a walk with fs.ErrNotExist when a file vanishes
	// mid-walk (a concurrent delete), so retry a few times before giving up.
	for range 3 {
		keys, err = r.store.List(ctx, prefix, true)
		if err == nil {
			break
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("listing records: %w", err)
		}
		if !r.store.Exists(ctx, prefix) {
			return nil, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("listing records: %w", err)
	}
	// A recursive list includes directories; drop any key that is the parent
	// of another, which needs no extra reads.
	parents := make(map[string]struct{})
	for _, k := range keys {
		for i := len(k) - 1; i > 0; i-- {
			if k[i] == '/' {
				parents[k[:i]] = struct{}{}
			}
		}
	}
	out := make([]string, 0, len(keys))
	for _, k := range keys {
		if _, isParent := parents[k]; !isParent && k != prefix {
			out = append(out, k)
		}
	}
	return out, nil
}

// TakeOnce reads and deletes the record at key atomically: among all callers
// sharing the storage, in this process or any other, exactly one gets the
// value and the rest get ErrNotFound. An expired record is ErrNotFound.
//
// With a Native backend this is LoadAndDelete (a file_system folder's is a
// rename: FastPath). Otherwise the storage lock is
// held around load+delete; an in-process lock per key sits in front of it so
// that goroutines of one process queue in memory instead of polling the
// storage lock (FileStorage polls once a second).
//
// Keys a stranger makes up (a random state or code) name no record: a read
// finds that before any lock is taken, since a FileStorage lock is a file
// and a goroutine that lives for seconds (SECURITY.md). The read decides
// nothing for a record that exists: the load under the lock does.
func (r *Records) TakeOnce(ctx context.Context, key string, v any) error {
	if !validKey(key, true) {
		return errInvalidKey
	}
	var data []byte
	if r.native != nil {
		var err error
		data, err = r.native.LoadAndDelete(ctx, key)
		if errors.Is(err, fs.ErrNotExist) {
			return ErrNotFound
		}
		if err != nil {
			return fmt.Errorf("taking record: %w", err)
		}
	} else {
		unlock, err := r.lockLive(ctx, key)
		if err != nil {
			return err
		}
		data, err = r.store.Load(ctx, key)
		if err == nil {
			// The value is handed out only once the delete succeeded, so a
			// failed delete can never let a second caller take it too.
			err = r.store.Delete(ctx, key)
		}
		unlock()
		if errors.Is(err, fs.ErrNotExist) {
			return ErrNotFound
		}
		if err != nil {
			return fmt.Errorf("taking record: %w", err)
		}
	}
	env, err := decodeEnvelope(data)
	if err != nil {
		return err
	}
	if r.expired(env) {
		return ErrNotFound
	}
	return decodeValue(env, v)
}

// TakeOnceLeaving is TakeOnce with the record left behind at trace, envelope and expiry
// as stored, instead of deleted: one write per record, where a trace written beside it
// would be two. Among concurrent callers exactly one gets the value; every other one
// gets ErrNotFound, and finds the trace with Get once it has. A caller that must tell a
// record taken from one never stored reads trace after ErrNotFound; one that wants the
// value usable for less long than the trace keeps its own deadline in the value. A key
// taken this way must be taken this way only (TakeOnce would leave no trace).
//
// With a Native backend this is LoadAndMove (a folder's rename, one Redis script).
// Otherwise, under the storage lock of key, as TakeOnce: the trace is written before the
// key is deleted, so that a caller finding key gone finds the trace.
func (r *Records) TakeOnceLeaving(ctx context.Context, key, trace string, v any) error {
	if !validKey(key, true) || !validKey(trace, true) || key == trace {
		return errInvalidKey
	}
	var (
		data []byte
		env  *envelope
		err  error
	)
	if r.native != nil {
		data, err = r.native.LoadAndMove(ctx, key, trace)
		if errors.Is(err, fs.ErrNotExist) {
			return ErrNotFound
		}
		if err != nil {
			return fmt.Errorf("taking record: %w", err)
		}
		if env, err = decodeEnvelope(data); err != nil {
			return err
		}
	} else {
		unlock, err := r.lockLive(ctx, key)
		if err != nil {
			return err
		}
		env, err = r.moveLocked(ctx, key, trace)
		unlock()
		if err != nil {
			return err
		}
	}
	if r.expired(env) {
		return ErrNotFound
	}
	return decodeValue(env, v)
}

// lockLive takes the storage lock of key for a take without Native, once a read has
// found a live record there: a key a stranger makes up names none and takes no lock.
func (r *Records) lockLive(ctx context.Context, key string) (unlock func(), err error) {
	switch env, err := r.load(ctx, key); {
	case err != nil:
		return nil, err
	case r.expired(env):
		return nil, ErrNotFound
	}
	if unlock, err = r.lock(ctx, "take", key); err != nil {
		return nil, fmt.Errorf("taking record: %w", err)
	}
	return unlock, nil
}

// moveLocked is TakeOnceLeaving's move on a backend without Native; the caller holds
// the lock of key. The value is handed out only once the delete succeeded.
func (r *Records) moveLocked(ctx context.Context, key, trace string) (*envelope, error) {
	data, err := r.store.Load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("taking record: %w", err)
	}
	env, err := decodeEnvelope(data)
	if err != nil {
		return nil, err
	}
	if r.expired(env) {
		return nil, ErrNotFound // left for the janitor, as by Get
	}
	if err := r.store.Store(ctx, trace, data); err != nil {
		return nil, fmt.Errorf("taking record: leaving its trace: %w", err)
	}
	switch err := r.store.Delete(ctx, key); {
	case errors.Is(err, fs.ErrNotExist):
		return nil, ErrNotFound
	case err != nil:
		return nil, fmt.Errorf("taking record: %w", err)
	}
	return env, nil
}

// Lock takes the cluster-wide storage lock for name and returns the func that
// releases it (safe to call more than once). Names are namespaced and hashed,
// so any string is safe and never collides with TakeOnce or Caddy's own locks.
func (r *Records) Lock(ctx context.Context, name string) (unlock func(), err error) {
	unlock, err = r.lock(ctx, "lock", name)
	if err != nil {
		return nil, fmt.Errorf("acquiring lock: %w", err)
	}
	return unlock, nil
}

// lock takes the in-process lock for kind+name, then the storage lock.
func (r *Records) lock(ctx context.Context, kind, name string) (func(), error) {
	storageName := lockName(kind, name)
	release, err := r.local.lock(ctx, storageName)
	if err != nil {
		return nil, err
	}
	if err := r.store.Lock(ctx, storageName); err != nil {
		release()
		return nil, err
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			// The caller's ctx may be cancelled by now; unlocking must still happen.
			if err := r.store.Unlock(context.WithoutCancel(ctx), storageName); err != nil {
				r.logger.Error("releasing storage lock", zap.String("lock", storageName), zap.Error(err))
			}
			release()
		})
	}, nil
}

func (r *Records) load(ctx context.Context, key string) (*envelope, error) {
	data, err := r.store.Load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("loading record: %w", err)
	}
	return decodeEnvelope(data)
}

// encodeEnvelope is json.Marshal(envelope{expiresAt, value}) for a value json.Marshal
// wrote (compact and valid already), byte for byte, without the second pass over value
// that json.Marshal makes to check and compact a json.RawMessage.
func encodeEnvelope(expiresAt time.Time, value []byte) ([]byte, error) {
	data := make([]byte, 0, len(value)+len(time.RFC3339Nano)+len(`{"expires_at":"","value":}`))
	data = append(data, `{"expires_at":`...)
	t, err := expiresAt.MarshalJSON()
	if err != nil {
		return nil, err
	}
	data = append(data, t...)
	data = append(data, `,"value":`...)
	data = append(data, value...)
	return append(data, '}'), nil
}

func decodeEnvelope(data []byte) (*envelope, error) {
	var env envelope
	if err := json.Unmarshal(data, &env); err != nil {
		return nil, fmt.Errorf("decoding record: %w", err)
	}
	if env.ExpiresAt.IsZero() {
		return nil, errors.New("decoding record: no expires_at")
	}
	return &env, nil
}

func decodeValue(env *envelope, v any) error {
	if err := json.Unmarshal(env.Value, v); err != nil {
		return fmt.Errorf("decoding record value: %w", err)
	}
	return nil
}

// keyedLocks is an in-process lock per name. Entries exist only while held
// or awaited, so the map stays bounded by the number of concurrent callers.
type keyedLocks struct {
	mu sync.Mutex
	m  map[string]*keyedLock
}

type keyedLock struct {
	sem  chan struct{} // capacity 1; a send acquires
	refs int           // holders + waiters, guarded by keyedLocks.mu
}

func (k *keyedLocks) lock(ctx context.Context, name string) (release func(), err error) {
	k.mu.Lock()
	if k.m == nil {
		k.m = make(map[string]*keyedLock)
	}
	l := k.m[name]
	if l == nil {
		l = &keyedLock{sem: make(chan struct{}, 1)}
		k.m[name] = l
	}
	l.refs++
	k.mu.Unlock()

	select {
	case l.sem <- struct{}{}:
	case <-ctx.Done():
		k.drop(name, l)
		return nil, ctx.Err()
	}
	return func() {
		<-l.sem
		k.drop(name, l)
	}, nil
}

func (k *keyedLocks) drop(name string, l *keyedLock) {
	k.mu.Lock()
	l.refs--
	if l.refs == 0 {
		delete(k.m, name)
	}
	k.mu.Unlock()
}
