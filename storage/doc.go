// Package storage keeps typed, expiring records in any certmagic.Storage.
//
// It knows records, TTLs, encryption and locks, never OAuth. Every record
// lives under the "mcp_oauth/" namespace, is stored as JSON inside an
// envelope that carries its expiry (certmagic storage has no TTL of its own),
// and reads as ErrNotFound once expired. A Janitor removes expired records in
// the background, one node of a cluster at a time.
//
// certmagic.FileStorage does not sanitise keys, so keys are built only with
// Key, and client-supplied text goes through Hash before it becomes part of a
// key.
//
// Single use (TakeOnce) and Lock rely on the storage's cluster-wide lock, with
// an in-process lock in front so that contenders inside one process do not
// poll the storage lock. A backend that implements Native gets native TTLs and
// an atomic get-and-delete instead; Caddy's file_system folder gets a take by
// rename (FastPath).
package storage
