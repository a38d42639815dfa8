package storage

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/certmagic"
)

func TestKeyJoinsUnderNamespace(t *testing.T) {
	tests := []struct {
		name  string
		parts []string
		want  string
	}{
		{"no parts is the namespace", nil, "mcp_oauth"},
		{"one part", []string{"codes"}, "mcp_oauth/codes"},
		{"hash segment", []string{"codes", Hash("abc")}, "mcp_oauth/codes/" + Hash("abc")},
		{"dots inside a segment are fine", []string{"janitor", "last_run.v1"}, "mcp_oauth/janitor/last_run.v1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Key(tt.parts...); got != tt.want {
				t.Errorf("Key(%q) = %q, want %q", tt.parts, got, tt.want)
			}
		})
	}
}

func TestKeyPanicsOnUnsafePart(t *testing.T) {
	tests := []struct {
		name string
		part string
	}{
		{"parent traversal", "../../x"},
		{"dot dot", ".."},
		{"dot", "."},
		{"empty", ""},
		{"slash", "a/b"},
		{"backslash", `a\b`},
		{"space", "a b"},
		{"non-ascii", "ü"},
		{"nul", "a\x00b"},
		{"too long", strings.Repeat("a", 256)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			defer func() {
				r := recover()
				if r == nil {
					t.Fatalf("Key(%q) did not panic", tt.part)
				}
				if len(tt.part) > 2 && strings.Contains(r.(string), tt.part) {
					t.Errorf("panic message repeats the unsafe part: %v", r)
				}
			}()
			Key("clients", tt.part)
		})
	}
}

func TestHashIsAFixedLengthSafeSegment(t *testing.T) {
	for _, in := range []string{"", "../../x", "client id with spaces", strings.Repeat("x", 10000), "ü/\\.."} {
		h := Hash(in)
		if len(h) != 43 {
			t.Errorf("Hash(%.20q) has length %d, want 43", in, len(h))
		}
		if !safeSegment(h) {
			t.Errorf("Hash(%.20q) = %q is not a safe segment", in, h)
		}
		if Hash(in) != h {
			t.Errorf("Hash(%.20q) is not deterministic", in)
		}
	}
	if Hash("a") == Hash("b") {
		t.Error("different inputs hash alike")
	}
}

func TestHashedClientTextStaysInsideNamespace(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	r := New(&certmagic.FileStorage{Path: root}, nil)
	key := Key("clients", Hash("../../x"))
	if err := r.Put(context.Background(), key, "v", 60e9); err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(root, "mcp_oauth", "clients", Hash("../../x"))
	if _, err := os.Stat(want); err != nil {
		t.Fatalf("record not at %s: %v", want, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "root" {
		t.Errorf("something was written outside the storage root: %v", entries)
	}
}

func TestRecordsRejectKeysNotBuiltWithKey(t *testing.T) {
	r := New(&certmagic.FileStorage{Path: t.TempDir()}, nil)
	ctx := context.Background()
	for _, key := range []string{"", "mcp_oauth", "codes/x", "mcp_oauth/../x", "mcp_oauth/a//b", "mcp_oauth/a/", "other/x"} {
		if err := r.Put(ctx, key, 1, 60e9); err != errInvalidKey {
			t.Errorf("Put(%q) = %v, want errInvalidKey", key, err)
		}
		var v int
		if err := r.Get(ctx, key, &v); err != errInvalidKey {
			t.Errorf("Get(%q) = %v, want errInvalidKey", key, err)
		}
		if err := r.TakeOnce(ctx, key, &v); err != errInvalidKey {
			t.Errorf("TakeOnce(%q) = %v, want errInvalidKey", key, err)
		}
		if err := r.Delete(ctx, key); err != errInvalidKey {
			t.Errorf("Delete(%q) = %v, want errInvalidKey", key, err)
		}
	}
	if _, err := r.List(ctx, "../"); err != errInvalidKey {
		t.Errorf("List(../) = %v, want errInvalidKey", err)
	}
}

func TestLockNameIsLowercaseAndCaseSensitiveInput(t *testing.T) {
	a, b := lockName("take", "mcp_oauth/codes/Ab"), lockName("take", "mcp_oauth/codes/aB")
	if a == b {
		t.Error("names differing only in case share a lock name")
	}
	if a != strings.ToLower(a) || a != certmagic.StorageKeys.Safe(a) {
		t.Errorf("lock name %q would be rewritten by FileStorage", a)
	}
	if lockName("take", "x") == lockName("lock", "x") {
		t.Error("TakeOnce and Lock share a lock name")
	}
}
