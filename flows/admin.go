package flows

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// What the admin API (Caddy's admin endpoint, never the public site) reads and ends. Every
// answer names sessions by Fingerprint of their id and holds no token, secret, code or
// sealed value (SECURITY.md W13). Listings are bounded scans (AdminScanLimit).

// AdminSession is one of a user's sessions as the admin API shows it.
type AdminSession struct {
	// ID is the Fingerprint of the session id, which EndSessions takes.
	ID        string    `json:"id"`
	ClientID  string    `json:"client_id"`
	Scopes    []string  `json:"scopes"`
	CreatedAt time.Time `json:"created_at"`
	// ConfirmedAt is when a refresh at the IdP last showed the grant alive; zero until
	// the first.
	ConfirmedAt time.Time `json:"confirmed_at,omitzero"`
	// ExpiresAt is when the session ends unless a refresh renews it.
	ExpiresAt time.Time `json:"expires_at"`
}

// AdminUser is what the broker keeps of one user on this site.
type AdminUser struct {
	Subject       string              `json:"subject"`
	Sessions      []AdminSession      `json:"sessions"`
	OfflineAccess OfflineAccessStatus `json:"offline_access"`
	// Truncated: the scan stopped at AdminScanLimit records; Sessions may miss some.
	Truncated bool `json:"truncated,omitempty"`
}

// Sessions lists subject's sessions on this site, oldest first, and its offline access
// grant. Sessions
// of releases before sessions recorded their site are listed on every site of their
// storage.
func (b *Broker) Sessions(ctx context.Context, subject string) (AdminUser, error) {
	out := AdminUser{Subject: subject, Sessions: []AdminSession{}}
	sessions, truncated, err := b.admin().sessionsOf(ctx, subject, b.site)
	if err != nil {
		return out, fmt.Errorf("listing sessions: %w", err)
	}
	out.Truncated = truncated
	for _, s := range sessions {
		out.Sessions = append(out.Sessions, AdminSession{
			ID: Fingerprint(s.ID), ClientID: s.ClientID, Scopes: s.Scopes,
			CreatedAt: s.CreatedAt, ConfirmedAt: s.ConfirmedAt, ExpiresAt: s.ExpiresAt,
		})
	}
	slices.SortFunc(out.Sessions, func(a, b AdminSession) int { return a.CreatedAt.Compare(b.CreatedAt) })
	if out.OfflineAccess, err = b.OfflineAccess(ctx, subject); err != nil {
		return out, err
	}
	return out, nil
}

// OfflineAccess is subject's offline access grant on this site, if any.
func (b *Broker) OfflineAccess(ctx context.Context, subject string) (OfflineAccessStatus, error) {
	g, err := b.loadOfflineAccessGrant(ctx, subject)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return OfflineAccessStatus{Granted: false}, nil
	case err != nil:
		return OfflineAccessStatus{}, fmt.Errorf("reading offline access grant: %w", err)
	}
	st := OfflineAccessStatus{Granted: true, GrantedAt: &g.GrantedAt, Scopes: g.Scopes, ClientID: g.ClientID, BackgroundClients: g.BackgroundClients}
	if !g.RotatedAt.IsZero() {
		st.RotatedAt = &g.RotatedAt
	}
	return st, nil
}

// EndSessions ends subject's session whose id has the Fingerprint id, or all of subject's
// sessions on this site when id is empty, as a revocation does (revoke.go): their token
// families revoked, their delegated tokens and verified tokens evicted from this node's
// caches, their IdP grants revoked at the IdP and deleted. It returns how many it ended,
// and whether the scan for them stopped at the limit: then some of subject's sessions may
// live on, and the admin must know it.
func (b *Broker) EndSessions(ctx context.Context, subject, id string) (ended int, truncated bool, err error) {
	admin := b.admin()
	sessions, truncated, err := admin.sessionsOf(ctx, subject, b.site)
	if err != nil {
		return 0, false, fmt.Errorf("listing sessions: %w", err)
	}
	ending := map[string]bool{}
	for _, s := range sessions {
		if id == "" || Fingerprint(s.ID) == id {
			ending[s.ID] = true
		}
	}
	if len(ending) == 0 {
		return 0, truncated, nil
	}
	// A family the scan misses dies with its session: a refresh needs the session.
	families, _, err := admin.familiesOf(ctx, ending)
	if err != nil {
		return 0, truncated, fmt.Errorf("listing token families: %w", err)
	}
	for sid := range ending {
		// As revokeGrant: evicted before storage is touched and again once the session
		// is gone.
		b.evictDelegated(sid)
		for _, fid := range families[sid] {
			if err := b.revokeFamily(ctx, fid, sid); err != nil {
				b.log.token.Error("revoking a token family of a session the admin API ended", zap.String("family", Fingerprint(fid)), zap.Error(err))
			}
		}
		// A family the scan missed still loses this node's cached verdicts.
		b.brokerTokens.DeleteFunc(func(vd brokerVerdict) bool {
			return vd.principal != nil && vd.principal.SessionID == sid
		})
		b.endSession(ctx, sid)
		b.evictDelegated(sid)
		b.audit(auditSessionRevoked, "", zap.String("reason", "admin"), zap.String("subject", subject), zap.String("session", Fingerprint(sid)))
	}
	if id == "" {
		b.revokeAppPassword(ctx, subject, "admin", "")
	} else {
		for sid := range ending { // one session ended: the app password stays for the others
			b.releaseAppPassword(ctx, subject, sid, "admin", "")
		}
	}
	return len(ending), truncated, nil
}

