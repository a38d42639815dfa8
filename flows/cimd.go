package flows

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/go-jose/go-jose/v4"
	"golang.org/x/sync/singleflight"

	"github.com/caddy-mcp/oauth-broker/safehttp"
)

// Client ID Metadata Documents (MCP 2025-11-25, draft-ietf-oauth-client-id-metadata-document):
// a client_id that is an https URL names a JSON document of client metadata, served by
// the client's owner. The broker fetches it as an untrusted party would: https only, a
// 5 s timeout, 5 KiB at most (the draft's recommended maximum, §"Maximum Response Size"),
// no redirects, and no connection to a loopback, private, link-local or otherwise
// non-public address unless Config.CIMDAllowPrivate (the client of package safehttp, which
// checks the address actually dialled). The key set at a document's jwks_uri is fetched
// the same way (client_assertion.go).

const (
	cimdTimeout        = 5 * time.Second
	maxDocumentBytes   = 5 << 10
	minDocumentCache   = time.Minute
	maxDocumentCache   = 24 * time.Hour
	maxCachedDocuments = 1000
	// maxDocumentFetches bounds concurrent fetches: anyone may name any URL as client_id.
	maxDocumentFetches = 16
	// documentFailureTTL is how long a failed fetch is remembered, so that naming an
	// unreachable or invalid document again costs no new fetch (SECURITY.md: strangers can
	// make the broker call out); maxCachedFailures bounds that memory.
	documentFailureTTL = 30 * time.Second
	maxCachedFailures  = 1000
)

// errDocumentFetchesBusy means maxDocumentFetches were under way for the whole timeout.
var errDocumentFetchesBusy = errors.New("too many document fetches under way")

// metadataDocuments caches the clients of fetched documents and fetches each URL once
// at a time.
type metadataDocuments struct {
	mu      sync.Mutex
	entries expiringMap[*Client]
	// keySets are the key sets fetched from documents' jwks_uri, by URL.
	keySets expiringMap[fetchedKeySet]
	// failures are the recently failed fetches, by URL.
	failures expiringMap[error]
	flight   singleflight.Group
	fetches  chan struct{} // semaphore of maxDocumentFetches

	clientOnce sync.Once
	client     *http.Client
	// rootCAs, when set before the first fetch, replaces the system roots (tests).
	rootCAs *x509.CertPool
}

// expiringMap holds values by id (a URL, a client id), each until its own expiry, at most max of them: full,
// it drops what has expired, else the entry closest to expiry. Its owner locks it.
type expiringMap[V any] struct {
	max     int
	entries map[string]expiring[V]
}

type expiring[V any] struct {
	value   V
	expires time.Time
}

func newExpiringMap[V any](max int) expiringMap[V] {
	return expiringMap[V]{max: max, entries: make(map[string]expiring[V])}
}

// get returns the value of id if it is still good at now, forgetting it if not.
func (m expiringMap[V]) get(id string, now time.Time) (V, bool) {
	e, ok := m.entries[id]
	if !ok {
		return e.value, false
	}
	if !now.Before(e.expires) {
		delete(m.entries, id)
		var zero V
		return zero, false
	}
	return e.value, true
}

func (m expiringMap[V]) put(id string, v V, expires, now time.Time) {
	if _, ok := m.entries[id]; !ok && len(m.entries) >= m.max {
		var soonest string
		for k, e := range m.entries {
			if !now.Before(e.expires) {
				delete(m.entries, k)
			} else if soonest == "" || e.expires.Before(m.entries[soonest].expires) {
				soonest = k
			}
		}
		if len(m.entries) >= m.max {
			delete(m.entries, soonest)
		}
	}
	m.entries[id] = expiring[V]{value: v, expires: expires}
}

// forget drops the value of id.
func (m expiringMap[V]) forget(id string) { delete(m.entries, id) }

// len is how many values it holds, expired ones not yet dropped included.
func (m expiringMap[V]) len() int { return len(m.entries) }

func newMetadataDocuments(maxEntries int) *metadataDocuments {
	return &metadataDocuments{
		entries:  newExpiringMap[*Client](maxEntries),
		keySets:  newExpiringMap[fetchedKeySet](maxEntries),
		failures: newExpiringMap[error](maxCachedFailures),
		fetches:  make(chan struct{}, maxDocumentFetches),
	}
}

