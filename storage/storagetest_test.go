package storage_test

import (
	"testing"

	"github.com/caddy-mcp/oauth-broker/storage/storagetest"
	"github.com/caddyserver/certmagic"
)

// TestRecordsOnFileSystem runs the records suite redisstorage also runs over Redis, here
// over file_system: two FileStorage values on one directory are two instances.
func TestRecordsOnFileSystem(t *testing.T) {
	storagetest.Records(t, func(t *testing.T) func() certmagic.Storage {
		dir := t.TempDir()
		return func() certmagic.Storage { return &certmagic.FileStorage{Path: dir} }
	})
}
