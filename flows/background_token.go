package flows

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
)

// backgroundFormMax bounds the body of a background token request.
const backgroundFormMax = 4096

// backgroundSubjectMax bounds the subject a background client names.
const backgroundSubjectMax = 1024

// serveBackgroundToken is POST /oauth/background-token: a background worker,
// authenticated with its configured credentials (client_secret_basic), gets a fresh
// access token for a user who granted offline access and granted it to
// this worker. The user is a parameter here by design (the worker acts for named
// users), which is why only background clients may call it; a user's bearer token is
// refused. Each worker is held to BackgroundTokenRate requests a minute.
func (b *Broker) serveBackgroundToken(w http.ResponseWriter, r *http.Request) {
	resp, err := b.backgroundTokenRequest(w, r)
	if err != nil {
		b.writeError(w, r, err)
		return
	}
	b.count(BackgroundTokenIssued)
	writeJSON(w, http.StatusOK, resp)
}

// backgroundTokenRequest authenticates and limits the background client, reads the
// subject and mints the token.
func (b *Broker) backgroundTokenRequest(w http.ResponseWriter, r *http.Request) (TokenResponse, error) {
	if r.Method != http.MethodPost {
		return TokenResponse{}, errMethodNotAllowed("POST")
	}
	clientID, ok := b.authenticateBackgroundClient(r)
	if !ok {
		e := newRequestError(http.StatusUnauthorized, "invalid_client", "background client authentication failed")
		e.challenge = `Basic realm="background-token"`
		return TokenResponse{}, e
	}
	if ok, wait := b.backgroundTokens.Allow(clientID, b.cfg.BackgroundTokenRate, b.now()); !ok {
		return TokenResponse{}, errTooManyRequests(wait, "too many background token requests from this background client; retry later")
	}
	r.Body = http.MaxBytesReader(w, r.Body, backgroundFormMax)
	if err := r.ParseForm(); err != nil {
		return TokenResponse{}, errInvalidRequest("the request body is not a form of acceptable size")
	}
	if r.URL.RawQuery != "" {
		// Parameters belong in the body, as at a token endpoint.
		return TokenResponse{}, errInvalidRequest("parameters are accepted only in the request body")
	}
	subjects := r.PostForm["subject"]
	if len(subjects) != 1 || subjects[0] == "" || len(subjects[0]) > backgroundSubjectMax {
		return TokenResponse{}, errInvalidRequest("exactly one subject is required")
	}
	subject := subjects[0]
	tok, scopes, err := b.backgroundToken(r.Context(), clientID, subject)
	switch {
	case errors.Is(err, errNoOfflineAccess):
		return TokenResponse{}, errInvalidGrant("the user has not granted offline access")
	case errors.Is(err, errBackgroundClientNotGranted):
		b.log.offline.Info("the user did not grant this background client", zap.String("client_id", clientID), zap.String("subject", subject))
		return TokenResponse{}, newRequestError(http.StatusForbidden, "access_denied", "the user did not grant this background client offline access")
	case errors.Is(err, errOfflineAccessGrantDead):
		b.log.offline.Info("offline access grant no longer valid; deleted", zap.String("client_id", clientID), zap.String("subject", subject))
		b.audit(auditOfflineAccessRevoked, clientIP(r), zap.String("reason", "identity_provider_refused"), zap.String("subject", subject),
			zap.String("client_id", clientID))
		return TokenResponse{}, errInvalidGrant("the user's offline access is no longer valid; the user must grant it again")
	case errors.Is(err, idp.ErrUnavailable):
		return TokenResponse{}, errIdPUnavailable(fmt.Errorf("background token for subject %s: %w", subject, err))
	case err != nil:
		return TokenResponse{}, errServer(http.StatusInternalServerError, "the background token could not be issued",
			fmt.Errorf("background token: minting for subject %s: %w", subject, err))
	}
	var expiresIn int64
	if !tok.Expiry.IsZero() {
		expiresIn = max(int64(tok.Expiry.Sub(b.now())/time.Second), 0)
	}
	b.audit(auditBackgroundTokenIssued, clientIP(r), zap.String("subject", subject), zap.String("client_id", clientID),
		zap.String("token", Fingerprint(tok.AccessToken)))
	return TokenResponse{
		AccessToken: tok.AccessToken,
		TokenType:   "Bearer",
		ExpiresIn:   expiresIn,
		Scope:       strings.Join(scopes, " "),
	}, nil
}

// authenticateBackgroundClient checks HTTP Basic credentials against the configured
// background clients, comparing in constant time, and returns the client's id. Only
// Basic is accepted: a bearer token (a user's session) never authenticates here.
func (b *Broker) authenticateBackgroundClient(r *http.Request) (string, bool) {
	id, secret, ok := r.BasicAuth()
	if !ok || len(b.cfg.BackgroundClients) == 0 {
		return "", false
	}
	// RFC 6749 §2.3.1: the id and secret are form-encoded before Basic.
	if v, err := url.QueryUnescape(id); err == nil {
		id = v
	}
	if v, err := url.QueryUnescape(secret); err == nil {
		secret = v
	}
	// Hashing first makes every comparison the same length; every client is compared so
	// the time taken does not tell which ids exist.
	idSum, secretSum := sha256.Sum256([]byte(id)), sha256.Sum256([]byte(secret))
	match := 0
	var who string
	for _, c := range b.cfg.BackgroundClients {
		cid, csec := sha256.Sum256([]byte(c.ID)), sha256.Sum256([]byte(c.Secret))
		m := subtle.ConstantTimeCompare(idSum[:], cid[:]) & subtle.ConstantTimeCompare(secretSum[:], csec[:])
		if m == 1 && c.Secret != "" {
			match, who = 1, c.ID
		}
	}
	return who, match == 1
}
