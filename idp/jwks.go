package idp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	jose "github.com/go-jose/go-jose/v4"
	"golang.org/x/sync/singleflight"
)

// JWKSRefetchInterval is the least time between two fetches of the IdP's JWKS. go-oidc's
// RemoteKeySet fetches again on every JWT no cached key verifies, which lets a stranger
// make the broker call the IdP once per forged token (SECURITY.md: strangers can make the
// broker call out); a rotated key is still picked up within this interval.
const JWKSRefetchInterval = 30 * time.Second

// maxJWKSBytes bounds the JWKS response read.
const maxJWKSBytes = 256 << 10

// issuerKeys is the IdP's signing keys (an oidc.KeySet), fetched from its jwks_uri on the
// first JWT and again only for a key ID it does not hold, at most once per
// JWKSRefetchInterval and within the cold-verification budget. A JWT whose key ID is
// known but whose signature does not verify is refused without a fetch.
type issuerKeys struct {
	url    string
	client *http.Client
	now    func() time.Time
	// admit draws a fetch on the cold-verification budget of the caller in ctx.
	admit   func(ctx context.Context) error
	timeout time.Duration

	flight singleflight.Group

	mu          sync.RWMutex
	keys        []jose.JSONWebKey
	lastAttempt time.Time
	inflight    bool
}

func newIssuerKeys(url string, client *http.Client, now func() time.Time, admit func(context.Context) error) *issuerKeys {
	return &issuerKeys{url: url, client: client, now: now, admit: admit, timeout: defaultVerifierTimeout}
}

// errSignature is a signature no held key verifies: the token's fault.
var errSignature = errors.New("no signing key of the IdP verifies the signature")

// VerifySignature implements oidc.KeySet. Errors other than errSignature (a fetch that
// failed, was refused by the budget or came too soon) are recorded in the context's
// keyFetchErrorKey slot: go-oidc flattens them into text.
func (k *issuerKeys) VerifySignature(ctx context.Context, jwt string) ([]byte, error) {
	jws, err := jose.ParseSignedCompact(jwt, joseAlgs)
	if err != nil || len(jws.Signatures) != 1 {
		return nil, errors.New("malformed JWS")
	}
	kid := jws.Signatures[0].Header.KeyID
	k.mu.RLock()
	keys, fetched := k.keys, !k.lastAttempt.IsZero()
	k.mu.RUnlock()
	if payload, known := verifyWith(jws, keys, kid); payload != nil {
		return payload, nil
	} else if known && fetched {
		return nil, errSignature
	}
	keys, err = k.refetch(ctx)
	if err != nil {
		if slot, ok := ctx.Value(keyFetchErrorKey{}).(*error); ok {
			*slot = err
		}
		return nil, err
	}
	if payload, _ := verifyWith(jws, keys, kid); payload != nil {
		return payload, nil
	}
	return nil, errSignature
}

// verifyWith tries the keys named kid (every key when kid is empty). known says whether
// some key bears kid.
func verifyWith(jws *jose.JSONWebSignature, keys []jose.JSONWebKey, kid string) (payload []byte, known bool) {
	for i := range keys {
		if kid != "" && keys[i].KeyID != kid {
			continue
		}
		known = kid != ""
		if p, err := jws.Verify(&keys[i]); err == nil {
			return p, known
		}
	}
	return nil, known
}

// refetch fetches the JWKS once for every concurrent caller, unless the last attempt was
// less than JWKSRefetchInterval ago or the caller's budget is spent.
func (k *issuerKeys) refetch(ctx context.Context) ([]jose.JSONWebKey, error) {
	k.mu.Lock()
	if !k.inflight {
		now := k.now()
		if since := now.Sub(k.lastAttempt); !k.lastAttempt.IsZero() && since < JWKSRefetchInterval {
			k.mu.Unlock()
			return nil, &RetryLaterError{Status: http.StatusServiceUnavailable, RetryAfter: JWKSRefetchInterval - since,
				reason: "the IdP's signing keys were fetched moments ago and name no such key"}
		}
		if err := k.admit(ctx); err != nil {
			k.mu.Unlock()
			return nil, err
		}
		k.lastAttempt, k.inflight = now, true
	}
	// Joined under k.mu: the flight clears inflight under it too, so it is still running.
	ch := k.flight.DoChan("jwks", k.fetch)
	k.mu.Unlock()
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.([]jose.JSONWebKey), nil
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: waiting for the IdP's signing keys: %w", ErrUnavailable, ctx.Err())
	}
}

// fetch reads the JWKS, apart from any request, under its own timeout.
func (k *issuerKeys) fetch() (any, error) {
	keys, err := k.download()
	k.mu.Lock()
	defer k.mu.Unlock()
	k.inflight = false
	if err != nil {
		return nil, fmt.Errorf("%w: fetching the IdP's signing keys: %w", ErrUnavailable, err)
	}
	k.keys = keys
	return keys, nil
}

func (k *issuerKeys) download() ([]jose.JSONWebKey, error) {
	ctx, cancel := context.WithTimeout(context.Background(), k.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := k.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("the IdP answered %d", resp.StatusCode)
	}
	if len(body) > maxJWKSBytes {
		return nil, fmt.Errorf("JWKS larger than %d bytes", maxJWKSBytes)
	}
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("decoding JWKS: %w", err)
	}
	var keys []jose.JSONWebKey
	for _, raw := range set.Keys {
		var key jose.JSONWebKey
		// A key of a type go-jose does not know, or meant for encryption, is skipped.
		if json.Unmarshal(raw, &key) != nil || !key.Valid() || !key.IsPublic() || (key.Use != "" && key.Use != "sig") {
			continue
		}
		keys = append(keys, key)
	}
	return keys, nil
}

// joseAlgs are supportedSigningAlgs for go-jose.
var joseAlgs = func() []jose.SignatureAlgorithm {
	algs := make([]jose.SignatureAlgorithm, len(supportedSigningAlgs))
	for i, a := range supportedSigningAlgs {
		algs[i] = jose.SignatureAlgorithm(a)
	}
	return algs
}()

// NewKeySet is the signing keys published at url, for JWTs of another issuer the broker
// trusts (enterprise issuers of ID-JAGs), with the bounds of the IdP's own: the JWKS is
// read bounded, and fetched again for an unknown key ID at most once per
// JWKSRefetchInterval, so that a stream of forged JWTs cannot make the broker call out.
// It implements oidc.KeySet; a verification that could not fetch the keys records why in
// the slot of KeyFetchSlot.
func NewKeySet(url string, client *http.Client, now func() time.Time) oidc.KeySet {
	return newIssuerKeys(url, client, now, func(context.Context) error { return nil })
}

// KeyFetchSlot returns ctx with a slot where a key set of this package records why it
// could not fetch its keys, and the slot: go-oidc flattens that error into text, and an
// issuer that is down must not read as a forged JWT.
func KeyFetchSlot(ctx context.Context) (context.Context, *error) {
	slot := new(error)
	return context.WithValue(ctx, keyFetchErrorKey{}, slot), slot
}
