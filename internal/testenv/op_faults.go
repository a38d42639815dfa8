package testenv

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
)

// Faults injected into the OP's token endpoint answers, for tests of a client
// that must not take an IdP's answer on trust: the OP itself issued the token
// honestly, and the fault rewrites the answer on its way out.

// TokenAnswerFault rewrites the members of a successful token endpoint answer
// to a request of grantType before the OP sends it.
type TokenAnswerFault func(grantType string, answer map[string]any)

// SetTokenAnswerFault passes every successful token endpoint answer through f
// from now on; nil stops it.
func (o *OP) SetTokenAnswerFault(f TokenAnswerFault) {
	if f == nil {
		o.answerFault.Store(nil)
		return
	}
	o.answerFault.Store(&f)
}

// OmitAnswerScope is a TokenAnswerFault that drops scope from the answers to
// grantTypes (every grant when none are named), as the Nextcloud oidc app
// answers: the client has to learn the granted scopes elsewhere.
func OmitAnswerScope(grantTypes ...string) TokenAnswerFault {
	return func(grantType string, answer map[string]any) {
		if len(grantTypes) == 0 || slices.Contains(grantTypes, grantType) {
			delete(answer, "scope")
		}
	}
}

// SetAnswerScope is a TokenAnswerFault that makes the answers to grantType
// say scope, whatever the token carries.
func SetAnswerScope(grantType, scope string) TokenAnswerFault {
	return func(g string, answer map[string]any) {
		if g == grantType {
			answer["scope"] = scope
		}
	}
}

// ReissueAccessToken returns a TokenAnswerFault that replaces the JWT access
// token of the answers to grantType with one the OP's key signs, whose claims
// change edits first: a token for another subject, another audience or wider
// scopes, as a broken or hostile IdP might issue. The OP does not know the new
// token: introspection calls it inactive; an ID token in the same answer keeps
// the at_hash of the old one.
func (o *OP) ReissueAccessToken(grantType string, change func(claims map[string]any)) TokenAnswerFault {
	return func(g string, answer map[string]any) {
		raw, _ := answer["access_token"].(string)
		parts := strings.Split(raw, ".")
		if g != grantType || len(parts) != 3 {
			return
		}
		payload, err := base64.RawURLEncoding.DecodeString(parts[1])
		if err != nil {
			return
		}
		var claims map[string]any
		if json.Unmarshal(payload, &claims) != nil {
			return
		}
		change(claims)
		answer["access_token"] = o.MintJWT(claims)
	}
}

// tokenPath is the path of the OP's token endpoint.
func (o *OP) tokenPath() string {
	u, err := url.Parse(o.TokenEndpoint)
	if err != nil {
		return ""
	}
	return u.Path
}

// serveWithFault serves r with next and passes a successful JSON answer
// through f.
func serveWithFault(w http.ResponseWriter, r *http.Request, next http.Handler, grantType string, f TokenAnswerFault) {
	rec := httptest.NewRecorder()
	next.ServeHTTP(rec, r)
	body := rec.Body.Bytes()
	var answer map[string]any
	if rec.Code == http.StatusOK && json.Unmarshal(body, &answer) == nil {
		f(grantType, answer)
		if b, err := json.Marshal(answer); err == nil {
			body = b
		}
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(rec.Code)
	_, _ = w.Write(body)
}