// RevokeOfflineAccess deletes subject's offline access grant on this site and revokes its
// refresh token at the IdP; background tokens are refused from then on.
func (b *Broker) RevokeOfflineAccess(ctx context.Context, subject string) (OfflineAccessStatus, error) {
	return b.revokeOfflineAccessGrant(ctx, subject, "")
}

// AdminClient is a dynamically registered client as the admin API shows it; its secret's
// hash is never shown.
type AdminClient struct {
	ClientID     string    `json:"client_id"`
	ClientName   string    `json:"client_name,omitempty"`
	RedirectURIs []string  `json:"redirect_uris"`
	RegisteredAt time.Time `json:"registered_at"`
	// RenewedAt is the last login or refresh that extended the registration.
	RenewedAt time.Time `json:"renewed_at,omitzero"`
	ExpiresAt time.Time `json:"expires_at"`
}

// RegisteredClients lists the clients registered dynamically (RFC 7591) in this site's
// storage, oldest first, which sites sharing a storage share, and whether the scan stopped at
// AdminScanLimit.
func (b *Broker) RegisteredClients(ctx context.Context) ([]AdminClient, bool, error) {
	clients, truncated, err := b.admin().clients(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("listing registered clients: %w", err)
	}
	out := make([]AdminClient, 0, len(clients))
	for _, c := range clients {
		out = append(out, AdminClient{
			ClientID: c.ClientID, ClientName: c.ClientName, RedirectURIs: c.RedirectURIs,
			RegisteredAt: c.IssuedAt, RenewedAt: c.RenewedAt, ExpiresAt: c.ExpiresAt,
		})
	}
	slices.SortFunc(out, func(a, b AdminClient) int { return a.RegisteredAt.Compare(b.RegisteredAt) })
	return out, truncated, nil
}

// DeleteClient deletes the registration of the dynamically registered client id and
// tells whether there was one. The client can no longer start a login or refresh its
// tokens: on this node at once, on other nodes sharing the storage within 30 s (they keep
// a registration they read that long, registrationCacheTTL); tokens it holds stay valid
// until they expire or their sessions are ended.
func (b *Broker) DeleteClient(ctx context.Context, id string) (bool, error) {
	switch _, err := b.registrations.load(ctx, id); {
	case errors.Is(err, storage.ErrNotFound):
		b.ForgetClient(id) // deleted on another node, or expired: not served from here either
		return false, nil
	case err != nil:
		return false, fmt.Errorf("reading registration: %w", err)
	}
	if err := b.registrations.delete(ctx, id); err != nil {
		return false, fmt.Errorf("deleting registration: %w", err)
	}
	b.ForgetClient(id)
	b.log.register.Info("registration deleted through the admin API", zap.String("client_id", id))
	return true, nil
}

// ForgetClient drops what this broker keeps in memory of the registered client id, so that
// a registration deleted through another broker of this process sharing its storage is
// refused here at once too. Other nodes forget it within 30 s (registrationCacheTTL).
func (b *Broker) ForgetClient(id string) {
	b.clients.registered.forget(id)
}

// KeyUse is one key of the ring and how many sealed values in storage it still seals.
type KeyUse struct {
	ID string `json:"id"`
	// Sealing: the ring's first key, which seals everything new.
	Sealing bool `json:"sealing"`
	Sealed  int  `json:"sealed"`
}

// KeyRingUsage is the key ring's keys and what they seal: a key that seals nothing can
// be dropped from the ring. Unknown counts values sealed by keys the ring no longer
// holds, which nothing can open.
type KeyRingUsage struct {
	Keys      []KeyUse `json:"keys"`
	Unknown   int      `json:"sealed_by_unknown_keys"`
	Truncated bool     `json:"truncated,omitempty"`
}

// KeyUsage scans the broker's storage (every site's records on it) for sealed values
// and counts them by key.
func (b *Broker) KeyUsage(ctx context.Context) (KeyRingUsage, error) {
	ring, sealed, truncated, err := b.admin().keyUsage(ctx)
	if err != nil {
		return KeyRingUsage{}, fmt.Errorf("scanning sealed records: %w", err)
	}
	out := KeyRingUsage{Keys: make([]KeyUse, 0, len(ring)), Truncated: truncated}
	for i, id := range ring {
		out.Keys = append(out.Keys, KeyUse{ID: id, Sealing: i == 0, Sealed: sealed[id]})
		delete(sealed, id)
	}
	for _, n := range sealed {
		out.Unknown += n
	}
	return out, nil
}
