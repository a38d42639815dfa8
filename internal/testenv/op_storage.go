package testenv

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/zitadel/oidc/v3/example/server/exampleop"
	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
	"golang.org/x/text/language"
)

// Clients registered at every OP. Their redirect URIs are globs, see [OP].
const (
	// BrokerClientID and BrokerClientSecret are a confidential web client
	// with the authorization_code, refresh_token and token exchange grants,
	// issuing JWT access tokens. It authenticates with client_secret_basic;
	// zitadel takes client_secret_post too for the code and refresh grants,
	// but not for token exchange or introspection. Like any authenticated
	// client, it may introspect any token of the OP.
	BrokerClientID     = "broker"
	BrokerClientSecret = "broker-secret"

	// NativeClientID is a public native client (no secret, PKCE) with the
	// authorization_code and refresh_token grants, issuing JWT access tokens.
	NativeClientID = "native"

	// OpaqueClientID and OpaqueClientSecret are a confidential web client like
	// the broker's, except that its access tokens are opaque: they can only be
	// checked at the introspection endpoint.
	OpaqueClientID     = "opaque"
	OpaqueClientSecret = "opaque-secret"
)

// userPassword is the password of every user of the OP.
const userPassword = "verysecure"

// User is an account that can sign in on the OP's login form.
type User struct {
	// Subject is the sub claim of the user's tokens.
	Subject  string
	Username string
	Password string
}

// userStore holds the OP's users. Admins, in zitadel's example storage, are
// the users whose tokens a client may exchange without an actor token.
type userStore struct {
	users map[string]*storage.User
}

func newUserStore(host string) userStore {
	user := func(id, first string, admin bool) *storage.User {
		return &storage.User{
			ID:                id,
			Username:          id + "@" + host,
			Password:          userPassword,
			FirstName:         first,
			LastName:          "User",
			Email:             id + "@example.com",
			EmailVerified:     true,
			PreferredLanguage: language.English,
			IsAdmin:           admin,
		}
	}
	return userStore{users: map[string]*storage.User{
		"test-user":       user("test-user", "Test", true),
		"other-user":      user("other-user", "Other", true),
		"restricted-user": user("restricted-user", "Restricted", false),
	}}
}

func (s userStore) account(id string) User {
	u := s.users[id]
	return User{Subject: u.ID, Username: u.Username, Password: u.Password}
}

func (s userStore) GetUserByID(id string) *storage.User { return s.users[id] }

func (s userStore) GetUserByUsername(username string) *storage.User {
	for _, u := range s.users {
		if u.Username == username {
			return u
		}
	}
	return nil
}

func (s userStore) ExampleClientID() string { return storage.ServiceUserID }

// client is one of the example storage's clients, with the access token type
// chosen here, any scope allowed but the refused ones, and redirect URIs matched
// by glob.
type client struct {
	*storage.Client
	accessTokenType op.AccessTokenType
	redirectGlobs   []string
	refusedScopes   []string
}

func (c client) AccessTokenType() op.AccessTokenType { return c.accessTokenType }

// IsScopeAllowed lets clients ask for any scope, as for an API's own scopes
// (notes:read), except those of WithScopesRefused; zitadel drops a scope not
// allowed silently.
func (c client) IsScopeAllowed(scope string) bool { return !slices.Contains(c.refusedScopes, scope) }

func (c client) RedirectURIGlobs() []string { return c.redirectGlobs }

func (c client) PostLogoutRedirectURIGlobs() []string { return c.redirectGlobs }

// issuedToken is what an access token was issued for, kept for introspection
// and for narrowing the scopes of a token exchange.
type issuedToken struct {
	clientID   string
	subject    string
	audience   []string
	scopes     []string
	expiration time.Time
}

// opStorage is zitadel's example storage with the changes the tests need:
//   - JWT access tokens carry a scope claim;
//   - an authorization request's RFC 8707 resource parameters become the
//     audience of the access tokens issued from it and from its refresh tokens;
//   - any authenticated client may introspect any token, and the response
//     names its audience;
//   - a token exchange defaults to an access token, keeps the subject token's
//     scopes unless asked for fewer, refuses more, and answers invalid_grant
//     rather than server_error when the subject may not be exchanged;
//   - the refresh tokens of a disabled user are refused (invalid_grant).
type opStorage struct {
	*storage.Storage
	users   userStore
	clients map[string]op.Client

	mu              sync.Mutex
	resources       map[string][]string // auth request ID → resources it asked for
	refreshAudience map[string][]string // refresh token → audience of its grant
	disabled        map[string]bool     // subjects whose grants are refused
	issued          map[string]issuedToken
	seeded          map[string]*storage.RefreshToken // SeedRefreshToken's, until used once

	signing *signingKey // WithSigningAlgorithm's key; nil: the example storage's
}

