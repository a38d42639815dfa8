package caddyoauthbroker

import (
	"context"
	"errors"
	"io/fs"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// storageOperation is a certmagic.Storage method, as the `operation` label names it.
type storageOperation uint8

const (
	opLoad storageOperation = iota
	opStore
	opDelete
	opList
	opStat
	opExists
	opLock
	opUnlock
	opTake
	numStorageOperations
)

var storageOperationNames = [numStorageOperations]string{"load", "store", "delete", "list", "stat", "exists", "lock", "unlock", "take"}

// storageResult is how a storage operation ended, as the `result` label names it.
type storageResult uint8

const (
	storageOK storageResult = iota
	storageNotFound
	storageFailed
	numStorageResults
)

var storageResultNames = [numStorageResults]string{"ok", "not_found", "error"}

// storageObservers are the resolved series of one site's storage operations.
type storageObservers [numStorageOperations][numStorageResults]prometheus.Observer

func newStorageObservers(vec *prometheus.HistogramVec, site string) *storageObservers {
	o := new(storageObservers)
	for op := range numStorageOperations {
		for r := range numStorageResults {
			o[op][r] = vec.WithLabelValues(site, storageOperationNames[op], storageResultNames[r])
		}
	}
	return o
}

// observe times one operation that started at start and ended with err.
func (o *storageObservers) observe(op storageOperation, start time.Time, err error) {
	r := storageOK
	switch {
	case err == nil:
	case errors.Is(err, fs.ErrNotExist):
		r = storageNotFound
	default:
		r = storageFailed
	}
	o[op][r].Observe(time.Since(start).Seconds())
}

// timedStorage is a certmagic.Storage whose operations are timed into the module's
// metrics; the records' storage is wrapped with it in Provision.
type timedStorage struct {
	next certmagic.Storage
	obs  *storageObservers
}

// timedTryLockStorage is timedStorage for a storage that can also try a lock, which the
// janitor uses to skip a round another node holds.
type timedTryLockStorage struct {
	timedStorage
	try certmagic.TryLocker
}

// timedNative times the native fast path of a storage that has one (storage.Native:
// server-side TTL and atomic take), so that wrapping a storage never hides it.
type timedNative struct {
	next storage.Native
	obs  *storageObservers
}

// timedNativeStorage and timedTryLockNativeStorage are the two above for a storage that
// also implements storage.Native.
type (
	timedNativeStorage struct {
		timedStorage
		timedNative
	}
	timedTryLockNativeStorage struct {
		timedTryLockStorage
		timedNative
	}
)

// timeStorage wraps st so that its operations are timed into obs, keeping TryLock and
// storage.Native.
func timeStorage(st certmagic.Storage, obs *storageObservers) certmagic.Storage {
	t := timedStorage{next: st, obs: obs}
	tl, try := st.(certmagic.TryLocker)
	n, native := st.(storage.Native)
	switch {
	case try && native:
		return &timedTryLockNativeStorage{timedTryLockStorage{t, tl}, timedNative{n, obs}}
	case try:
		return &timedTryLockStorage{timedStorage: t, try: tl}
	case native:
		return &timedNativeStorage{t, timedNative{n, obs}}
	}
	return &t
}

func (s *timedStorage) Lock(ctx context.Context, name string) error {
	start := time.Now()
	err := s.next.Lock(ctx, name)
	s.obs.observe(opLock, start, err)
	return err
}

func (s *timedStorage) Unlock(ctx context.Context, name string) error {
	start := time.Now()
	err := s.next.Unlock(ctx, name)
	s.obs.observe(opUnlock, start, err)
	return err
}

func (s *timedStorage) Store(ctx context.Context, key string, value []byte) error {
	start := time.Now()
	err := s.next.Store(ctx, key, value)
	s.obs.observe(opStore, start, err)
	return err
}

func (s *timedStorage) Load(ctx context.Context, key string) ([]byte, error) {
	start := time.Now()
	v, err := s.next.Load(ctx, key)
	s.obs.observe(opLoad, start, err)
	return v, err
}

func (s *timedStorage) Delete(ctx context.Context, key string) error {
	start := time.Now()
	err := s.next.Delete(ctx, key)
	s.obs.observe(opDelete, start, err)
	return err
}

func (s *timedStorage) Exists(ctx context.Context, key string) bool {
	start := time.Now()
	ok := s.next.Exists(ctx, key)
	s.obs.observe(opExists, start, nil)
	return ok
}

func (s *timedStorage) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	start := time.Now()
	keys, err := s.next.List(ctx, path, recursive)
	s.obs.observe(opList, start, err)
	return keys, err
}

func (s *timedStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	start := time.Now()
	info, err := s.next.Stat(ctx, key)
	s.obs.observe(opStat, start, err)
	return info, err
}

func (s *timedTryLockStorage) TryLock(ctx context.Context, name string) (bool, error) {
	start := time.Now()
	got, err := s.try.TryLock(ctx, name)
	s.obs.observe(opLock, start, err)
	return got, err
}

func (s *timedNative) StoreTTL(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	start := time.Now()
	err := s.next.StoreTTL(ctx, key, value, ttl)
	s.obs.observe(opStore, start, err)
	return err
}

func (s *timedNative) ExpiresRecords() bool { return s.next.ExpiresRecords() }

func (s *timedNative) LoadAndDelete(ctx context.Context, key string) ([]byte, error) {
	start := time.Now()
	v, err := s.next.LoadAndDelete(ctx, key)
	s.obs.observe(opTake, start, err)
	return v, err
}

func (s *timedNative) LoadAndMove(ctx context.Context, from, to string) ([]byte, error) {
	start := time.Now()
	v, err := s.next.LoadAndMove(ctx, from, to)
	s.obs.observe(opTake, start, err)
	return v, err
}

var (
	_ certmagic.Storage   = (*timedStorage)(nil)
	_ certmagic.TryLocker = (*timedTryLockStorage)(nil)
	_ storage.Native      = (*timedNativeStorage)(nil)
	_ certmagic.TryLocker = (*timedTryLockNativeStorage)(nil)
	_ storage.Native      = (*timedTryLockNativeStorage)(nil)
)
