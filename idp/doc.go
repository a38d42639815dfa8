// Package idp is the broker's view of the upstream identity provider as a resource server
// sees it: where the IdP is and what it accepts, and whether an access token it issued is
// good. A [Provider] fetches the OIDC discovery document ([Discovery]) lazily, apart from
// any request, and keeps serving the last good one while it refreshes (provider.go). A
// [Verifier], configured by [VerifierConfig], checks the bearer tokens presented to the
// protected resource: JWTs against the IdP's keys (jwks.go, fetched at most once per
// [JWKSRefetchInterval] for an unknown key), anything else by RFC 7662 introspection; it
// caches each verdict by the token's hash, so a warm token costs a hash and a map read,
// and verifies a cold one once for all concurrent callers (verifier.go). What strangers
// can make it ask the IdP is bounded per client address and in all (coldbudget.go); past
// that it answers [RetryLaterError], never a refusal. A good token yields a [Principal];
// a bad one an error wrapping [ErrInvalidToken] (401), an unreachable IdP one wrapping
// [ErrUnavailable] (503, nothing cached). The package knows nothing of the broker's
// endpoints; its model is zitadel/oidc's pkg/client/rs.
package idp
