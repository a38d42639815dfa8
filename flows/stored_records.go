package flows

import (
	"crypto/rand"
	"encoding/base64"
	"time"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// The records the broker keeps in storage, and where. Keys are built with storage.Key;
// everything a client sent (codes, tokens, client ids, states) is hashed first. Secrets
// (IdP tokens, rotated token pairs) are sealed with the record's key as associated data.
// Only the typed stores (store.go) read and write them.

// Storage key prefixes, one per record kind.
const (
	kindClient                   = "clients"                // RegisteredClient, by Hash(client_id)
	kindConsent                  = "consent"                // ConsentTicket, by Hash(ticket)
	kindIdPState                 = "idp_state"              // PendingLogin, by Hash(state sent to the IdP)
	kindSession                  = "sessions"               // Session, by session id
	kindCode                     = "codes"                  // AuthorizationCode, by Hash(code)
	kindUsedCode                 = "used_codes"             // UsedCode, by Hash(code): replay detection
	kindAccessToken              = "access"                 // AccessToken, by Hash(token)
	kindRefreshToken             = "refresh"                // RefreshToken, by Hash(token)
	kindFamily                   = "families"               // TokenFamily, by family id
	kindTokenPair                = "token_pairs"            // TokenPair, by Hash(pair id): the access and refresh token issued together
	kindOfflineAccessGrant       = "offline"                // OfflineAccessGrant, by site, then keyed hash of subject
	kindLegacyOfflineAccessGrant = "provisioning"           // OfflineAccessGrant of earlier releases, by Hash(subject): read, moved
	kindOfflineAccessState       = "flow2_state"            // PendingOfflineAccess, by Hash(state)
	kindOfflineAccessLink        = "flow2_link"             // OfflineAccessLink, by Hash(link token)
	kindOfflineAccessCurrentLink = "offline_access_current" // CurrentOfflineAccessLink, by site, then keyed hash of subject and client
	kindHealthProbe              = "health"                 // HealthProbe, by site, then a random id of the broker instance
	kindAppPassword              = "app_password"           // AppPasswordGrant, by site, then keyed hash of subject
	kindLoginFlow                = "login_flow"             // PendingLoginFlow, by site, then keyed hash of subject
	kindAppPasswordLink          = "app_password_link"      // AppPasswordLink, by Hash(link token)
	kindAppPasswordDeletion      = "app_password_deletion"  // AppPasswordDeletion, by site, then a random id
	kindAppPasswordCurrentLink   = "app_password_current"   // CurrentAppPasswordLink, by site, then keyed hash of subject
	kindAppPasswordSessions      = "app_password_sessions"  // AppPasswordSessions, by site, then keyed hash of subject
	kindAssertionID              = "assertion_ids"          // UsedAssertionID, by Hash(issuer), then Hash(jti)
)

// recordKey builds the storage key of a record of kind for a client-supplied or random id.
func recordKey(kind, id string) string {
	return storage.Key(kind, storage.Hash(id))
}

// AuthorizationRequest is what an MCP client asked for at /oauth/authorize, kept while
// the user consents and logs in at the IdP.
type AuthorizationRequest struct {
	ClientID            string   `json:"client_id"`
	RedirectURI         string   `json:"redirect_uri"`
	State               string   `json:"state,omitempty"`
	CodeChallenge       string   `json:"code_challenge"`
	CodeChallengeMethod string   `json:"code_challenge_method"`
	Scopes              []string `json:"scopes"`
	Resource            string   `json:"resource"`
	// RedirectURIOmitted: the client sent no redirect_uri (it has one registered, which
	// RedirectURI holds), so its token request may leave it out (RFC 6749 §4.1.3).
	RedirectURIOmitted bool `json:"redirect_uri_omitted,omitempty"`
}

// ConsentTicket is an authorization request waiting for the user's decision on the
// consent page. CSRF is the value the page's form and cookie must both carry.
type ConsentTicket struct {
	Request AuthorizationRequest `json:"request"`
	CSRF    string               `json:"csrf"`
}

// PendingLogin is an approved request on its way through the IdP: what the callback
// needs to finish it. Stored under the random state sent to the IdP; taken once.
type PendingLogin struct {
	Request      AuthorizationRequest `json:"request"`
	Nonce        string               `json:"nonce"`
	PKCEVerifier string               `json:"pkce_verifier_sealed"` // sealed
	// BrowserBinding is storage.Hash of the login cookie set in the browser that
	// consented; the callback needs it back (see bindLoginToBrowser).
	BrowserBinding string `json:"browser_binding"`
}

// IdPGrant is a token the IdP gave the broker for a user: x/oauth2's Token (access token,
// refresh token, expiry) plus what the broker learned with it. It is the one type for a
// token from the IdP: a login's grant, sealed as a whole inside Session, a refreshed
// grant, and a token obtained for the upstream (delegation.go). The JSON is the sealed
// shape of earlier releases: the Token's fields stay at the top level.
type IdPGrant struct {
	oauth2.Token
	// IDToken is the raw ID token of the login, kept across refreshes that return none.
	IDToken string `json:"id_token,omitempty"`
	// Subject is the verified ID token's subject, set by the login; not sealed (the
	// Session holds it).
	Subject string `json:"-"`
	// Scopes are the scopes the IdP granted (granted.go); nil when not known.
	Scopes []string `json:"scopes,omitempty"`
	// AccessTokenScopes is what AccessToken was narrowed to by a scoped refresh
	// (delegation refresh); empty when it carries the whole grant.
	AccessTokenScopes []string `json:"access_token_scopes,omitempty"`
}

// Session is one login of a user through one MCP client in hybrid mode: the IdP grant
// behind the broker's tokens.
type Session struct {
	// key is where the session was read from or written to: the sealed grant opens only
	// there, so a session record copied to another key is useless.
	key string

	ID       string   `json:"id"`
	Subject  string   `json:"subject"`
	ClientID string   `json:"client_id"`
	Scopes   []string `json:"scopes"`
	// Site is the site (Broker.site) the session was created on, for the admin API's
	// listings; empty for sessions of earlier releases.
	Site      string    `json:"site,omitempty"`
	Grant     string    `json:"grant_sealed"` // a sealed JSON IdPGrant
	CreatedAt time.Time `json:"created_at"`
	// ConfirmedAt is when a refresh at the IdP last showed the grant alive (zero: at
	// CreatedAt, the login).
	ConfirmedAt time.Time `json:"confirmed_at,omitzero"`
	// EnterpriseIssuer is the issuer of the ID-JAG the session was created from
	// (token_jwt_bearer.go); empty for a login. Such a session has no IdP grant behind it:
	// Grant is empty, and delegation cannot use it.
	EnterpriseIssuer string `json:"enterprise_issuer,omitempty"`
}

// AuthorizationCode is a broker-issued code, bound to everything it was issued for.
type AuthorizationCode struct {
	SessionID           string   `json:"session_id"`
	FamilyID            string   `json:"family_id"`
	ClientID            string   `json:"client_id"`
	RedirectURI         string   `json:"redirect_uri"`
	CodeChallenge       string   `json:"code_challenge"`
	CodeChallengeMethod string   `json:"code_challenge_method"`
	Scopes              []string `json:"scopes"`
	Resource            string   `json:"resource"`
	Subject             string   `json:"subject"`
	// RedirectURIOmitted: the authorization request had no redirect_uri, so the token
	// request may leave it out too (RFC 6749 §4.1.3).
	RedirectURIOmitted bool `json:"redirect_uri_omitted,omitempty"`
	// ExpiresAt is checked against the broker's clock; the storage TTL only cleans up.
	ExpiresAt time.Time `json:"expires_at"`
	// LeavesMarker: the record is its own replay marker, stored for the marker's life and
	// moved to the marker's key when redeemed (codeStore). A code without it was issued
	// by an earlier release beside a UsedCode of its own.
	LeavesMarker bool `json:"leaves_marker,omitempty"`
	// FamilyStarted: the token family was stored with the code (issueCode). A code
	// without it was issued by an earlier release, and its family is started when it is
	// redeemed.
	FamilyStarted bool `json:"family_started,omitempty"`
}

// UsedCode outlives its code, so that a replay revokes what the code issued (RFC 6749
// §10.5). A redeemed code is moved to it (its JSON has both fields; see codeStore); an
// earlier release wrote it beside the code.
type UsedCode struct {
	FamilyID  string `json:"family_id"`
	SessionID string `json:"session_id,omitempty"`
}

// AccessToken is a broker-issued opaque access token.
type AccessToken struct {
	FamilyID  string    `json:"family_id"`
	SessionID string    `json:"session_id"`
	Subject   string    `json:"subject"`
	ClientID  string    `json:"client_id"`
	Scopes    []string  `json:"scopes"`
	Resource  string    `json:"resource"`
	Expiry    time.Time `json:"expiry"`
}

// RefreshToken is a broker-issued refresh token. Once rotated it names its successor
// pair, sealed, so that within the grace window a retry gets the same pair.
type RefreshToken struct {
	FamilyID  string    `json:"family_id"`
	SessionID string    `json:"session_id"`
	Subject   string    `json:"subject"`
	ClientID  string    `json:"client_id"`
	Scopes    []string  `json:"scopes"`
	Resource  string    `json:"resource"`
	RotatedAt time.Time `json:"rotated_at,omitzero"`
	Successor string    `json:"successor_sealed,omitempty"` // a sealed JSON TokenResponse
	Expiry    time.Time `json:"expiry"`
}

// TokenPair is an access token and the refresh token issued with it (or the access
// token alone), in one record: one write where a record per token made two. Both tokens
// name the pair (pairTokenID) and are checked against their hash. Pairs of earlier
// releases are two records, AccessToken and RefreshToken by the hash of each token.
type TokenPair struct {
	AccessHash string      `json:"access_hash"` // storage.Hash of the access token
	Access     AccessToken `json:"access"`
	// RefreshHash and Refresh are empty for an access token issued alone.
	RefreshHash string        `json:"refresh_hash,omitempty"`
	Refresh     *RefreshToken `json:"refresh,omitempty"`
	// RefreshSuccessor is Refresh.Successor, kept at the top level where the key ring's
	// usage count looks for sealed values (fields named *_sealed).
	RefreshSuccessor string `json:"successor_sealed,omitempty"`
}

// TokenFamily is every token descended from one authorization code. Revoking it stops
// them all.
type TokenFamily struct {
	ID        string    `json:"id"`
	SessionID string    `json:"session_id"`
	ClientID  string    `json:"client_id"`
	Revoked   bool      `json:"revoked,omitempty"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// RegisteredClient is an MCP client registered dynamically (RFC 7591).
type RegisteredClient struct {
	ClientID                string   `json:"client_id"`
	ClientSecretHash        string   `json:"client_secret_hash,omitempty"` // SHA-256, base64url; empty for public clients
	ClientName              string   `json:"client_name,omitempty"`
	RedirectURIs            []string `json:"redirect_uris"`
	GrantTypes              []string `json:"grant_types"`
	ResponseTypes           []string `json:"response_types"`
	TokenEndpointAuthMethod string   `json:"token_endpoint_auth_method"`
	// ApplicationType is web, native, or "" when the registration named none (or an
	// unknown one).
	ApplicationType string    `json:"application_type,omitempty"`
	IssuedAt        time.Time `json:"issued_at"`
	// RenewedAt is the last time a login or refresh extended its lifetime; zero while
	// the registration has never been used (then it lives unusedRegistrationTTL).
	RenewedAt time.Time `json:"renewed_at,omitzero"`
}

// UsedAssertionID marks the jti of an accepted assertion (client assertion or
// authorization grant) as used until the assertion expires (store_assertion_id.go).
type UsedAssertionID struct {
	Expires time.Time `json:"expires"`
}

// TokenResponse is the RFC 6749 §5.1 success body.
type TokenResponse struct {
	AccessToken  string `json:"access_token"`
	TokenType    string `json:"token_type"`
	ExpiresIn    int64  `json:"expires_in"`
	RefreshToken string `json:"refresh_token,omitempty"`
	Scope        string `json:"scope,omitempty"`
}

// randomToken is 32 random bytes, base64url: codes, tokens, states, ids.
func randomToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return base64.RawURLEncoding.EncodeToString(b)
}

// OfflineAccessLink is a one-time link that lets a browser start offline access for the user whose
// bearer token minted it: a browser cannot send that token itself. Taken once.
type OfflineAccessLink struct {
	Subject   string    `json:"subject"`
	ClientID  string    `json:"client_id,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	// Binding is a seal of nothing with the record's key, Subject and ClientID as
	// associated data: a record whose identity was changed does not open (SECURITY.md S1.36).
	Binding string `json:"binding_sealed"`
}

// CurrentOfflineAccessLink is the one-time link a user's tool calls and starts of offline
// access through one client are answered with, reused while it is unused and young, so
// that calls in a row do not each store a link (SECURITY.md S1.35).
type CurrentOfflineAccessLink struct {
	// Link is the link's token, sealed with the record's key, subject and client.
	Link      string    `json:"link_sealed"`
	CreatedAt time.Time `json:"created_at"`
}

// PendingOfflineAccess is an offline access login on its way through the IdP, stored under the
// random state sent there and taken once by the callback.
type PendingOfflineAccess struct {
	Subject  string `json:"subject"`
	ClientID string `json:"client_id,omitempty"`
	// BackgroundClients are the ids of the background clients the user is told will get
	// access. Never omitted: null (nil) is a login started by an earlier release.
	BackgroundClients []string  `json:"background_clients"`
	Scopes            []string  `json:"scopes"`
	Nonce             string    `json:"nonce"`
	PKCEVerifier      string    `json:"pkce_verifier_sealed"` // sealed
	CreatedAt         time.Time `json:"created_at"`
	// BrowserBinding is storage.Hash of the login cookie set in the browser that opened
	// the offline access link (see bindLoginToBrowser).
	BrowserBinding string `json:"browser_binding"`
}

// OfflineAccessGrant is a user's offline access offline access: the IdP refresh token, sealed, that
// only ever mints background tokens for the background clients the user granted.
type OfflineAccessGrant struct {
	// key is where the grant was read from or written to: the sealed refresh token opens
	// only there.
	key string

	Subject  string   `json:"subject"`
	ClientID string   `json:"client_id,omitempty"` // the MCP client the user granted offline access through
	Scopes   []string `json:"scopes"`
	// BackgroundClients are the ids of the background clients that may use the grant:
	// those the user was shown when granting offline access.
	BackgroundClients []string `json:"background_clients"`
	// FromUpgrade: the grant was made by a release that did not bind it to background
	// clients; BackgroundClients are those configured when it was first used after the
	// upgrade. It lasts until the user grants offline access again.
	FromUpgrade bool `json:"from_upgrade,omitempty"`

	RefreshToken string    `json:"refresh_token_sealed"` // sealed
	GrantedAt    time.Time `json:"provisioned_at"`       // the JSON name of earlier releases: stored records keep opening
	RotatedAt    time.Time `json:"rotated_at,omitzero"`

	// The access token the last background refresh got, sealed (bound to the key and its
	// field, see accessTokenAAD), until AccessTokenExpiry, with its scopes: background
	// tokens asked while it has backgroundTokenReuse left are this one, so that concurrent
	// workers cost one IdP refresh, and a refresh at an IdP that kills the previous access
	// token (Nextcloud's oidc app) does not kill the one a worker just got.
	AccessToken       string    `json:"access_token_sealed,omitempty"`
	AccessTokenExpiry time.Time `json:"access_token_expiry,omitzero"`
	AccessTokenScopes []string  `json:"access_token_scopes,omitempty"`
}

// AppPasswordLink is a one-time link that lets a browser start Login Flow v2 for the user
// whose bearer token minted it (delegation mode app_password). Taken once.
type AppPasswordLink struct {
	Subject  string `json:"subject"`
	ClientID string `json:"client_id,omitempty"`
	// NextcloudUser is the Nextcloud user id the app password must authenticate as: the
	// user's user_claim when the link was minted.
	NextcloudUser string    `json:"nextcloud_user"`
	CreatedAt     time.Time `json:"created_at"`
	// Binding is a seal of nothing with the record's key, Subject, ClientID and
	// NextcloudUser as associated data: a record whose identity was changed does not open
	// (SECURITY.md S1.36).
	Binding string `json:"binding_sealed"`
}

// PendingLoginFlow is a Login Flow v2 the broker started for a user and polls until
// Nextcloud answers the app password, or the flow's 1200 s are over. One per user and
// site; a new start replaces it.
type PendingLoginFlow struct {
	// key is where the flow was read from or written to: the sealed poll token opens only
	// there.
	key string

	// pollToken and loginURL are PollToken and LoginURL opened, when the flow was read:
	// its identity (Subject, ClientID, NextcloudUser) checked against its key and the
	// seal (SECURITY.md S1.30).
	pollToken, loginURL string

	Subject       string `json:"subject"`
	ClientID      string `json:"client_id,omitempty"`
	NextcloudUser string `json:"nextcloud_user"`
	// PollToken is sealed with the record's key and the flow's identity as associated
	// data: a record whose identity was changed does not open.
	PollToken string `json:"poll_token_sealed"`
	// LoginURL is where the flow's first link sent the browser, sealed as PollToken: the
	// user's next links send the browser there too, while the flow has time left
	// (SECURITY.md S1.27).
	LoginURL  string    `json:"login_url_sealed,omitempty"`
	StartedAt time.Time `json:"started_at"`
	// NextPollAt holds polls back after Nextcloud throttled the broker or failed.
	NextPollAt time.Time `json:"next_poll_at,omitzero"`
}

// AppPasswordGrant is a user's Nextcloud app password (delegation mode app_password),
// sealed, with the login name it goes with and the Nextcloud user it was verified to
// authenticate as.
type AppPasswordGrant struct {
	// key is where the grant was read from or written to: the sealed app password opens
	// only there.
	key string

	Subject       string    `json:"subject"`
	ClientID      string    `json:"client_id,omitempty"`
	NextcloudUser string    `json:"nextcloud_user"`
	LoginName     string    `json:"login_name"`
	AppPassword   string    `json:"app_password_sealed"` // sealed; empty once revoked
	GrantedAt     time.Time `json:"granted_at"`
	// ConfirmedAt is when Nextcloud last said who the app password authenticates as.
	ConfirmedAt time.Time `json:"confirmed_at"`
	// RevokedAt is when Nextcloud said the app password is not valid (OCS 401): the
	// password is erased and the user asked to grant one again.
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// CurrentAppPasswordLink is the one-time link a user's tool calls without an app password
// are answered with, reused while it is live and young, so that calls in a row do not each
// store a link (SECURITY.md S1.27).
type CurrentAppPasswordLink struct {
	Subject       string `json:"subject"`
	NextcloudUser string `json:"nextcloud_user"`
	// Link is the link's token, sealed with the record's key and the subject.
	Link      string    `json:"link_sealed"`
	CreatedAt time.Time `json:"created_at"`
}

// AppPasswordSessions are the hybrid sessions a user logged in with on a site in delegation
// mode app_password, newest last: the app password is the user's, and ending one of them
// (RFC 7009) deletes it only when none of the others is live (SECURITY.md S1.29).
type AppPasswordSessions struct {
	Subject  string   `json:"subject"`
	Sessions []string `json:"sessions"` // session ids
}

// AppPasswordDeletion is an app password the broker must delete in Nextcloud and could not
// yet (Nextcloud throttled the broker or was down): one refused as another account's or
// unverifiable, replaced, or revoked. It is never used upstream; the poller retries the
// deletion until Nextcloud confirms it or the record expires.
type AppPasswordDeletion struct {
	// key is where the record was read from or written to: the sealed password opens only
	// there.
	key string

	Subject     string    `json:"subject"`
	LoginName   string    `json:"login_name"`
	AppPassword string    `json:"app_password_sealed"` // sealed
	CreatedAt   time.Time `json:"created_at"`
}
