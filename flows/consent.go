package flows

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"html/template"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// The consent page (MCP security best practices, "confused deputy"): the broker reaches
// the IdP with one static client id, so before it sends a browser there for an MCP
// client it asks the user whether that client, named with its id and the host its
// answer goes to, may act for them.
//
// CSRF: the page's form carries the ticket's random CSRF value, and the page sets a
// cookie holding the same value. A POST must carry both, equal to the ticket's; a page
// elsewhere can neither read the value from our page (frame-ancestors 'none', no CORS)
// nor make the browser send the SameSite=Lax cookie with a cross-site POST. Browsers that
// send Sec-Fetch-Site must also say the POST came from our own origin. The ticket is
// taken only after these checks pass, so a forged POST cannot burn it.
//
// Remembered consent: an approval sets a consent cookie, sealed with the storage key
// (AES-GCM: authenticated, so it cannot be forged or edited), listing the approvals as
// (client id, redirect URI, scopes, expiry). A later authorization request from the same
// browser for the same client id and the same redirect URI, with no scope beyond those
// approved, skips the page; only https redirect URIs off loopback are remembered
// (consentMayBeRemembered).
// Anything else gets the page: consent is bound to what the page showed, never to "this
// browser said yes once" (SECURITY.md: a client that registered a second, foreign
// redirect URI must not inherit the approval given for its first).

const (
	// consentRememberFor is how long an approval spares the page for its client.
	consentRememberFor = 7 * 24 * time.Hour
	// maxRememberedApprovals bounds the consent cookie's (client id, redirect URI)
	// entries; the oldest go first, and fewer are kept if they do not fit.
	maxRememberedApprovals = 20
	// maxConsentCookieLen keeps the consent cookie under browsers' 4 KiB per cookie.
	maxConsentCookieLen = 3800
	// maxConsentBody bounds the consent form.
	maxConsentBody = 16 << 10
	// maxTicketLen bounds a ticket before it is hashed (random tickets are 43 bytes).
	maxTicketLen = 128
	// maxShownNameLen bounds the client name on the page.
	maxShownNameLen = 120
)

// consentCookieKey is the associated data of the sealed consent cookie: a value sealed
// for anything else does not open as one.
var consentCookieKey = storage.Key("cookies", "consent")

// secureCookies tells whether the broker is served over https, where its cookies carry
// the __Host- prefix and Secure. On http (loopback development) they have plain names.
func (b *Broker) secureCookies() bool { return strings.HasPrefix(b.issuer, "https://") }

// cookie builds a broker cookie: HttpOnly, SameSite=Lax, and on https __Host- prefixed,
// Secure and on Path=/ (which the prefix requires); on http on httpPath.
func (b *Broker) cookie(name, value, httpPath string, maxAge time.Duration) *http.Cookie {
	c := &http.Cookie{
		Name:     name,
		Value:    value,
		Path:     httpPath,
		MaxAge:   int(maxAge / time.Second),
		HttpOnly: true,
		SameSite: http.SameSiteLaxMode,
	}
	if maxAge < 0 {
		c.MaxAge = -1
	}
	if b.secureCookies() {
		c.Name = "__Host-" + name
		c.Path = "/"
		c.Secure = true
	}
	return c
}

// csrfCookie is the consent page's CSRF cookie for one ticket. The name carries a part
// of the ticket's hash, so two consent pages open in one browser do not overwrite each
// other's value.
func (b *Broker) csrfCookie(ticket, value string, maxAge time.Duration) *http.Cookie {
	return b.cookie("mcp_oauth_csrf_"+storage.Hash(ticket)[:16], value, pathConsent, maxAge)
}

func (b *Broker) consentCookie(value string, maxAge time.Duration) *http.Cookie {
	return b.cookie("mcp_oauth_consent", value, "/oauth", maxAge)
}

// rememberedConsent is the content of the consent cookie.
type rememberedConsent struct {
	Clients []approvedClient `json:"c"`
}

// approvedClient is one approval. Entries without a RedirectURI were written before
// approvals named one; they match nothing.
type approvedClient struct {
	ClientID    string   `json:"i"`
	RedirectURI string   `json:"r,omitempty"`
	Scopes      []string `json:"s"`
	Expires     int64    `json:"x"` // Unix seconds
}

