// Package flows is the broker: the OAuth 2.1 and OIDC endpoints and grants of mcp_oauth on
// plain net/http, knowing nothing of Caddy. [New] builds a [Broker] from a [Config];
// [Broker.Handle] answers the broker's own endpoints and admits every other request to the
// MCP endpoint (resource.go), delegating a token for the upstream (delegation*.go). Each
// endpoint or grant is one file named for it — authorize_*.go, consent.go, idp_login.go,
// token.go with token_code.go and token_refresh.go, revoke.go, register.go and cimd.go for
// clients, offline_access*.go and background_token.go for offline access — and returns a
// typed error that errors.go writes once. Records live in storage through the typed stores
// of store*.go only. Token verification against the IdP is package idp, JSON-RPC request
// inspection package mcprequest, the client for stranger-named URLs package safehttp.
// ARCHITECTURE.md draws the whole.
package flows