func newOPStorage(users userStore, redirectGlobs, refusedScopes []string) *opStorage {
	broker := storage.WebClient(BrokerClientID, BrokerClientSecret)
	native := storage.NativeClient(NativeClientID)
	opaque := storage.WebClient(OpaqueClientID, OpaqueClientSecret)
	registered := map[string]*storage.Client{
		BrokerClientID: broker,
		NativeClientID: native,
		OpaqueClientID: opaque,
	}
	return &opStorage{
		Storage: storage.NewStorageWithClients(users, registered),
		users:   users,
		clients: map[string]op.Client{
			BrokerClientID: client{broker, op.AccessTokenTypeJWT, redirectGlobs, refusedScopes},
			NativeClientID: client{native, op.AccessTokenTypeJWT, redirectGlobs, refusedScopes},
			OpaqueClientID: client{opaque, op.AccessTokenTypeBearer, redirectGlobs, refusedScopes},
		},
		resources:       make(map[string][]string),
		refreshAudience: make(map[string][]string),
		disabled:        make(map[string]bool),
		issued:          make(map[string]issuedToken),
		seeded:          make(map[string]*storage.RefreshToken),
	}
}

func (s *opStorage) GetClientByClientID(_ context.Context, clientID string) (op.Client, error) {
	c, ok := s.clients[clientID]
	if !ok {
		return nil, fmt.Errorf("client %q not found", clientID)
	}
	return c, nil
}

type resourcesKey struct{}

// withResources carries an authorization request's resource parameters from
// the HTTP layer to CreateAuthRequest.
func withResources(ctx context.Context, resources []string) context.Context {
	return context.WithValue(ctx, resourcesKey{}, resources)
}

func (s *opStorage) CreateAuthRequest(ctx context.Context, authReq *oidc.AuthRequest, userID string) (op.AuthRequest, error) {
	req, err := s.Storage.CreateAuthRequest(ctx, authReq, userID)
	if err != nil {
		return nil, err
	}
	if resources, _ := ctx.Value(resourcesKey{}).([]string); len(resources) > 0 {
		s.mu.Lock()
		s.resources[req.GetID()] = resources
		s.mu.Unlock()
	}
	return req, nil
}

func (s *opStorage) AuthRequestByCode(ctx context.Context, code string) (op.AuthRequest, error) {
	req, err := s.Storage.AuthRequestByCode(ctx, code)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	audience, ok := s.resources[req.GetID()]
	s.mu.Unlock()
	inner, isExample := req.(*storage.AuthRequest)
	if !ok || !isExample {
		return req, nil
	}
	return &resourceAuthRequest{AuthRequest: inner, audience: audience}, nil
}

func (s *opStorage) DeleteAuthRequest(ctx context.Context, id string) error {
	s.mu.Lock()
	delete(s.resources, id)
	s.mu.Unlock()
	return s.Storage.DeleteAuthRequest(ctx, id)
}

// resourceAuthRequest is an authorization request whose tokens are for the
// resources it named rather than for the client.
type resourceAuthRequest struct {
	*storage.AuthRequest
	audience []string
}

func (r *resourceAuthRequest) GetAudience() []string { return r.audience }

// resourceRefreshRequest continues the grant of a resourceAuthRequest.
type resourceRefreshRequest struct {
	op.RefreshTokenRequest
	audience []string
}

func (r *resourceRefreshRequest) GetAudience() []string { return r.audience }

// unwrap returns the request the example storage made, which it needs back
// to tell which client and grant a token belongs to.
func unwrap(req op.TokenRequest) op.TokenRequest {
	switch r := req.(type) {
	case *resourceAuthRequest:
		return r.AuthRequest
	case *resourceRefreshRequest:
		return r.RefreshTokenRequest
	}
	return req
}

func (s *opStorage) CreateAccessToken(ctx context.Context, req op.TokenRequest) (string, time.Time, error) {
	id, exp, err := s.Storage.CreateAccessToken(ctx, unwrap(req))
	if err != nil {
		return "", time.Time{}, err
	}
	s.recordIssued(id, req, exp)
	return id, exp, nil
}