// approves tells whether a is an approval of clientID for redirectURI.
func (a approvedClient) approves(clientID, redirectURI string) bool {
	return a.ClientID == clientID && a.RedirectURI != "" && MatchRedirectURI([]string{a.RedirectURI}, redirectURI)
}

// readConsentCookie returns the approvals of this browser that have not expired; a
// missing, forged or stale cookie reads as none.
func (b *Broker) readConsentCookie(r *http.Request) []approvedClient {
	c, err := r.Cookie(b.consentCookie("", 0).Name)
	if err != nil || c.Value == "" || len(c.Value) > maxConsentCookieLen {
		return nil
	}
	plain, err := b.cookies.open(consentCookieKey, c.Value)
	if err != nil {
		return nil
	}
	var rc rememberedConsent
	if err := json.Unmarshal(plain, &rc); err != nil {
		return nil
	}
	now := b.now().Unix()
	live := rc.Clients[:0]
	for _, a := range rc.Clients {
		if a.Expires > now {
			live = append(live, a)
		}
	}
	return live
}

// consentRemembered tells whether this browser approved clientID with redirectURI for
// every scope in scopes, and the approval has not expired.
func (b *Broker) consentRemembered(r *http.Request, clientID, redirectURI string, scopes []string) bool {
	for _, a := range b.readConsentCookie(r) {
		if !a.approves(clientID, redirectURI) {
			continue
		}
		for _, s := range scopes {
			if !slices.Contains(a.Scopes, s) {
				return false
			}
		}
		return true
	}
	return false
}

// consentMayBeRemembered tells whether an approval for redirectURI may spare the page
// later: only for an https URI off loopback, which the client's own host alone receives.
// Any app on the user's computer can listen on a loopback port or claim a private-use
// scheme, and start the request itself with a public client's id (a metadata document's
// is public): with the approval remembered, it would get a code while the user saw no
// page at all (RFC 8252 §8.6). So for those the page is shown each time (SECURITY.md S1.40),
// and for every other host a browser may send to this computer (S1.42).
func consentMayBeRemembered(redirectURI string) bool {
	u, err := parseRedirectURI(redirectURI)
	if err != nil || u.Scheme != "https" {
		return false
	}
	host, err := asciiHost(u.Hostname())
	return err == nil && !mayBeThisComputer(host)
}

// mayBeThisComputer tells whether a browser may send a request for host (ASCII, lower
// case, as asciiHost gives it) to the user's own computer: a loopback or unspecified
// address, localhost or a name under it (RFC 6761 §6.3), with or without a trailing dot,
// or a host a browser reads as an IPv4 address, which its last label being a number makes
// it (WHATWG URL: 127.1, 0x7f.0.0.1 and 2130706433 are 127.0.0.1), whatever it names.
func mayBeThisComputer(host string) bool {
	h := strings.TrimSuffix(host, ".")
	if h == "localhost" || strings.HasSuffix(h, ".localhost") {
		return true
	}
	if ip := net.ParseIP(h); ip != nil {
		return ip.IsLoopback() || ip.IsUnspecified()
	}
	last := h[strings.LastIndexByte(h, '.')+1:]
	if hex, ok := strings.CutPrefix(last, "0x"); ok {
		return strings.Trim(hex, "0123456789abcdef") == ""
	}
	return last != "" && strings.Trim(last, "0123456789") == ""
}

// rememberConsent adds an approval of clientID with redirectURI for scopes to the
// consent cookie, where consentMayBeRemembered. It keeps the newest approvals that fit;
// failing to seal only costs the user the page next time.
func (b *Broker) rememberConsent(w http.ResponseWriter, r *http.Request, clientID, redirectURI string, scopes []string) {
	if !consentMayBeRemembered(redirectURI) {
		return
	}
	approved := approvedClient{ClientID: clientID, RedirectURI: redirectURI, Scopes: slices.Clone(scopes), Expires: b.now().Add(consentRememberFor).Unix()}
	var kept []approvedClient
	for _, a := range b.readConsentCookie(r) {
		if a.RedirectURI == "" {
			continue // an old entry: it spares nothing
		}
		if a.approves(clientID, redirectURI) {
			for _, s := range a.Scopes {
				if !slices.Contains(approved.Scopes, s) {
					approved.Scopes = append(approved.Scopes, s)
				}
			}
			continue
		}
		kept = append(kept, a)
	}
	kept = append(kept, approved)
	for len(kept) > 0 {
		if len(kept) <= maxRememberedApprovals {
			plain, err := json.Marshal(rememberedConsent{Clients: kept})
			if err != nil {
				return
			}
			sealed, err := b.cookies.seal(consentCookieKey, plain)
			if err != nil {
				b.log.consent.Warn("sealing the consent cookie", zap.Error(err))
				return
			}
			if len(sealed) <= maxConsentCookieLen {
				http.SetCookie(w, b.consentCookie(sealed, consentRememberFor))
				return
			}
		}
		kept = kept[1:] // the oldest approval goes first
	}
}

