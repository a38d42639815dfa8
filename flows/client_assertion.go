package flows

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// Client authentication by private_key_jwt (RFC 7523 §2.2 and §3, RFC 7521 §4.2): a client
// whose metadata document says token_endpoint_auth_method private_key_jwt proves itself
// with a JWT signed by a key of its document's jwks or jwks_uri. What is accepted
// (SECURITY.md):
//   - signed with RS256, PS256, ES256 or EdDSA; never none, never an HMAC (a public key
//     must not become a shared secret);
//   - iss and sub both the client_id; aud the broker's issuer identifier and nothing else,
//     as draft-ietf-oauth-rfc7523bis requires (the token endpoint URL that RFC 7523 also
//     allowed is what its audience-injection attack abuses);
//   - exp present and at most maxClientAssertionLifetime ahead; nbf and iat not in the
//     future; clockLeeway of skew either way;
//   - a jti, used once: its marker stands until the assertion expires, on every node of
//     the storage (store_assertion_id.go).

// clientAssertionTypeJWTBearer is the client_assertion_type of RFC 7523 §2.2.
const clientAssertionTypeJWTBearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

// Bounds of a client assertion and of the keys that verify it: anyone may publish a
// metadata document, so all of these are a stranger's to choose.
const (
	maxClientAssertionBytes    = 8 << 10
	maxClientAssertionLifetime = 5 * time.Minute
	clockLeeway                = 30 * time.Second
	// maxClientKeys bounds the keys of one set the broker keeps, and so the signature
	// checks one assertion without a kid costs.
	maxClientKeys = 10
	// maxKeySetBytes bounds a jwks_uri response: a few keys with their certificates.
	maxKeySetBytes = 16 << 10
	// maxKeySetCache: keys rotate, so a fetched set is kept at most this long.
	maxKeySetCache = time.Hour
	// keySetRefetchAfter: an assertion no key of a fetched set verifies has the set fetched
	// again (the client may have rotated its keys, the CIMD draft's §"Changes in Client
	// Keys"), once this long after the last fetch at most.
	keySetRefetchAfter = time.Minute
)

// clientAssertionAlgorithms are the signature algorithms a client assertion may use:
// asymmetric only.
var clientAssertionAlgorithms = []jose.SignatureAlgorithm{jose.RS256, jose.PS256, jose.ES256, jose.EdDSA}

// assertionRefusal is a client assertion the broker refuses; its text is the
// error_description the client gets, fixed wording that repeats nothing it sent.
type assertionRefusal string

func (e assertionRefusal) Error() string { return string(e) }

// Is makes every refusal an errClientAuth (401 invalid_client).
func (e assertionRefusal) Is(target error) bool { return target == errClientAuth }

// assertedClient authenticates the client of a request that carries a client assertion:
// formID is the request's client_id (optional, RFC 7521 §4.2). It returns the client, or
// an error as authenticateClient does.
func (b *Broker) assertedClient(ctx context.Context, formID, assertionType, assertion string) (*Client, error) {
	if assertionType != clientAssertionTypeJWTBearer {
		return nil, assertionRefusal("client_assertion_type must be " + clientAssertionTypeJWTBearer)
	}
	if assertion == "" || len(assertion) > maxClientAssertionBytes {
		return nil, assertionRefusal("client_assertion is missing or too large")
	}
	tok, err := jwt.ParseSigned(assertion, clientAssertionAlgorithms)
	if err != nil || len(tok.Headers) != 1 {
		return nil, assertionRefusal("client_assertion is not a JWT signed with RS256, PS256, ES256 or EdDSA")
	}
	// The client is named by client_id, or else by the assertion's sub (RFC 7523 §3); the
	// signature check below holds it to both.
	id := formID
	if id == "" {
		var unverified jwt.Claims
		if err := tok.UnsafeClaimsWithoutVerification(&unverified); err != nil {
			return nil, assertionRefusal("client_assertion claims are not readable")
		}
		id = unverified.Subject
	}
	if id == "" {
		return nil, fmt.Errorf("no client_id: %w", errClientAuth)
	}
	c, err := b.findClient(ctx, id)
	if err != nil {
		return nil, err
	}
	if c.AuthMethod != AuthMethodPrivateKeyJWT {
		return nil, assertionRefusal("this client does not authenticate with private_key_jwt")
	}
	if err := b.verifyClientAssertion(ctx, c, tok); err != nil {
		return nil, err
	}
	return c, nil
}