func (s *opStorage) CreateAccessAndRefreshTokens(ctx context.Context, req op.TokenRequest, currentRefreshToken string) (string, string, time.Time, error) {
	s.mu.Lock()
	_, seeded := s.seeded[currentRefreshToken]
	delete(s.seeded, currentRefreshToken)
	s.mu.Unlock()
	if seeded {
		// The example storage renews only its own tokens: issue a fresh one instead,
		// which rotates the seeded token away just the same.
		currentRefreshToken = ""
	}
	id, refreshToken, exp, err := s.Storage.CreateAccessAndRefreshTokens(ctx, unwrap(req), currentRefreshToken)
	if err != nil {
		return "", "", time.Time{}, err
	}
	s.recordIssued(id, req, exp)
	if unwrap(req) != req {
		s.mu.Lock()
		delete(s.refreshAudience, currentRefreshToken)
		s.refreshAudience[refreshToken] = req.GetAudience()
		s.mu.Unlock()
	}
	return id, refreshToken, exp, nil
}

func (s *opStorage) TokenRequestByRefreshToken(ctx context.Context, refreshToken string) (op.RefreshTokenRequest, error) {
	s.mu.Lock()
	seed, seeded := s.seeded[refreshToken]
	s.mu.Unlock()
	if seeded {
		return &storage.RefreshTokenRequest{RefreshToken: seed}, nil
	}
	req, err := s.Storage.TokenRequestByRefreshToken(ctx, refreshToken)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	audience, ok := s.refreshAudience[refreshToken]
	disabled := s.disabled[req.GetSubject()]
	s.mu.Unlock()
	if disabled {
		return nil, op.ErrInvalidRefreshToken
	}
	if !ok {
		return req, nil
	}
	return &resourceRefreshRequest{RefreshTokenRequest: req, audience: audience}, nil
}

// GetRefreshTokenInfo replaces the example's, which reads its map without
// holding its lock. The example uses a refresh token as its own ID.
func (s *opStorage) GetRefreshTokenInfo(ctx context.Context, _ string, token string) (string, string, error) {
	req, err := s.Storage.TokenRequestByRefreshToken(ctx, token)
	if err != nil {
		return "", "", op.ErrInvalidRefreshToken
	}
	return req.GetSubject(), token, nil
}

func clientIDOf(req op.TokenRequest) string {
	if r, ok := req.(interface{ GetClientID() string }); ok {
		return r.GetClientID()
	}
	return ""
}

