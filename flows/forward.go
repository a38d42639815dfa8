package flows

import (
	"fmt"
	"net/http"
	"strings"
	"sync"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/mcprequest"
)

// What the broker forwards, and what it removes (README): on the way in, the client's
// Authorization, every spelling of the subject header and of the identity headers other
// gateways set, every Connection token naming one of them, and the request's trailers;
// on the way out, an upstream's Set-Cookie for the broker's own cookie names.

// identityHeaders are headers other authenticating gateways (oauth2-proxy, Authelia,
// Apache's REMOTE_USER) set for their upstream; an upstream that was once behind one may
// still believe them, so a client never gets to send them. Compared as
// mcprequest.SameHeaderName compares, so X_Remote_User is X-Remote-User.
var identityHeaders = []string{
	"Remote-User", "Remote-Email", "Remote-Groups", "Remote-Name",
	"X-Remote-User", "X-Remote-Email", "X-Remote-Groups",
	"X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups",
	"X-Forwarded-Preferred-Username", "X-Forwarded-Access-Token",
	"X-User", "X-Email",
}

// identityHeaderPrefix is oauth2-proxy's family of identity headers (X-Auth-Request-User,
// -Email, -Groups, -Preferred-Username, -Access-Token).
const identityHeaderPrefix = "x-auth-request-"

// stripClientIdentity removes from h what a client must not tell the upstream: its own
// Authorization, the subject header and the identity headers in every spelling, and the
// Connection tokens naming any of them or Authorization, which a proxy would otherwise
// drop as hop-by-hop after the broker set them. It allocates only when it has something
// to remove from Connection.
func stripClientIdentity(h http.Header, subjectHeader string) {
	// One walk over the header map, Authorization in any spelling included: no
	// canonicalisation of names.
	for k := range h {
		if brokerManagedHeader(k, subjectHeader) {
			delete(h, k)
		}
	}
	if conn, ok := h["Connection"]; ok {
		h["Connection"] = cleanConnection(conn, subjectHeader)
		if len(h["Connection"]) == 0 {
			delete(h, "Connection")
		}
	}
}

// brokerManagedHeader tells whether a header of that name is set or stripped by the
// broker: Authorization, the subject header, an identity header, in any spelling.
func brokerManagedHeader(name, subjectHeader string) bool {
	if name != "" && subjectHeader != "" {
		// Most headers are told apart by their first byte, compared as SameHeaderName does.
		if c := mcprequest.HeaderNameFold(name[0]); !managedFirstBytes[c] && c != mcprequest.HeaderNameFold(subjectHeader[0]) {
			return false
		}
	}
	if len(name) == len(subjectHeader) && mcprequest.SameHeaderName(name, subjectHeader) {
		return true
	}
	if len(name) == len("Authorization") && mcprequest.SameHeaderName(name, "Authorization") {
		return true
	}
	if len(name) > len(identityHeaderPrefix) && mcprequest.SameHeaderName(name[:len(identityHeaderPrefix)], identityHeaderPrefix) {
		return true
	}
	for _, id := range identityHeaders {
		if len(name) == len(id) && mcprequest.SameHeaderName(name, id) {
			return true
		}
	}
	return false
}

// managedFirstBytes are the first bytes (mcprequest.HeaderNameFold) of Authorization, the
// identity headers and identityHeaderPrefix, but for the subject header's.
var managedFirstBytes = func() (t [256]bool) {
	for _, n := range append([]string{"Authorization", identityHeaderPrefix}, identityHeaders...) {
		t[mcprequest.HeaderNameFold(n[0])] = true
	}
	return t
}()

// cleanConnection returns the Connection values without the tokens naming a
// broker-managed header; values is returned as it is when there are none.
func cleanConnection(values []string, subjectHeader string) []string {
	dirty := false
	for _, v := range values {
		for tok := range strings.SplitSeq(v, ",") {
			if brokerManagedHeader(strings.TrimSpace(tok), subjectHeader) {
				dirty = true
			}
		}
	}
	if !dirty {
		return values
	}
	var kept []string
	for _, v := range values {
		for tok := range strings.SplitSeq(v, ",") {
			if tok = strings.TrimSpace(tok); tok != "" && !brokerManagedHeader(tok, subjectHeader) {
				kept = append(kept, tok)
			}
		}
	}
	if len(kept) == 0 {
		return nil
	}
	return []string{strings.Join(kept, ", ")}
}

