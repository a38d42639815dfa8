package flows

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// AdminScanLimit bounds how many records one admin listing reads (storage.Records.Scan):
// certmagic storage has no index, so a listing is a pass over every record of its kind
// (for the key ring's usage, over every record). A listing that stops there says so
// (Truncated); what it lists is then a part.
const AdminScanLimit = 50_000

// adminStore is the admin API's view of the records: bounded scans by kind, for
// operators. Nothing here is on a request's path.
type adminStore struct {
	records *storage.Records
	limit   int
}

// admin is the admin store over the broker's records.
func (b *Broker) admin() adminStore {
	return adminStore{records: b.cfg.Records, limit: b.adminScanLimit}
}

// scan decodes each live record of kind into a T and hands it to fn with its key and
// expiry. It reports whether the scan stopped at the limit.
func scanKind[T any](ctx context.Context, st adminStore, kind string, fn func(key string, expiresAt time.Time, v *T)) (truncated bool, err error) {
	return scanPrefix(ctx, st, storage.Key(kind), fn)
}

// scanPrefix is scanKind over the records under prefix.
func scanPrefix[T any](ctx context.Context, st adminStore, prefix string, fn func(key string, expiresAt time.Time, v *T)) (truncated bool, err error) {
	err = st.records.Scan(ctx, prefix, st.limit, func(key string, expiresAt time.Time, value json.RawMessage) error {
		var v T
		if json.Unmarshal(value, &v) != nil {
			return nil // not a record of this shape: skipped
		}
		fn(key, expiresAt, &v)
		return nil
	})
	if errors.Is(err, storage.ErrScanLimit) {
		return true, nil
	}
	return false, err
}

// listedSession is a session as the admin API lists it, with its record's expiry.
type listedSession struct {
	Session
	ExpiresAt time.Time
}

// sessionsOf lists subject's sessions created on site, and those of earlier releases,
// which do not say their site.
func (st adminStore) sessionsOf(ctx context.Context, subject, site string) ([]listedSession, bool, error) {
	var out []listedSession
	truncated, err := scanKind(ctx, st, kindSession, func(key string, expiresAt time.Time, s *Session) {
		if s.Subject == subject && (s.Site == site || s.Site == "") && key == sessionKey(s.ID) {
			out = append(out, listedSession{Session: *s, ExpiresAt: expiresAt})
		}
	})
	return out, truncated, err
}

// familiesOf lists the ids of the live token families started by each of sessions, by
// session id.
func (st adminStore) familiesOf(ctx context.Context, sessions map[string]bool) (map[string][]string, bool, error) {
	out := map[string][]string{}
	truncated, err := scanKind(ctx, st, kindFamily, func(_ string, _ time.Time, f *TokenFamily) {
		if sessions[f.SessionID] && f.ID != "" && !f.Revoked {
			out[f.SessionID] = append(out[f.SessionID], f.ID)
		}
	})
	return out, truncated, err
}

// listedClient is a registered client as the admin API lists it, with its record's expiry.
type listedClient struct {
	RegisteredClient
	ExpiresAt time.Time
}

// clients lists the registered clients.
func (st adminStore) clients(ctx context.Context) ([]listedClient, bool, error) {
	var out []listedClient
	truncated, err := scanKind(ctx, st, kindClient, func(_ string, expiresAt time.Time, c *RegisteredClient) {
		if c.ClientID != "" {
			out = append(out, listedClient{RegisteredClient: *c, ExpiresAt: expiresAt})
		}
	})
	return out, truncated, err
}

// deleteClient forgets the registration of id; a missing one is not an error.
func (st clientStore) delete(ctx context.Context, id string) error {
	return st.records.Delete(ctx, recordKey(kindClient, id))
}

// keyUsage counts, by the id of the key that sealed it, the sealed values (the fields
// whose JSON name ends in `_sealed`) among all the broker's records.
func (st adminStore) keyUsage(ctx context.Context) (ring []string, sealed map[string]int, truncated bool, err error) {
	sealed = map[string]int{}
	err = st.records.Scan(ctx, storage.Key(), st.limit, func(_ string, _ time.Time, value json.RawMessage) error {
		var fields map[string]json.RawMessage
		if json.Unmarshal(value, &fields) != nil {
			return nil
		}
		for name, raw := range fields {
			var v string
			if !strings.HasSuffix(name, "_sealed") || json.Unmarshal(raw, &v) != nil {
				continue
			}
			if id, ok := storage.SealedKeyID(v); ok {
				sealed[id]++
			}
		}
		return nil
	})
	if errors.Is(err, storage.ErrScanLimit) {
		truncated, err = true, nil
	}
	return st.records.KeyIDs(), sealed, truncated, err
}

// RecordCount is how many live sessions and offline access grants a site has in storage,
// for the operator's gauges. Truncated: a scan stopped at AdminScanLimit, so a count is a
// lower bound.
type RecordCount struct {
	Sessions            int
	OfflineAccessGrants int
	Truncated           bool
}

// CountRecords counts this site's live sessions and offline access grants: one bounded
// scan of each kind (at most AdminScanLimit records), for the metrics' gauges; never on a
// request's path. Sessions of earlier releases, which do not say their site, and offline
// access grants of releases that kept them for every site count for every site sharing
// the storage, as the admin API lists them.
func (b *Broker) CountRecords(ctx context.Context) (RecordCount, error) {
	return b.admin().count(ctx, b.site)
}

func (st adminStore) count(ctx context.Context, site string) (RecordCount, error) {
	var n RecordCount
	truncated, err := scanKind(ctx, st, kindSession, func(key string, _ time.Time, s *Session) {
		if (s.Site == site || s.Site == "") && key == sessionKey(s.ID) {
			n.Sessions++
		}
	})
	if err != nil {
		return RecordCount{}, err
	}
	n.Truncated = truncated
	countGrants := func(_ string, _ time.Time, g *OfflineAccessGrant) {
		if g.Subject != "" {
			n.OfflineAccessGrants++
		}
	}
	for _, prefix := range []string{storage.Key(kindOfflineAccessGrant, site), storage.Key(kindLegacyOfflineAccessGrant)} {
		truncated, err = scanPrefix(ctx, st, prefix, countGrants)
		if err != nil {
			return RecordCount{}, err
		}
		n.Truncated = n.Truncated || truncated
	}
	return n, nil
}