// verifyClientAssertion checks tok's signature with c's keys, then its claims, then claims
// its jti.
func (b *Broker) verifyClientAssertion(ctx context.Context, c *Client, tok *jwt.JSONWebToken) error {
	keys, err := b.clientKeySet(ctx, c)
	if err != nil {
		return err
	}
	typ, _ := tok.Headers[0].ExtraHeaders[jose.HeaderType].(string)
	switch strings.TrimPrefix(strings.ToLower(typ), "application/") {
	case "", "jwt", "client-authentication+jwt":
	default:
		// An explicitly typed JWT of another kind (an access token, an ID-JAG) is not a
		// client assertion, whoever signed it.
		return assertionRefusal("client_assertion has a typ other than JWT or client-authentication+jwt")
	}
	var claims jwt.Claims
	if !verifiedWithAny(tok, keys.set, &claims) {
		if c.jwksURI == "" || b.now().Sub(keys.fetched) < keySetRefetchAfter {
			return assertionRefusal("client_assertion signature does not verify with the client's keys")
		}
		b.clients.documents.dropKeySet(c.jwksURI, keys.fetched)
		if keys, err = b.clientKeySet(ctx, c); err != nil {
			return err
		}
		if !verifiedWithAny(tok, keys.set, &claims) {
			return assertionRefusal("client_assertion signature does not verify with the client's keys")
		}
	}
	now := b.now()
	switch {
	case claims.Issuer != c.ID || claims.Subject != c.ID:
		return assertionRefusal("client_assertion iss and sub must both be the client_id")
	case len(claims.Audience) != 1 || claims.Audience[0] != b.issuer:
		return assertionRefusal("client_assertion aud must be this server's issuer identifier alone")
	case claims.Expiry == nil:
		return assertionRefusal("client_assertion has no exp")
	case claims.Expiry.Time().After(now.Add(maxClientAssertionLifetime + clockLeeway)):
		return assertionRefusal("client_assertion lives longer than 5 minutes")
	case claims.ID == "":
		return assertionRefusal("client_assertion has no jti")
	}
	switch err := claims.ValidateWithLeeway(jwt.Expected{Time: now}, clockLeeway); {
	case errors.Is(err, jwt.ErrExpired):
		return assertionRefusal("client_assertion has expired")
	case err != nil:
		return assertionRefusal("client_assertion is not valid yet")
	}
	switch err := b.assertionIDs.claim(ctx, c.ID, claims.ID, claims.Expiry.Time().Add(clockLeeway)); {
	case errors.Is(err, errAssertionReplayed):
		return assertionRefusal("client_assertion was already used")
	case errors.Is(err, errAssertionIDInvalid):
		return assertionRefusal("client_assertion jti is too long")
	case err != nil:
		return storageFailed("claiming client assertion id", err)
	}
	return nil
}

// verifiedWithAny verifies tok with the keys of set its header allows (a key with another
// kid, or another alg, is not tried) and decodes its claims into claims; it tells whether
// one key verified it. At most maxClientKeys are tried.
func verifiedWithAny(tok *jwt.JSONWebToken, set *jose.JSONWebKeySet, claims *jwt.Claims) bool {
	h := tok.Headers[0]
	for _, k := range set.Keys {
		if (h.KeyID != "" && k.KeyID != "" && k.KeyID != h.KeyID) || (k.Algorithm != "" && k.Algorithm != h.Algorithm) {
			continue
		}
		if err := tok.Claims(k.Key, claims); err == nil {
			return true
		}
	}
	return false
}

