package flows

import (
	"net/http"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// Binding a login at the IdP to the browser that started it (SECURITY.md, "IdP login
// not bound to the browser"). The URL the broker sends a browser to at the IdP carries
// everything needed to come back to the broker's callback; without a binding, anyone who
// stops at that redirect (after approving their own consent page) could send the URL to
// a victim, whose login at the IdP would then finish the attacker's request and send the
// code to the attacker's redirect URI.
//
// So when the broker sends a browser to the IdP it sets a random cookie there and keeps
// only its hash with the pending login; the callback compares the two, in constant time,
// before it takes the pending login. A browser without the cookie gets a page saying so
// and nothing else: no code, no redirect to the client, and the pending login is left
// for the browser that has the cookie. Each login has its own cookie, named after its
// state, so that logins in several tabs of one browser do not overwrite each other's;
// each lives as long as its pending login and is cleared when the login finishes.

// loginCookiePrefix starts the name of every login binding cookie.
const loginCookiePrefix = "mcp_oauth_login_"

// loginBindingCookie is the binding cookie of the login under state; on http it is sent
// only to callbackPath.
func (b *Broker) loginBindingCookie(state, value, callbackPath string, maxAge time.Duration) *http.Cookie {
	return b.cookie(loginCookiePrefix+storage.Hash(state)[:16], value, callbackPath, maxAge)
}

// bindLoginToBrowser sets a fresh binding cookie for the login under state and returns
// the hash to store with the pending login.
func (b *Broker) bindLoginToBrowser(w http.ResponseWriter, state, callbackPath string, ttl time.Duration) string {
	value := randomToken()
	http.SetCookie(w, b.loginBindingCookie(state, value, callbackPath, ttl))
	return storage.Hash(value)
}

// loginBoundToBrowser tells whether r carries the binding cookie whose hash is binding.
// A pending login stored without a binding matches no browser.
func (b *Broker) loginBoundToBrowser(r *http.Request, state, binding string) bool {
	c, err := r.Cookie(b.loginBindingCookie(state, "", "", 0).Name)
	if err != nil || c.Value == "" || len(c.Value) > maxTicketLen || binding == "" {
		return false
	}
	return constantTimeEqual(storage.Hash(c.Value), binding)
}

// clearLoginBinding removes the binding cookie of a finished login.
func (b *Broker) clearLoginBinding(w http.ResponseWriter, state, callbackPath string) {
	http.SetCookie(w, b.loginBindingCookie(state, "", callbackPath, -1))
}

// notThisBrowserMessage is what a browser without the login's cookie reads.
const notThisBrowserMessage = "This sign-in was started in another browser (or this browser did not keep its cookie), " +
	"so it cannot be finished here and nothing was sent to the application. " +
	"If you did not start it, close this page. Otherwise Start again from the application, in this browser, and allow cookies for this site."