// brokerCookiePrefix starts the name of every cookie the broker sets (consent.go), now
// and later: an upstream response never sets or clears one. The __Host- and __Secure-
// prefixes (RFC 6265bis §4.1.3) and the letter case are ignored, since some browsers
// match the prefixes case-insensitively.
const brokerCookiePrefix = "mcp_oauth_"

// isBrokerCookie tells whether a Set-Cookie value names one of the broker's cookies. A
// value without '=' is a nameless cookie whose value a server may read as a name, so its
// value is what is matched then.
func isBrokerCookie(setCookie string) bool {
	name, _, _ := strings.Cut(setCookie, ";")
	name, _, _ = strings.Cut(name, "=")
	name = strings.TrimSpace(name)
	for _, p := range []string{"__host-", "__secure-"} {
		if len(name) >= len(p) && strings.EqualFold(name[:len(p)], p) {
			name = name[len(p):]
			break
		}
	}
	return len(name) >= len(brokerCookiePrefix) && strings.EqualFold(name[:len(brokerCookiePrefix)], brokerCookiePrefix)
}

// dropBrokerCookies removes from h every Set-Cookie naming a broker cookie. It reads
// the header and allocates only when there is one to remove.
func dropBrokerCookies(h http.Header) {
	values := h["Set-Cookie"]
	for i, v := range values {
		if !isBrokerCookie(v) {
			continue
		}
		kept := append([]string(nil), values[:i]...)
		for _, v := range values[i+1:] {
			if !isBrokerCookie(v) {
				kept = append(kept, v)
			}
		}
		if len(kept) == 0 {
			delete(h, "Set-Cookie")
		} else {
			h["Set-Cookie"] = kept
		}
		return
	}
}

// corsHeaderPrefix starts the name of every CORS response header (Fetch §3.2.3).
const corsHeaderPrefix = "Access-Control-"

// replaceCORS removes the upstream's CORS headers from h, in any spelling, and sets the
// broker's: any origin may read the response, without credentials, and the headers a
// browser client needs. Some MCP servers allow any origin with credentials (SECURITY.md
// W12, S1.24). One allocation for both values: the slices are the response's own, since
// a later handler (Caddy's header directive) may rewrite them in place.
func replaceCORS(h http.Header) {
	for k := range h {
		if len(k) >= len(corsHeaderPrefix) && strings.EqualFold(k[:len(corsHeaderPrefix)], corsHeaderPrefix) {
			delete(h, k)
		}
	}
	v := make([]string, 2)
	v[0], v[1] = "*", corsExposeHeaders
	h["Access-Control-Allow-Origin"] = v[0:1:1]
	h["Access-Control-Expose-Headers"] = v[1:2:2]
}

// ResponseGuard wraps the writer of a request passed to the upstream: when the upstream
// writes its header, the Set-Cookies naming the broker's cookies are removed, and its
// CORS headers are replaced by the broker's. Get one with GuardResponse and Release it
// when the upstream's handler has returned.
//
// A guard from Broker.GuardResponse also stands for the broker when the upstream refuses
// the token the broker delegated to it (see refusedByUpstream).
type ResponseGuard struct {
	http.ResponseWriter
	wrote bool

	// b, r and who are the broker, the request passed on and its principal, when an
	// upstream 401 is the broker's to answer; b is nil otherwise.
	b   *Broker
	r   *http.Request
	who *idp.Principal
	// refused is set once the upstream's 401 was answered for it: the rest of the
	// upstream's answer is dropped.
	refused bool
}

var guardPool = sync.Pool{New: func() any { return new(ResponseGuard) }}

// GuardResponse returns w guarded against the upstream setting the broker's cookies.
// The guard comes from a pool, so a warm request allocates nothing for it.
func GuardResponse(w http.ResponseWriter) *ResponseGuard {
	g := guardPool.Get().(*ResponseGuard)
	g.ResponseWriter, g.wrote, g.refused = w, false, false
	return g
}

// GuardResponse is the package's GuardResponse for the request pass that Handle passed on
// for who. Where the upstream gets a token the broker delegated (token exchange, refresh),
// an upstream 401 is answered 502 instead (see refusedByUpstream); in modes none and
// app_password the upstream's 401 is its own business and goes to the client.
func (b *Broker) GuardResponse(w http.ResponseWriter, pass *http.Request, who *idp.Principal) *ResponseGuard {
	g := GuardResponse(w)
	if who != nil && b.delegatesTokens() {
		g.b, g.r, g.who = b, pass, who
	}
	return g
}

