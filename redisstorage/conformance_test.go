package redisstorage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddyserver/certmagic"
)

// backends are the storages the conformance test holds to the same assertions: Caddy's
// file_system, whose semantics certmagic defines by example, and this module.
func backends(t *testing.T) map[string]func(t *testing.T) certmagic.Storage {
	return map[string]func(t *testing.T) certmagic.Storage{
		"file_system": func(t *testing.T) certmagic.Storage { return &certmagic.FileStorage{Path: t.TempDir()} },
		"redis":       func(t *testing.T) certmagic.Storage { return newStorage(t, testenv.Redis(t)) },
	}
}

// TestStorageConformance: what certmagic and the storage package rely on behaves in Redis
// as in file_system: missing keys are fs.ErrNotExist, keys are paths whose prefixes are
// directories for Exists, Stat, List and Delete, and values round-trip byte for byte.
func TestStorageConformance(t *testing.T) {
	for name, newBackend := range backends(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			st := newBackend(t)

			if _, err := st.Load(ctx, "nothing/here"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("Load of a missing key = %v, want fs.ErrNotExist", err)
			}
			if _, err := st.Stat(ctx, "nothing/here"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("Stat of a missing key = %v, want fs.ErrNotExist", err)
			}
			if _, err := st.List(ctx, "nothing", true); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("List of a missing prefix = %v, want fs.ErrNotExist", err)
			}
			if st.Exists(ctx, "nothing") {
				t.Error("Exists of a missing key = true")
			}
			if err := st.Delete(ctx, "nothing/here"); err != nil {
				t.Errorf("Delete of a missing key = %v, want nil", err)
			}

			before := time.Now()
			binary := []byte{0, 1, 2, 0xff, '\r', '\n'}
			files := map[string][]byte{
				"acme/example.com/cert.crt": []byte("crt"),
				"acme/example.com/cert.key": binary,
				"acme/other.org/cert.crt":   []byte("other"),
				"acme/account.json":         {},
				"misc.json":                 []byte(`{"a":1}`),
			}
			for k, v := range files {
				if err := st.Store(ctx, k, v); err != nil {
					t.Fatalf("Store(%s) = %v", k, err)
				}
			}
			after := time.Now()
			for k, want := range files {
				got, err := st.Load(ctx, k)
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("Load(%s) = %q, %v; want %q", k, got, err, want)
				}
			}
			if err := st.Store(ctx, "misc.json", []byte("replaced")); err != nil {
				t.Fatal(err)
			}
			if got, _ := st.Load(ctx, "misc.json"); string(got) != "replaced" {
				t.Errorf("Load after a second Store = %q, want the new value", got)
			}

			for _, k := range []string{"acme", "acme/example.com", "acme/example.com/cert.key", "misc.json"} {
				if !st.Exists(ctx, k) {
					t.Errorf("Exists(%s) = false, want true (a file or a directory)", k)
				}
			}
			if st.Exists(ctx, "acme/example") {
				t.Error("Exists(acme/example) = true: a prefix of a name is not a directory")
			}

			info, err := st.Stat(ctx, "acme/example.com/cert.key")
			if err != nil {
				t.Fatal(err)
			}
			if info.Key != "acme/example.com/cert.key" || info.Size != int64(len(binary)) || !info.IsTerminal {
				t.Errorf("Stat of a file = %+v, want its key, size %d and IsTerminal", info, len(binary))
			}
			// File systems keep coarse times; a second either side is what matters to certmagic.
			if info.Modified.Before(before.Add(-time.Second)) || info.Modified.After(after.Add(time.Second)) {
				t.Errorf("Stat's Modified = %s, want between %s and %s", info.Modified, before, after)
			}
			if info, err := st.Stat(ctx, "acme/example.com"); err != nil || info.IsTerminal {
				t.Errorf("Stat of a directory = %+v, %v; want IsTerminal false", info, err)
			}

			list := func(prefix string, recursive bool) []string {
				t.Helper()
				keys, err := st.List(ctx, prefix, recursive)
				if err != nil {
					t.Fatalf("List(%q, %v) = %v", prefix, recursive, err)
				}
				slices.Sort(keys)
				return keys
			}
			for _, c := range []struct {
				prefix    string
				recursive bool
				want      []string
			}{
				{"acme", false, []string{"acme/account.json", "acme/example.com", "acme/other.org"}},
				{"acme", true, []string{"acme/account.json", "acme/example.com", "acme/example.com/cert.crt",
					"acme/example.com/cert.key", "acme/other.org", "acme/other.org/cert.crt"}},
				{"acme/example.com", false, []string{"acme/example.com/cert.crt", "acme/example.com/cert.key"}},
				{"", false, []string{"acme", "misc.json"}},
				{"misc.json", true, nil},
			} {
				if got := list(c.prefix, c.recursive); !slices.Equal(got, c.want) {
					t.Errorf("List(%q, recursive %v) = %q, want %q", c.prefix, c.recursive, got, c.want)
				}
			}

			// Characters SCAN would read as a pattern are names like any other.
			if err := st.Store(ctx, "glob/a*b[1]?/c", []byte("x")); err != nil {
				t.Fatal(err)
			}
			if got := list("glob", true); !slices.Equal(got, []string{"glob/a*b[1]?", "glob/a*b[1]?/c"}) {
				t.Errorf("List(glob) = %q, want the key with pattern characters", got)
			}
			if _, err := st.List(ctx, "gl*", true); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("List(gl*) = %v, want fs.ErrNotExist: a prefix is no pattern", err)
			}
			if err := st.Delete(ctx, "glob"); err != nil || st.Exists(ctx, "glob/a*b[1]?/c") {
				t.Errorf("Delete(glob) = %v, and its key is left: %v", err, st.Exists(ctx, "glob/a*b[1]?/c"))
			}

			if err := st.Delete(ctx, "acme/example.com"); err != nil {
				t.Fatalf("Delete of a directory = %v", err)
			}
			for _, k := range []string{"acme/example.com", "acme/example.com/cert.crt"} {
				if st.Exists(ctx, k) {
					t.Errorf("Exists(%s) after deleting its directory = true", k)
				}
			}
			if got := list("acme", true); !slices.Equal(got, []string{"acme/account.json", "acme/other.org", "acme/other.org/cert.crt"}) {
				t.Errorf("List(acme) after deleting acme/example.com = %q, want the rest kept", got)
			}
			if err := st.Delete(ctx, "misc.json"); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Load(ctx, "misc.json"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("Load after Delete = %v, want fs.ErrNotExist", err)
			}
		})
	}
}

