package redisstorage

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
)

// scanCount is the COUNT hint of each SCAN round trip (List, and Exists, Stat and Delete
// of a directory).
const scanCount = 1000

// maxListKeys is the most keys List gathers; beyond, it fails rather than grow without
// bound. A variable for tests.
var maxListKeys = 1 << 20

// The hash fields of a value (see the package documentation).
const (
	fieldValue    = "value"
	fieldModified = "modified"
)

// storeScript writes a value and its modification time, then sets the key's expiry
// (ARGV[3] milliseconds) or clears it (ARGV[3] = 0), atomically.
var storeScript = redis.NewScript(`
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'modified', ARGV[2])
if ARGV[3] == '0' then
	redis.call('PERSIST', KEYS[1])
else
	redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1`)

// takeScript returns a value and deletes its key, atomically: the hash layout's GETDEL.
var takeScript = redis.NewScript(`
local v = redis.call('HGET', KEYS[1], 'value')
if v then redis.call('DEL', KEYS[1]) end
return v`)

// moveScript returns a value and renames its key, expiry kept, atomically: the hash
// layout's take that leaves the value behind at a second key (KEYS[2]).
var moveScript = redis.NewScript(`
local v = redis.call('HGET', KEYS[1], 'value')
if v then redis.call('RENAME', KEYS[1], KEYS[2]) end
return v`)

// cleanKey is key as file_system would resolve it under its root: "a//b/" is "a/b", and
// "" the root.
func cleanKey(key string) string {
	return strings.TrimPrefix(path.Clean("/"+key), "/")
}

// valueKey is the Redis key of a certmagic key.
func (s *Storage) valueKey(key string) string {
	return s.KeyPrefix + "/" + cleanKey(key)
}

// childPattern is the SCAN pattern of every key under the directory key.
func (s *Storage) childPattern(key string) string {
	if key = cleanKey(key); key == "" {
		return escapeGlob(s.KeyPrefix+"/") + "*"
	}
	return escapeGlob(s.KeyPrefix+"/"+key+"/") + "*"
}

// escapeGlob quotes the characters SCAN's MATCH would read as a pattern.
func escapeGlob(s string) string {
	if !strings.ContainsAny(s, `*?[]\`) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(`*?[]\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

func notExist(op, key string) error {
	return &fs.PathError{Op: op, Path: key, Err: fs.ErrNotExist}
}

// Store puts value at key, replacing what was there and clearing any expiry.
func (s *Storage) Store(ctx context.Context, key string, value []byte) error {
	return s.store(ctx, key, value, 0)
}

// StoreTTL stores value at key with a server-side expiry after ttl (storage.Native).
func (s *Storage) StoreTTL(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	if ttl <= 0 {
		return fmt.Errorf("storing %q: ttl must be positive, got %s", key, ttl)
	}
	return s.store(ctx, key, value, max(ttl.Milliseconds(), 1))
}

func (s *Storage) store(ctx context.Context, key string, value []byte, ttlMillis int64) error {
	s.conn.used()
	err := storeScript.Run(ctx, s.conn.client, []string{s.valueKey(key)},
		value, strconv.FormatInt(time.Now().UnixNano(), 10), strconv.FormatInt(ttlMillis, 10)).Err()
	if err != nil {
		return fmt.Errorf("storing %q: %w", key, err)
	}
	return nil
}

// Load returns the value at key; fs.ErrNotExist when there is none.
func (s *Storage) Load(ctx context.Context, key string) ([]byte, error) {
	s.conn.used()
	v, err := s.conn.client.HGet(ctx, s.valueKey(key), fieldValue).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, notExist("load", key)
	}
	if err != nil {
		return nil, fmt.Errorf("loading %q: %w", key, err)
	}
	return v, nil
}

// ExpiresRecords is true: StoreTTL sets the key's TTL in Redis.
func (s *Storage) ExpiresRecords() bool { return true }

// LoadAndDelete returns the value at key and deletes it, in one atomic round trip
// (storage.Native); fs.ErrNotExist when there is none.
func (s *Storage) LoadAndDelete(ctx context.Context, key string) ([]byte, error) {
	s.conn.used()
	v, err := takeScript.Run(ctx, s.conn.client, []string{s.valueKey(key)}).Text()
	if errors.Is(err, redis.Nil) {
		return nil, notExist("take", key)
	}
	if err != nil {
		return nil, fmt.Errorf("taking %q: %w", key, err)
	}
	return []byte(v), nil
}

// LoadAndMove returns the value at from and moves it to to, replacing any value there and
// keeping from's expiry, in one atomic round trip (storage.Native); fs.ErrNotExist when
// there is none.
func (s *Storage) LoadAndMove(ctx context.Context, from, to string) ([]byte, error) {
	s.conn.used()
	v, err := moveScript.Run(ctx, s.conn.client, []string{s.valueKey(from), s.valueKey(to)}).Text()
	if errors.Is(err, redis.Nil) {
		return nil, notExist("take", from)
	}
	if err != nil {
		return nil, fmt.Errorf("taking %q: %w", from, err)
	}
	return []byte(v), nil
}

// Delete deletes key, or every key under it when it is a directory, as file_system does.
// A missing key is not an error.
func (s *Storage) Delete(ctx context.Context, key string) error {
	s.conn.used()
	n, err := s.conn.client.Del(ctx, s.valueKey(key)).Result()
	if err != nil {
		return fmt.Errorf("deleting %q: %w", key, err)
	}
	if n == 1 {
		// A file: as on a file system, a key is a file or a directory, never both.
		return nil
	}
	err = s.scan(ctx, s.childPattern(key), func(keys []string) error {
		return s.conn.client.Unlink(ctx, keys...).Err()
	})
	if err != nil {
		return fmt.Errorf("deleting %q: %w", key, err)
	}
	return nil
}

// Exists reports whether key is a file or a directory (a prefix of other keys). An error
// reads as false.
func (s *Storage) Exists(ctx context.Context, key string) bool {
	s.conn.used()
	n, err := s.conn.client.Exists(ctx, s.valueKey(key)).Result()
	if err != nil {
		return false
	}
	if n == 1 {
		return true
	}
	found, err := s.anyUnder(ctx, key)
	return err == nil && found
}

// Stat returns the size and modification time of key's value, or IsTerminal false for a
// directory; fs.ErrNotExist when it is neither.
func (s *Storage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	s.conn.used()
	rk := s.valueKey(key)
	var (
		modified *redis.StringCmd
		size     *redis.IntCmd
	)
	_, err := s.conn.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		modified = p.HGet(ctx, rk, fieldModified)
		size = p.HStrLen(ctx, rk, fieldValue)
		return nil
	})
	switch {
	case err == nil:
		nanos, err := modified.Int64()
		if err != nil {
			return certmagic.KeyInfo{}, fmt.Errorf("stat %q: reading its modification time: %w", key, err)
		}
		return certmagic.KeyInfo{Key: key, Modified: time.Unix(0, nanos), Size: size.Val(), IsTerminal: true}, nil
	case !errors.Is(err, redis.Nil):
		return certmagic.KeyInfo{}, fmt.Errorf("stat %q: %w", key, err)
	}
	found, err := s.anyUnder(ctx, key)
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %q: %w", key, err)
	}
	if !found {
		return certmagic.KeyInfo{}, notExist("stat", key)
	}
	return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
}

