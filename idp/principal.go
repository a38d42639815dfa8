package idp

import (
	"strings"
	"time"
)

// Principal is who an accepted access token speaks for.
type Principal struct {
	// Subject is the user at the IdP (`sub`).
	Subject string
	// ClientID is the MCP client the token was issued to, when known (`client_id`/`azp`).
	ClientID string
	// Scopes are the scopes the token grants.
	Scopes []string
	// Audience is the token's `aud`.
	Audience []string
	// Expiry is when the token stops being valid.
	Expiry time.Time
	// SessionID names the broker session behind a broker-issued token (hybrid mode).
	SessionID string
}

// ScopeString is the space-separated scope list, as OAuth writes it.
func (p *Principal) ScopeString() string { return strings.Join(p.Scopes, " ") }

// HasScopes tells whether every scope in need is granted.
func (p *Principal) HasScopes(need []string) bool {
	for _, n := range need {
		found := false
		for _, s := range p.Scopes {
			if s == n {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}