// serveConsent shows the consent page (GET) and takes the user's decision (POST).
func (b *Broker) serveConsent(w http.ResponseWriter, r *http.Request) {
	var err error
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		err = b.showConsent(w, r)
	case http.MethodPost:
		err = b.decideConsent(w, r)
	default:
		e := errConsentPage(http.StatusMethodNotAllowed, "This address takes only the consent form.")
		e.header, e.value = "Allow", "GET, HEAD, POST"
		err = e
	}
	if err != nil {
		b.writeError(w, r, err)
	}
}

// consentPage is what the consent page shows. Every field is escaped by html/template.
type consentPage struct {
	ClientName   string
	ClientID     string
	ShowID       bool
	RedirectHost string // ASCII (punycode)
	RedirectURI  string // the whole URI, its host in ASCII
	Loopback     bool
	Resource     string
	Scopes       []string
	IdPHost      string
	IdPScopes    []string // every scope the IdP is then asked for
	Ticket       string
	CSRF         string
}

func (b *Broker) showConsent(w http.ResponseWriter, r *http.Request) error {
	ticket := r.URL.Query().Get("ticket")
	ct, err := b.loadConsentTicket(r, ticket)
	if err != nil {
		return err
	}
	req := ct.Request
	client, err := b.findClient(r.Context(), req.ClientID)
	if errors.Is(err, ErrStorageUnavailable) {
		return errConsentUnavailable("The consent request could not be loaded. Try again shortly.", err)
	}
	if err != nil {
		b.log.consent.Warn("client no longer found", zap.String("client_id", req.ClientID), zap.Error(err))
		return errConsentPage(http.StatusBadRequest, "The application asking for access is no longer known. Start again from the application.")
	}
	redirect, err := url.Parse(req.RedirectURI)
	var shownHost, shownURI string
	privateUse := isPrivateUseRedirectURI(req.RedirectURI)
	switch {
	case err == nil && privateUse:
		// A native app's own scheme: the app registered for it gets the access.
		shownHost, shownURI = redirect.Scheme+":", req.RedirectURI
	case err == nil:
		shownHost, shownURI, err = displayRedirect(redirect)
	}
	if err != nil {
		return errConsentPage(http.StatusBadRequest, "The request is not valid. Start again from the application.")
	}
	name := client.Name
	if name == "" {
		name = client.ID
	}
	if utf8.RuneCountInString(name) > maxShownNameLen {
		name = string([]rune(name)[:maxShownNameLen]) + "…"
	}
	scopes := req.Scopes
	if len(scopes) == 0 {
		scopes = []string{"openid"}
	}
	page := consentPage{
		ClientName:   name,
		ClientID:     client.ID,
		ShowID:       name != client.ID,
		RedirectHost: shownHost,
		RedirectURI:  shownURI,
		Loopback:     privateUse || IsLoopbackHost(redirect.Hostname()),
		Resource:     b.cfg.Resource,
		Scopes:       scopes,
		// The same list redirectToIdP sends: the page names everything the IdP is asked.
		IdPScopes: idpLoginScopes(req.Scopes),
		Ticket:    ticket,
		CSRF:      ct.CSRF,
	}
	// The form's POST is answered by a redirect to the IdP, or to the client on deny;
	// browsers apply form-action to those redirects too, so both origins are allowed.
	formAction := []string{"'self'", cspSource(redirect)}
	if d, err := b.idp.Discovery(r.Context()); err == nil {
		if u, err := url.Parse(d.BrowserAuthorizationEndpoint); err == nil {
			formAction = append(formAction, cspSource(u))
			page.IdPHost, _ = asciiHost(u.Hostname())
		}
	}
	consentHeaders(w, formAction)
	http.SetCookie(w, b.csrfCookie(ticket, ct.CSRF, consentTicketTTL))
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return nil
	}
	if err := consentTemplate.Execute(w, page); err != nil {
		b.log.consent.Warn("rendering the page", zap.Error(err))
	}
	return nil
}