// clientKeySet is the key set c's assertions are verified with: its document's jwks, or
// what its jwks_uri serves (cached), with when that was fetched.
func (b *Broker) clientKeySet(ctx context.Context, c *Client) (fetchedKeySet, error) {
	if c.keys != nil {
		return fetchedKeySet{set: c.keys}, nil
	}
	if c.jwksURI == "" {
		return fetchedKeySet{}, assertionRefusal("this client has no keys")
	}
	docs := b.clients.documents
	key := "jwks " + c.jwksURI // apart from documents in the shared failure cache
	if ks := docs.keySet(c.jwksURI, b.now()); ks.set != nil {
		return ks, nil
	}
	if err := docs.failed(key, b.now()); err != nil {
		return fetchedKeySet{}, keySetRefused(err)
	}
	v, err, _ := docs.flight.Do(key, func() (any, error) {
		if ks := docs.keySet(c.jwksURI, b.now()); ks.set != nil {
			return ks, nil
		}
		set, ttl, err := b.fetchKeySet(ctx, c.jwksURI)
		if err != nil {
			if !errors.Is(err, errDocumentFetchesBusy) {
				docs.fail(key, err, b.now())
			}
			return nil, err
		}
		ks := fetchedKeySet{set: set, fetched: b.now()}
		if ttl > 0 {
			docs.putKeySet(c.jwksURI, ks, ks.fetched.Add(ttl))
		}
		return ks, nil
	})
	if err != nil {
		return fetchedKeySet{}, keySetRefused(err)
	}
	return v.(fetchedKeySet), nil
}

// keySetRefused: the client's keys cannot be had, so it cannot authenticate.
func keySetRefused(err error) error {
	return fmt.Errorf("client jwks_uri: %w: %w", assertionRefusal("the client's jwks_uri could not be fetched or is not a usable key set"), err)
}

// fetchKeySet fetches and parses the key set at uri, with how long it may be cached.
func (b *Broker) fetchKeySet(ctx context.Context, uri string) (*jose.JSONWebKeySet, time.Duration, error) {
	body, header, err := b.fetchClientURL(ctx, uri, maxKeySetBytes)
	if err != nil {
		return nil, 0, err
	}
	set, err := parseClientKeySet(body)
	if err != nil {
		return nil, 0, err
	}
	return set, min(documentCacheTTL(header), maxKeySetCache), nil
}

// parseClientKeySet reads a JWK Set (RFC 7517 §5) of a client's signing keys. It keeps the
// public asymmetric keys meant for signatures, at most maxClientKeys, and skips keys it
// cannot use (another kty, use enc) rather than refusing the set; a set with none left,
// or holding private key material, is refused.
func parseClientKeySet(raw []byte) (*jose.JSONWebKeySet, error) {
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(raw, &set); err != nil {
		return nil, errors.New("not a JWK Set")
	}
	out := &jose.JSONWebKeySet{}
	for _, rk := range set.Keys {
		var k jose.JSONWebKey
		if err := k.UnmarshalJSON(rk); err != nil || !k.Valid() || (k.Use != "" && k.Use != "sig") {
			continue
		}
		if !k.IsPublic() {
			// Symmetric keys are never public; private ones are a leak the client should fix.
			return nil, errors.New("the key set holds a private or symmetric key")
		}
		if len(out.Keys) == maxClientKeys {
			return nil, fmt.Errorf("the key set has more than %d usable keys", maxClientKeys)
		}
		out.Keys = append(out.Keys, k)
	}
	if len(out.Keys) == 0 {
		return nil, errors.New("the key set has no usable signing key")
	}
	return out, nil
}

// checkJWKSURI applies to a jwks_uri the rules of a client_id URL that matter for a fetch:
// https with a host, no userinfo, no fragment.
func checkJWKSURI(raw string) error {
	u, err := url.Parse(raw)
	switch {
	case len(raw) > maxClientIDLen || err != nil:
		return errors.New("document jwks_uri is not a URL")
	case u.Scheme != "https" || u.Host == "" || u.Opaque != "":
		return errors.New("document jwks_uri must be https with a host")
	case u.User != nil || u.Fragment != "" || strings.Contains(raw, "#"):
		return errors.New("document jwks_uri must not contain userinfo or a fragment")
	}
	return nil
}