func (d *metadataDocuments) get(id string, now time.Time) *Client {
	d.mu.Lock()
	defer d.mu.Unlock()
	c, _ := d.entries.get(id, now)
	return c
}

func (d *metadataDocuments) put(id string, c *Client, expires, now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.entries.put(id, c, expires, now)
}

// fetchedKeySet is a key set from a jwks_uri and when it was fetched.
type fetchedKeySet struct {
	set     *jose.JSONWebKeySet
	fetched time.Time
}

func (d *metadataDocuments) keySet(uri string, now time.Time) fetchedKeySet {
	d.mu.Lock()
	defer d.mu.Unlock()
	ks, _ := d.keySets.get(uri, now)
	return ks
}

func (d *metadataDocuments) putKeySet(uri string, ks fetchedKeySet, expires time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.keySets.put(uri, ks, expires, ks.fetched)
}

// dropKeySet forgets the set of uri if it is still the one fetched at fetched.
func (d *metadataDocuments) dropKeySet(uri string, fetched time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e, ok := d.keySets.entries[uri]; ok && e.value.fetched.Equal(fetched) {
		delete(d.keySets.entries, uri)
	}
}

// failed returns the error of a fetch of id that failed less than documentFailureTTL ago.
func (d *metadataDocuments) failed(id string, now time.Time) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	err, _ := d.failures.get(id, now)
	return err
}

// fail remembers a failed fetch of id for documentFailureTTL.
func (d *metadataDocuments) fail(id string, err error, now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.failures.put(id, err, now.Add(documentFailureTTL), now)
}

func (d *metadataDocuments) httpClient(allowPrivate bool) *http.Client {
	d.clientOnce.Do(func() {
		d.client = safehttp.NewClient(safehttp.Options{Timeout: cimdTimeout, AllowPrivate: allowPrivate, RootCAs: d.rootCAs})
	})
	return d.client
}

// clientIDDocument is the metadata the broker reads from a document.
type clientIDDocument struct {
	ClientID                string          `json:"client_id"`
	ClientName              string          `json:"client_name"`
	RedirectURIs            []string        `json:"redirect_uris"`
	GrantTypes              []string        `json:"grant_types"`
	ResponseTypes           []string        `json:"response_types"`
	TokenEndpointAuthMethod string          `json:"token_endpoint_auth_method"`
	Scope                   string          `json:"scope"`
	ClientSecret            string          `json:"client_secret"`
	ApplicationType         string          `json:"application_type"`
	JWKS                    json.RawMessage `json:"jwks"`
	JWKSURI                 string          `json:"jwks_uri"`
}

// metadataDocumentClient finds the client whose client_id is the URL id, from the cache
// or by fetching its document. Every refusal wraps ErrUnknownClient.
func (b *Broker) metadataDocumentClient(ctx context.Context, id string) (*Client, error) {
	if err := checkClientIDURL(id); err != nil {
		return nil, documentRefused(err)
	}
	docs := b.clients.documents
	if c := docs.get(id, b.now()); c != nil {
		return c, nil
	}
	if err := docs.failed(id, b.now()); err != nil {
		return nil, documentRefused(err)
	}
	v, err, _ := docs.flight.Do(id, func() (any, error) {
		// A flight that ended between the lookup above and this one has filled the cache.
		if c := docs.get(id, b.now()); c != nil {
			return c, nil
		}
		if err := docs.failed(id, b.now()); err != nil {
			return nil, err
		}
		c, ttl, err := b.fetchMetadataDocument(ctx, id)
		if err != nil {
			b.count(MetadataDocumentRefused)
			if !errors.Is(err, errDocumentFetchesBusy) { // the broker's state, not the document's
				docs.fail(id, err, b.now())
			}
			return nil, err
		}
		b.count(MetadataDocumentFetched)
		if ttl > 0 {
			now := b.now()
			docs.put(id, c, now.Add(ttl), now)
		}
		return c, nil
	})
	if err != nil {
		return nil, documentRefused(err)
	}
	return v.(*Client), nil
}

func documentRefused(err error) error {
	return fmt.Errorf("client metadata document: %w: %w", ErrUnknownClient, err)
}