func (b *Broker) decideConsent(w http.ResponseWriter, r *http.Request) error {
	r.Body = http.MaxBytesReader(w, r.Body, maxConsentBody)
	if err := r.ParseForm(); err != nil {
		return errConsentPage(http.StatusBadRequest, "The form could not be read. Start again from the application.")
	}
	ticket := r.PostForm.Get("ticket")
	ct, err := b.loadConsentTicket(r, ticket)
	if err != nil {
		return err
	}
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" {
		b.log.consent.Warn("cross-site form post refused", zap.String("client_id", ct.Request.ClientID), zap.String("sec_fetch_site", site))
		return errConsentPage(http.StatusForbidden, "This form was not sent from the consent page. Start again from the application.")
	}
	var cookieValue string
	if c, err := r.Cookie(b.csrfCookie(ticket, "", 0).Name); err == nil {
		cookieValue = c.Value
	}
	form := r.PostForm.Get("csrf")
	if ct.CSRF == "" || !constantTimeEqual(form, ct.CSRF) || !constantTimeEqual(cookieValue, ct.CSRF) {
		b.log.consent.Warn("CSRF check failed", zap.String("client_id", ct.Request.ClientID),
			zap.Bool("form_token", form != ""), zap.Bool("cookie", cookieValue != ""))
		return errConsentPage(http.StatusForbidden, "This form could not be verified. Open the consent page again from the application, in this browser.")
	}
	decision := r.PostForm.Get("decision")
	if decision != "approve" && decision != "deny" {
		return errConsentPage(http.StatusBadRequest, "Choose Approve or Deny.")
	}
	// Only now is the ticket spent: one decision per ticket.
	taken, err := b.consents.take(r.Context(), ticket)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return errConsentPage(http.StatusBadRequest, "This consent request was already answered or has expired. Start again from the application.")
	case err != nil:
		// Not spent, as far as the broker knows: the same form may be sent again.
		return errConsentUnavailable("This consent request could not be answered now. Try again shortly.", storageFailed("consent: taking ticket", err))
	}
	http.SetCookie(w, b.csrfCookie(ticket, "", -1))
	req := taken.Request
	if decision == "deny" {
		b.log.consent.Info("denied", zap.String("client_id", req.ClientID))
		return b.loginFailed(LoginHybrid, LoginFailedConsentDenied,
			newRequestError(http.StatusBadRequest, "access_denied", "the user denied the request").to(req.RedirectURI, req.State, false))
	}
	b.log.consent.Info("approved", zap.String("client_id", req.ClientID))
	b.audit(auditConsentGiven, clientIP(r), zap.String("client_id", req.ClientID), zap.Strings("scopes", req.Scopes))
	b.rememberConsent(w, r, req.ClientID, req.RedirectURI, req.Scopes)
	return b.redirectToIdP(w, r, req)
}

// loadConsentTicket reads the ticket named in a request without spending it, or returns
// the page that says why not.
func (b *Broker) loadConsentTicket(r *http.Request, ticket string) (ConsentTicket, error) {
	var ct ConsentTicket
	if ticket == "" || len(ticket) > maxTicketLen {
		return ct, errConsentPage(http.StatusBadRequest, "This consent request is not valid. Start again from the application.")
	}
	ct, err := b.consents.peek(r.Context(), ticket)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return ct, errConsentPage(http.StatusBadRequest, "This consent request was already answered or has expired. Start again from the application.")
	case err != nil:
		return ct, errConsentUnavailable("The consent request could not be loaded. Try again shortly.", storageFailed("consent: loading ticket", err))
	}
	return ct, nil
}