// TestLockConformance: a held lock makes a second Lock wait until its ctx ends, and
// Unlock lets the next one in, in both backends.
func TestLockConformance(t *testing.T) {
	for name, newBackend := range backends(t) {
		t.Run(name, func(t *testing.T) {
			st := newBackend(t)
			if err := st.Lock(context.Background(), "certificates/example.com"); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			err := st.Lock(ctx, "certificates/example.com")
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Lock of a held lock = %v, want its ctx's deadline", err)
			}
			if err := st.Unlock(context.Background(), "certificates/example.com"); err != nil {
				t.Fatal(err)
			}
			ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := st.Lock(ctx, "certificates/example.com"); err != nil {
				t.Fatalf("Lock after Unlock = %v", err)
			}
			if err := st.Unlock(ctx, "certificates/example.com"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// List gathers at most maxListKeys keys and fails beyond, rather than grow without bound.
func TestListIsBounded(t *testing.T) {
	st := newStorage(t, testenv.Redis(t))
	ctx := context.Background()
	for i := range 20 {
		if err := st.Store(ctx, fmt.Sprintf("many/%02d", i), []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	defer func(n int) { maxListKeys = n }(maxListKeys)
	maxListKeys = 10
	if keys, err := st.List(ctx, "many", false); err == nil || !strings.Contains(err.Error(), "more than 10 keys") {
		t.Errorf("List of 20 keys with a bound of 10 = %d keys, %v; want an error naming the bound", len(keys), err)
	}
	maxListKeys = 20
	if keys, err := st.List(ctx, "many", false); err != nil || len(keys) != 20 {
		t.Errorf("List of 20 keys with a bound of 20 = %d keys, %v", len(keys), err)
	}
}