// checkClientIDURL applies the draft's rules to a client_id URL: https, a host, a path,
// no dot segments, no userinfo, no fragment.
func checkClientIDURL(id string) error {
	u, err := url.Parse(id)
	switch {
	case err != nil:
		return errors.New("client_id is not a URL")
	case u.Scheme != "https" || u.Host == "" || u.Opaque != "":
		return errors.New("client_id URL must be https with a host")
	case u.User != nil:
		return errors.New("client_id URL must not contain userinfo")
	case u.Fragment != "" || strings.Contains(id, "#"):
		return errors.New("client_id URL must not contain a fragment")
	case u.Path == "" || u.Path == "/":
		return errors.New("client_id URL must have a path")
	}
	// The decoded path as well: %2e is a dot (RFC 3986 §2.3), and servers normalize it.
	for _, seg := range append(strings.Split(u.EscapedPath(), "/"), strings.Split(u.Path, "/")...) {
		if seg == "." || seg == ".." {
			return errors.New("client_id URL must not contain dot segments")
		}
	}
	return nil
}

// fetchClientURL fetches a URL a client names (its metadata document, its jwks_uri) with
// the documents' client, within cimdTimeout and one of the bounded fetch slots, reading at
// most limit bytes.
func (b *Broker) fetchClientURL(ctx context.Context, uri string, limit int) ([]byte, http.Header, error) {
	// Shared by every waiter of the flight: the first caller's cancellation must not
	// fail the others, and the timeout bounds it anyway.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cimdTimeout)
	defer cancel()
	select {
	case b.clients.documents.fetches <- struct{}{}:
		defer func() { <-b.clients.documents.fetches }()
	case <-ctx.Done():
		return nil, nil, errDocumentFetchesBusy
	}
	return b.fetchBounded(ctx, uri, limit)
}

// fetchMetadataDocument fetches and checks the document at id. It returns the client
// and how long it may be cached (0: not at all).
func (b *Broker) fetchMetadataDocument(ctx context.Context, id string) (*Client, time.Duration, error) {
	body, header, err := b.fetchClientURL(ctx, id, maxDocumentBytes)
	if err != nil {
		return nil, 0, err
	}
	var doc clientIDDocument
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, 0, errors.New("document is not a JSON object of client metadata")
	}
	c, err := b.clientFromDocument(id, &doc)
	if err != nil {
		return nil, 0, err
	}
	return c, documentCacheTTL(header), nil
}

