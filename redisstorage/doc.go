// Package redisstorage is a Caddy storage module, caddy.storage.mcp_oauth_redis, that keeps
// certmagic's keys in Redis, so that several Caddy instances share certificates, locks and
// mcp_oauth's records. It is usable as Caddy's global `storage` and as mcp_oauth's own.
//
// # Key layout
//
// With key_prefix P (default "caddy"):
//
//   - P/<key> is a hash per certmagic key, with the fields "value" (the bytes stored) and
//     "modified" (Unix time in nanoseconds of the last write, for Stat; the size is the
//     value's length). A record written through [Storage.StoreTTL] also carries a server-side
//     expiry (PEXPIRE); a plain Store clears any expiry.
//   - P:lock:<name> is a string per held lock whose value is the holder's random token; it
//     expires after the lease (10s) unless its holder renews it, which it does every third
//     of the lease while it holds it.
//
// Keys are paths as in certmagic's file_system: "a/b" is a file, "a" a directory while
// some key lies under it. Nothing stores directories: List, Exists and Stat of a directory
// and Delete of a directory find the keys under it with SCAN (bounded, never KEYS), which
// walks the whole database: give the module a database of its own.
//
// # Redis it needs
//
// Redis must not evict (maxmemory-policy noeviction) and should persist (RDB or AOF): it
// holds certificates, their keys and every session, grant and refresh token; an evicted or
// lost key is a lost certificate or a user logged out. The module checks the server once,
// on its first use (never in Provision, which also runs for `caddy validate`), and logs a
// warning when it evicts or does not persist.
//
// A single server (standalone, optionally with replicas) or a Sentinel-managed master are
// supported. Redis Cluster is refused at config load: List must see every key under a
// prefix, which one SCAN on a cluster does not.
package redisstorage