// delegatesTokens tells whether the upstream gets a token the broker obtained from the IdP.
func (b *Broker) delegatesTokens() bool {
	switch b.cfg.DelegationMode {
	case DelegationNone, DelegationAppPassword:
		return false
	}
	return true
}

// Release returns g to the pool; g must not be used afterwards.
func (g *ResponseGuard) Release() {
	g.ResponseWriter, g.b, g.r, g.who = nil, nil, nil, nil
	guardPool.Put(g)
}

// WriteHeader removes the broker's cookies before any header (1xx included) goes out, and
// sets the broker's CORS headers on the final one.
func (g *ResponseGuard) WriteHeader(status int) {
	if g.refused {
		return
	}
	if status == http.StatusUnauthorized && g.b != nil {
		g.refused, g.wrote = true, true
		g.b.refusedByUpstream(g.ResponseWriter, g.r, g.who)
		return
	}
	h := g.ResponseWriter.Header()
	dropBrokerCookies(h)
	if status >= 200 {
		replaceCORS(h)
		g.wrote = true
	}
	g.ResponseWriter.WriteHeader(status)
}

// Write sends the header first, as net/http does, so that it is checked.
func (g *ResponseGuard) Write(p []byte) (int, error) {
	if g.refused {
		return len(p), nil
	}
	if !g.wrote {
		g.WriteHeader(http.StatusOK)
	}
	return g.ResponseWriter.Write(p)
}

// Flush sends the header first, checked, then flushes: streamed (SSE) responses flush.
func (g *ResponseGuard) Flush() { _ = g.FlushError() }

// FlushError is Flush for http.ResponseController.
func (g *ResponseGuard) FlushError() error {
	if g.refused {
		return nil
	}
	if !g.wrote {
		g.WriteHeader(http.StatusOK)
	}
	return http.NewResponseController(g.ResponseWriter).Flush()
}

// Unwrap lets http.ResponseController reach the writer's Hijack and deadlines.
func (g *ResponseGuard) Unwrap() http.ResponseWriter { return g.ResponseWriter }

// upstreamAnswerHeaders are the headers of an upstream's answer that go with it when the
// broker answers in its place; others (Caddy's own, a header directive's) stay.
var upstreamAnswerHeaders = []string{"WWW-Authenticate", "Content-Type", "Content-Length", "Content-Encoding",
	"Content-Range", "Transfer-Encoding", "ETag", "Last-Modified", "Mcp-Session-Id", "Set-Cookie"}

// refusedByUpstream answers for an upstream that refused, with 401, the token the broker
// delegated to it. Passing the 401 on would send the client to log in again, and again:
// the new session's token would be refused the same way, since what the upstream does not
// accept is the IdP's token (its issuer, audience or type; README "Nextcloud"), not the
// client's. So the client gets 502, the session's delegated tokens on this node are
// dropped (a token revoked at the IdP is fetched anew on the next call), and the log says
// which error the upstream named.
func (b *Broker) refusedByUpstream(w http.ResponseWriter, r *http.Request, who *idp.Principal) {
	h := w.Header()
	named := bearerErrorCode(h.Get("WWW-Authenticate"))
	for _, k := range upstreamAnswerHeaders {
		h.Del(k)
	}
	if who.SessionID != "" {
		b.evictDelegated(who.SessionID)
	}
	b.count(DelegationRefusedUpstream)
	b.writeError(w, r, errServer(http.StatusBadGateway, "the MCP server refused the token the broker delegated to it",
		fmt.Errorf("the upstream answered 401 (error %q) to the delegated token of subject %s: it does not accept the IdP's token for it (issuer, audience, signature or type)", named, who.Subject)))
}

// bearerErrorCode is the `error` attribute of an RFC 6750 challenge, if it is an error
// code's characters (RFC 6749 §A.7) and short; else "".
func bearerErrorCode(challenge string) string {
	_, rest, ok := strings.Cut(challenge, `error="`)
	if !ok {
		return ""
	}
	code, _, ok := strings.Cut(rest, `"`)
	if !ok || len(code) > 64 {
		return ""
	}
	for i := 0; i < len(code); i++ {
		if c := code[i]; c < 0x20 || c > 0x7e || c == '\\' {
			return ""
		}
	}
	return code
}
