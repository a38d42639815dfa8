package storage

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// A folder's take is a rename, not the storage lock: among nodes sharing the folder, one
// winner per record, and no lock file written for a take or for a key that holds nothing.
func TestFolderTakeHasOneWinnerAcrossProcessesWithoutLocks(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	clock := newClock()
	// Two Records over two FileStorage values sharing one directory stand in for two
	// Caddy processes: they share nothing but the files.
	nodes := []*Records{newFileRecords(t, dir, clock), newFileRecords(t, dir, clock)}
	if nodes[0].native == nil {
		t.Fatal("a FileStorage got no fast path")
	}
	for round := range 20 {
		key := Key("codes", Hash(fmt.Sprint("code-", round)))
		if err := nodes[round%2].Put(ctx, key, "v", time.Minute); err != nil {
			t.Fatal(err)
		}
		if w := race(t, 20, func(i int) error {
			var v string
			return nodes[i%2].TakeOnce(ctx, key, &v)
		}); w != 1 {
			t.Fatalf("round %d: %d winners, want 1", round, w)
		}
	}
	var v string
	for i := range 20 {
		if err := nodes[0].TakeOnce(ctx, Key("codes", Hash(fmt.Sprint("junk-", i))), &v); err != ErrNotFound {
			t.Fatalf("TakeOnce of a missing record = %v, want ErrNotFound", err)
		}
	}
	if entries, err := os.ReadDir(filepath.Join(dir, "locks")); err == nil && len(entries) > 0 || err != nil && !os.IsNotExist(err) {
		t.Errorf("takes left %d lock files (%v), want none taken", len(entries), err)
	}
	left, err := os.ReadDir(filepath.Join(dir, Namespace, "codes"))
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Errorf("%d files left in the folder after every record was taken, want 0", len(left))
	}
}

// A take interrupted between its rename and its remove (a crash) leaves the record under
// a name nobody looks up; the janitor's sweep removes it once it has expired, and an
// expired record taken is not found.
func TestFolderTakeLeftoverIsSwept(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	clock := newClock()
	r := newFileRecords(t, dir, clock)
	key := Key("codes", Hash("code-1"))
	if err := r.Put(ctx, key, "v", time.Minute); err != nil {
		t.Fatal(err)
	}
	fs := &certmagic.FileStorage{Path: dir}
	if err := os.Rename(fs.Filename(key), fs.Filename(key)+".taken-CRASHED"); err != nil {
		t.Fatal(err)
	}
	var v string
	if err := r.TakeOnce(ctx, key, &v); err != ErrNotFound {
		t.Fatalf("TakeOnce after the crashed take = %v, want ErrNotFound", err)
	}
	clock.Advance(time.Minute)
	if n, err := r.Sweep(ctx); err != nil || n != 1 {
		t.Fatalf("Sweep = %d, %v; want the leftover deleted", n, err)
	}
	if _, err := os.Stat(fs.Filename(key) + ".taken-CRASHED"); !os.IsNotExist(err) {
		t.Errorf("the leftover is still there: %v", err)
	}

	expired := Key("codes", Hash("code-2"))
	if err := r.Put(ctx, expired, "v", time.Minute); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Minute)
	if err := r.TakeOnce(ctx, expired, &v); err != ErrNotFound {
		t.Fatalf("TakeOnce of an expired record = %v, want ErrNotFound", err)
	}
}
