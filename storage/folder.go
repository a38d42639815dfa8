package storage

import (
	"context"
	"crypto/rand"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/caddyserver/certmagic"
)

// FastPath returns s with the fast path this package knows for its type: for Caddy's
// file_system folder (*certmagic.FileStorage), Native with a take by rename. Otherwise s
// is returned as it is. New applies it; a caller wrapping the storage (to time its
// operations) applies it first, so that the wrapper sees Native.
func FastPath(s certmagic.Storage) certmagic.Storage {
	if fs, ok := s.(*certmagic.FileStorage); ok {
		return folder{fs}
	}
	return s
}

// folder is a file_system folder, local or shared by several nodes, with Native.
// Its records keep their expiry in the envelope, as on any certmagic.Storage; StoreTTL is
// Store, and the janitor sweeps them.
//
// LoadAndDelete renames the record's file to a name of its own before reading it: of
// several renames of one file, on one node or on several sharing the folder, exactly one
// succeeds (POSIX rename(2); NFS serves it from the server), so the record is taken once
// without the storage lock. A FileStorage lock is a file written and synced, a goroutine
// that keeps it fresh, and a second of polling for a waiter; a take had cost a read, the
// lock, a second read, the delete and the unlock. A release before this one takes under
// the lock, which a rename does not see: the nodes sharing a folder run one release.
type folder struct {
	*certmagic.FileStorage
}

// StoreTTL stores value at key; the expiry is the envelope's.
func (f folder) StoreTTL(ctx context.Context, key string, value []byte, _ time.Duration) error {
	return f.Store(ctx, key, value)
}

// ExpiresRecords is false: a file stays until it is deleted.
func (folder) ExpiresRecords() bool { return false }

// LoadAndDelete takes the file of key: renamed, read, removed. A missing file is
// fs.ErrNotExist. A file left behind by a crash after the rename keeps the record's
// envelope under a name nobody looks up (the key + ".taken-" + random), and the janitor
// sweeps it once expired.
func (f folder) LoadAndDelete(_ context.Context, key string) ([]byte, error) {
	name := f.Filename(key)
	taken := name + ".taken-" + rand.Text()
	if err := os.Rename(name, taken); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(taken)
	// Taken by the rename already: a file the remove leaves is swept as above, and one
	// that could not be read is handed to nobody.
	_ = os.Remove(taken)
	if err != nil {
		return nil, err
	}
	return data, nil
}

// LoadAndMove takes the file of from by renaming it to to's, then reads it: of several
// renames of one file exactly one succeeds, and to's file exists from that instant, so a
// loser that then reads to finds it. A missing file is fs.ErrNotExist. to's folder is
// made when the rename finds it missing (the first move into it).
func (f folder) LoadAndMove(_ context.Context, from, to string) ([]byte, error) {
	src, dst := f.Filename(from), f.Filename(to)
	err := os.Rename(src, dst)
	if errors.Is(err, fs.ErrNotExist) {
		// ENOENT is the source gone or the target's folder missing, and which one cannot
		// be told by looking at the folder: another move may have made it since. So make
		// it (one stat when it is there) and let a second rename decide.
		if merr := os.MkdirAll(filepath.Dir(dst), 0o700); merr != nil {
			return nil, merr
		}
		err = os.Rename(src, dst)
	}
	if err != nil {
		return nil, err
	}
	// Moved: a read that fails hands the value to nobody, as in LoadAndDelete.
	data, err := os.ReadFile(dst)
	if err != nil {
		return nil, err
	}
	return data, nil
}

var (
	_ certmagic.Storage   = folder{}
	_ certmagic.TryLocker = folder{}
	_ Native              = folder{}
)