// List returns the keys under prefix, as file_system does: with recursive, every file
// and directory below it; without, its direct children. A prefix that is a file has none;
// a prefix that is neither is fs.ErrNotExist. Keys come sorted.
func (s *Storage) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	s.conn.used()
	prefix = cleanKey(prefix)
	strip := len(s.KeyPrefix) + 1
	if prefix != "" {
		strip += len(prefix) + 1
	}
	seen := make(map[string]struct{})
	err := s.scan(ctx, s.childPattern(prefix), func(keys []string) error {
		for _, k := range keys {
			rel := k[strip:]
			for {
				// rel's own key and, recursively, each directory above it.
				dir, _, nested := cutLast(rel)
				if recursive || !nested {
					seen[path.Join(prefix, rel)] = struct{}{}
				}
				if !nested {
					break
				}
				rel = dir
			}
		}
		if len(seen) > maxListKeys {
			return fmt.Errorf("more than %d keys under %q", maxListKeys, prefix)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing %q: %w", prefix, err)
	}
	if len(seen) == 0 {
		n, err := s.conn.client.Exists(ctx, s.valueKey(prefix)).Result()
		if err != nil {
			return nil, fmt.Errorf("listing %q: %w", prefix, err)
		}
		if n == 0 {
			return nil, notExist("list", prefix)
		}
		return nil, nil
	}
	out := make([]string, 0, len(seen))
	for k := range seen {
		out = append(out, k)
	}
	slices.Sort(out)
	return out, nil
}

// cutLast splits "a/b/c" into "a/b" and "c"; nested is false for a key with no "/".
func cutLast(key string) (dir, base string, nested bool) {
	i := strings.LastIndexByte(key, '/')
	if i < 0 {
		return "", key, false
	}
	return key[:i], key[i+1:], true
}

// anyUnder reports whether some key lies under the directory key.
func (s *Storage) anyUnder(ctx context.Context, key string) (bool, error) {
	errFound := errors.New("found")
	err := s.scan(ctx, s.childPattern(key), func([]string) error { return errFound })
	if errors.Is(err, errFound) {
		return true, nil
	}
	return false, err
}

// scan calls fn with each non-empty page of the keys matching pattern, stopping at fn's
// first error. SCAN may return a key twice; fn copes.
func (s *Storage) scan(ctx context.Context, pattern string, fn func(keys []string) error) error {
	var cursor uint64
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		keys, next, err := s.conn.client.Scan(ctx, cursor, pattern, scanCount).Result()
		if err != nil {
			return err
		}
		if len(keys) > 0 {
			if err := fn(keys); err != nil {
				return err
			}
		}
		if next == 0 {
			return nil
		}
		cursor = next
	}
}