func (s *opStorage) recordIssued(id string, req op.TokenRequest, exp time.Time) {
	clientID := clientIDOf(req)
	audience := req.GetAudience()
	if len(audience) == 0 {
		audience = []string{clientID} // as zitadel's oidc.NewAccessTokenClaims does
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.issued[id] = issuedToken{
		clientID:   clientID,
		subject:    req.GetSubject(),
		audience:   slices.Clone(audience),
		scopes:     slices.Clone(req.GetScopes()),
		expiration: exp,
	}
}

func (s *opStorage) issuedToken(id string) (issuedToken, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.issued[id]
	return t, ok
}

// GetPrivateClaimsFromRequest implements op.CanGetPrivateClaimsFromRequest,
// which zitadel prefers to GetPrivateClaimsFromScopes when building a JWT
// access token.
func (s *opStorage) GetPrivateClaimsFromRequest(ctx context.Context, req op.TokenRequest, restrictedScopes []string) (map[string]any, error) {
	claims, err := s.Storage.GetPrivateClaimsFromScopes(ctx, req.GetSubject(), clientIDOf(req), restrictedScopes)
	if err != nil {
		return nil, err
	}
	return withScopeClaim(claims, req.GetScopes()), nil
}

func (s *opStorage) GetPrivateClaimsFromTokenExchangeRequest(ctx context.Context, req op.TokenExchangeRequest) (map[string]any, error) {
	claims, err := s.Storage.GetPrivateClaimsFromTokenExchangeRequest(ctx, req)
	if err != nil {
		return nil, err
	}
	return withScopeClaim(claims, req.GetScopes()), nil
}

func withScopeClaim(claims map[string]any, scopes []string) map[string]any {
	if len(scopes) == 0 {
		return claims
	}
	if claims == nil {
		claims = make(map[string]any)
	}
	claims["scope"] = strings.Join(scopes, " ")
	return claims
}

func (s *opStorage) ValidateTokenExchangeRequest(ctx context.Context, req op.TokenExchangeRequest) error {
	if req.GetRequestedTokenType() == "" {
		req.SetRequestedTokenType(oidc.AccessTokenType)
	}
	if s.users.GetUserByID(req.GetExchangeSubject()) == nil {
		// The example storage would dereference the missing user.
		return oidc.ErrInvalidGrant().WithDescription("subject_token names an unknown user")
	}
	if held, ok := s.subjectScopes(ctx, req); ok {
		requested := req.GetScopes()
		if len(requested) == 0 {
			req.SetCurrentScopes(held)
		}
		for _, scope := range requested {
			if !slices.Contains(held, scope) {
				return oidc.ErrInvalidScope().WithDescription("scope %q exceeds the subject token's scopes", scope)
			}
		}
	}
	if err := s.Storage.ValidateTokenExchangeRequest(ctx, req); err != nil {
		return oidc.ErrInvalidGrant().WithDescription("%s", err.Error()).WithParent(err)
	}
	return nil
}

// subjectScopes returns the scopes of a token exchange's subject token, when
// they are known.
func (s *opStorage) subjectScopes(ctx context.Context, req op.TokenExchangeRequest) ([]string, bool) {
	switch req.GetExchangeSubjectTokenType() {
	case oidc.AccessTokenType:
		if t, ok := s.issuedToken(req.GetExchangeSubjectTokenIDOrToken()); ok {
			return t.scopes, true
		}
		if scope, ok := req.GetExchangeSubjectTokenClaims()["scope"].(string); ok {
			return strings.Fields(scope), true
		}
	case oidc.RefreshTokenType:
		if r, err := s.Storage.TokenRequestByRefreshToken(ctx, req.GetExchangeSubjectTokenIDOrToken()); err == nil {
			return r.GetScopes(), true
		}
	}
	return nil, false
}

// SetIntrospectionFromToken lets any authenticated client introspect any
// token, as a resource server would. The example storage instead requires
// the caller to be in the token's audience.
func (s *opStorage) SetIntrospectionFromToken(ctx context.Context, resp *oidc.IntrospectionResponse, tokenID, subject, _ string) error {
	t, ok := s.issuedToken(tokenID)
	if !ok {
		return fmt.Errorf("token %q was not issued here", tokenID)
	}
	// The example storage still decides whether the token is live: it forgets
	// revoked and rotated tokens, and refuses expired ones.
	userinfo := new(oidc.UserInfo)
	if err := s.Storage.SetUserinfoFromToken(ctx, userinfo, tokenID, subject, ""); err != nil {
		return err
	}
	resp.SetUserInfo(userinfo)
	resp.Subject = t.subject
	resp.Scope = t.scopes
	resp.ClientID = t.clientID
	resp.Audience = t.audience
	resp.Expiration = oidc.FromTime(t.expiration)
	resp.Issuer = op.IssuerFromContext(ctx)
	resp.JWTID = tokenID
	resp.TokenType = oidc.BearerToken
	return nil
}

// exampleStorage is what exampleop.SetupServer needs, plus the optional
// interfaces opStorage implements other than op.TokenExchangeStorage.
type exampleStorage interface {
	exampleop.Storage
	op.CanSetUserinfoFromRequest
	op.CanGetPrivateClaimsFromRequest
	op.ClientCredentialsStorage
}

// withoutTokenExchange hides opStorage's token exchange methods: zitadel
// advertises and serves the grant only for a storage implementing
// op.TokenExchangeStorage.
type withoutTokenExchange struct {
	exampleStorage
}

var (
	_ exampleStorage          = (*opStorage)(nil)
	_ op.TokenExchangeStorage = (*opStorage)(nil)
	_ op.HasRedirectGlobs     = client{}
)

// SeedRefreshToken makes the OP honour token, a refresh token that another OP (an earlier
// test run's) issued to clientID for subject with scopes, once: the refresh grant rotates
// it like one of its own. It lets storage written in an earlier run be used against a
// fresh OP.
func (o *OP) SeedRefreshToken(token, clientID, subject string, scopes []string) {
	now := time.Now()
	o.storage.mu.Lock()
	defer o.storage.mu.Unlock()
	o.storage.seeded[token] = &storage.RefreshToken{
		ID: token, Token: token, AuthTime: now, AMR: []string{"pwd"}, UserID: subject,
		ApplicationID: clientID, Audience: []string{clientID}, Expiration: now.Add(5 * time.Hour), Scopes: scopes,
	}
}