func constantTimeEqual(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// consentHeaders forbid framing (clickjacking), caching and referrers (the page's URL
// holds the ticket), scripts and every other load; the page needs inline style only.
func consentHeaders(w http.ResponseWriter, formAction []string) {
	h := w.Header()
	h.Set("X-Frame-Options", "DENY")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action "+strings.Join(formAction, " "))
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Content-Type-Options", "nosniff")
}

// cspSource names u's origin as a CSP source. Hosts CSP cannot name (IPv6 literals) or
// that carry characters outside a plain host name get the scheme alone, so nothing from
// a registered URI can add a directive.
func cspSource(u *url.URL) string {
	scheme := "https"
	switch {
	case u.Scheme == "http":
		scheme = "http"
	case u.Scheme != "https" && u.Scheme != "" && isPrivateUseRedirectURI(u.String()):
		// A native app's scheme: a scheme-source (CSP3 §2.3.1) allows the redirect to it.
		return u.Scheme + ":"
	}
	for i := 0; i < len(u.Host); i++ {
		switch c := u.Host[i]; {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '-', c == ':':
		default:
			return scheme + ":"
		}
	}
	return scheme + "://" + u.Host
}

// errConsentPage is an error answered with the consent pages' short page of message.
func errConsentPage(status int, message string) *requestError {
	return errPage(status, func(w http.ResponseWriter, status int) { consentProblem(w, status, message) })
}

// errConsentUnavailable is the consent page's 503 with Retry-After when the broker's
// storage fails: the browser may try again; cause goes to the log.
func errConsentUnavailable(message string, cause error) *requestError {
	e := errConsentPage(http.StatusServiceUnavailable, message).because(cause)
	e.retryAfter = unavailableRetry
	return e
}

// consentProblem answers a browser with a short page saying what went wrong, in fixed
// words. It never redirects: the request behind it is not (or no longer) trusted.
func consentProblem(w http.ResponseWriter, status int, message string) {
	consentHeaders(w, []string{"'none'"})
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	_ = problemTemplate.Execute(w, struct {
		Status  string
		Message string
	}{http.StatusText(status), message})
}

const pageStyle = `<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;background:#f5f5f7;color:#1d1d1f;margin:0}
main{max-width:32rem;margin:4rem auto;background:#fff;border-radius:12px;padding:2rem;box-shadow:0 1px 4px rgba(0,0,0,.12)}
h1{font-size:1.3rem;margin-top:0}code{background:#f0f0f3;padding:.1rem .3rem;border-radius:4px;word-break:break-all}
ul{padding-left:1.2rem}.note{color:#555;font-size:.9rem}
.actions{display:flex;gap:1rem;margin-top:1.5rem}
button{font-size:1rem;padding:.6rem 1.4rem;border-radius:8px;border:1px solid #888;background:#fff;cursor:pointer}
button.approve{background:#0b57d0;border-color:#0b57d0;color:#fff}
</style>`

var consentTemplate = template.Must(template.New("consent").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Allow {{.ClientName}}?</title>` + pageStyle + `</head>
<body><main>
<h1>Allow <strong>{{.ClientName}}</strong> to use {{.Resource}} as you?</h1>
{{if .ShowID}}<p>Application ID: <code>{{.ClientID}}</code></p>{{end}}
<p>After you approve and sign in, your access goes to <strong>{{.RedirectHost}}</strong>{{if .Loopback}} (an application on this computer){{end}}:</p>
<p><code>{{.RedirectURI}}</code></p>
<p>It asks for:</p>
<ul>{{range .Scopes}}<li><code>{{.}}</code></li>{{end}}</ul>
<p>You then sign in at {{if .IdPHost}}<strong>{{.IdPHost}}</strong>{{else}}your identity provider{{end}}, which this server asks for:</p>
<ul>{{range .IdPScopes}}<li><code>{{.}}</code></li>{{end}}</ul>
<p class="note">This server keeps that access for you, and gives the application only what it asks for above.</p>
<p class="note">Approve only if you just started signing in from this application. Anyone can register an application under any name.</p>
<form method="post" action="/oauth/consent">
<input type="hidden" name="ticket" value="{{.Ticket}}">
<input type="hidden" name="csrf" value="{{.CSRF}}">
<div class="actions">
<button class="approve" type="submit" name="decision" value="approve">Approve</button>
<button type="submit" name="decision" value="deny">Deny</button>
</div>
</form>
</main></body></html>
`))

var problemTemplate = template.Must(template.New("problem").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{.Status}}</title>` + pageStyle + `</head>
<body><main><h1>{{.Status}}</h1><p>{{.Message}}</p></main></body></html>
`))