// fetchBounded GETs the JSON at u with the documents' client (public addresses only, no
// redirects), answering 200 with at most limit bytes. The caller holds a fetch slot.
func (b *Broker) fetchBounded(ctx context.Context, u string, limit int) ([]byte, http.Header, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("building request: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := b.clients.documents.httpClient(b.cfg.CIMDAllowPrivate).Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("fetching: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("fetching: status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, int64(limit)+1))
	if err != nil {
		return nil, nil, fmt.Errorf("reading: %w", err)
	}
	if len(body) > limit {
		return nil, nil, fmt.Errorf("response is larger than %d bytes", limit)
	}
	return body, resp.Header, nil
}

// clientFromDocument checks a document fetched from id. The document is written for
// every authorization server its client talks to, so metadata the broker does not use
// (other grant types, scopes it does not offer) is dropped rather than refused.
func (b *Broker) clientFromDocument(id string, doc *clientIDDocument) (*Client, error) {
	switch {
	case doc.ClientID != id:
		return nil, errors.New("document client_id differs from its URL")
	case doc.ClientSecret != "":
		return nil, errors.New("document carries a client_secret")
	case doc.TokenEndpointAuthMethod != "" && doc.TokenEndpointAuthMethod != AuthMethodNone &&
		doc.TokenEndpointAuthMethod != AuthMethodPrivateKeyJWT:
		// No shared secret exists for a document client (the draft's §"Client
		// Authentication"): public, or keys it publishes.
		return nil, errors.New("document token_endpoint_auth_method is neither none nor private_key_jwt")
	case len(doc.RedirectURIs) == 0:
		return nil, errors.New("document has no redirect_uris")
	case len(doc.RedirectURIs) > maxRedirectURIs:
		return nil, errors.New("document has too many redirect_uris")
	case utf8.RuneCountInString(doc.ClientName) > maxClientNameRunes:
		return nil, errors.New("document client_name is too long")
	case CheckClientName(doc.ClientName) != nil:
		return nil, fmt.Errorf("document: %w", errClientNameCharacters)
	}
	appType := knownApplicationType(doc.ApplicationType)
	for _, u := range doc.RedirectURIs {
		if len(u) > maxRedirectURILen {
			return nil, errors.New("document redirect_uri is too long")
		}
		if err := checkRedirectURIFor(appType, u); err != nil {
			return nil, fmt.Errorf("document redirect_uris: %w", err)
		}
	}
	method, keys, jwksURI, err := documentAuthentication(doc)
	if err != nil {
		return nil, err
	}
	if len(doc.ResponseTypes) > 0 && !slices.Contains(doc.ResponseTypes, "code") {
		return nil, errors.New("document response_types lack code")
	}
	grants := defaultGrantTypes
	if len(doc.GrantTypes) > 0 {
		grants = nil
		for _, g := range defaultGrantTypes {
			if slices.Contains(doc.GrantTypes, g) {
				grants = append(grants, g)
			}
		}
		if !slices.Contains(grants, grantAuthorizationCode) {
			return nil, errors.New("document grant_types lack authorization_code")
		}
	}
	if len(b.enterprise) > 0 && method == AuthMethodPrivateKeyJWT && slices.Contains(doc.GrantTypes, grantJWTBearer) {
		// The JWT bearer grant for ID-JAGs, for a client that can authenticate
		// (token_jwt_bearer.go).
		grants = append(slices.Clone(grants), grantJWTBearer)
	}
	scopes, offered := b.clients.defaultScopes, doc.Scope == ""
	if !offered {
		scopes = nil
		offer := b.offer().scopes
		for _, s := range strings.Fields(doc.Scope) {
			if slices.Contains(offer, s) {
				scopes = append(scopes, s)
			}
		}
	}
	name := doc.ClientName
	if name == "" {
		name = id
	}
	return &Client{
		ID:              id,
		Name:            name,
		RedirectURIs:    doc.RedirectURIs,
		Scopes:          scopes,
		offered:         offered,
		AuthMethod:      method,
		GrantTypes:      grants,
		Source:          ClientSourceMetadataDocument,
		ApplicationType: appType,
		keys:            keys,
		jwksURI:         jwksURI,
	}, nil
}

// documentAuthentication reads how a document's client authenticates: none, or
// private_key_jwt with its keys inline (jwks) or at an https jwks_uri, exactly one of the
// two (RFC 7591 §2). Inline keys are parsed now; a jwks_uri is fetched when the client
// first authenticates.
func documentAuthentication(doc *clientIDDocument) (method string, keys *jose.JSONWebKeySet, jwksURI string, err error) {
	hasKeys := len(doc.JWKS) > 0 && string(doc.JWKS) != "null"
	if doc.TokenEndpointAuthMethod != AuthMethodPrivateKeyJWT {
		return AuthMethodNone, nil, "", nil
	}
	switch {
	case hasKeys && doc.JWKSURI != "":
		return "", nil, "", errors.New("document has both jwks and jwks_uri")
	case hasKeys:
		keys, err := parseClientKeySet(doc.JWKS)
		if err != nil {
			return "", nil, "", fmt.Errorf("document jwks: %w", err)
		}
		return AuthMethodPrivateKeyJWT, keys, "", nil
	case doc.JWKSURI != "":
		if err := checkJWKSURI(doc.JWKSURI); err != nil {
			return "", nil, "", err
		}
		return AuthMethodPrivateKeyJWT, nil, doc.JWKSURI, nil
	}
	return "", nil, "", errors.New("document uses private_key_jwt without jwks or jwks_uri")
}

// documentCacheTTL reads Cache-Control: no-store and no-cache mean not cached; max-age
// is clamped to [1 min, 24 h], so a client cannot make the broker fetch on every
// request nor pin a stale document; no max-age means the minimum.
func documentCacheTTL(h http.Header) time.Duration {
	ttl := minDocumentCache
	for _, v := range h.Values("Cache-Control") {
		for _, d := range strings.Split(v, ",") {
			name, val, _ := strings.Cut(strings.TrimSpace(d), "=")
			switch strings.ToLower(name) {
			case "no-store", "no-cache":
				return 0
			case "max-age":
				if n, err := strconv.ParseInt(strings.Trim(val, `"`), 10, 64); err == nil && n >= 0 {
					ttl = time.Duration(min(n, int64(maxDocumentCache/time.Second))) * time.Second
				}
			}
		}
	}
	return min(max(ttl, minDocumentCache), maxDocumentCache)
}
