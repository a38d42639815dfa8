package testenv

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// NextcloudStandIn is a stand-in for the parts of a Nextcloud server that delegation mode
// app_password talks to, since Nextcloud itself (PHP, a database) cannot run here: Login
// Flow v2 and two OCS calls made with an app password (GET /ocs/v2.php/cloud/user, DELETE
// /ocs/v2.php/core/apppassword). It follows Nextcloud's protocol as read in its Login Flow
// v2 controller, service and record mapper, its app password controller, its OCS v2
// responses, its brute-force throttler and its OpenAPI description of the core API:
//
//   - POST /index.php/login/v2 answers 200 {"poll":{"token","endpoint"},"login"}, the URLs
//     built from the host the request reached (absolute route URLs), the poll
//     and login tokens 128 characters of [0-9a-zA-Z], the User-Agent kept as the name of
//     the app password to come.
//   - POST /index.php/login/v2/poll with form field token answers 404 with the body []
//     while the flow is unknown, not granted, expired (1200 s after it started: the
//     mapper's lifetime, checked on each read) or already taken; once granted it answers
//     200 {"server","loginName","appPassword"} exactly once and forgets the flow.
//   - OCS v2 calls with Basic credentials (loginName:appPassword, 72 characters of
//     [0-9a-zA-Z]) answer the OCS JSON envelope; credentials Nextcloud does not know
//     (a deleted app password, or a login name that is not the password's) answer HTTP
//     401 with statuscode 997 "Current user is not logged in".
//
// The browser part (the landing, the auth picker, the grant page with its state token
// and session) is a test hook instead: Grant finishes a flow by its login URL as the
// account a test chooses, which may be another account than the broker's user. Test
// hooks also make it throttle (HTTP 429 with statuscode 429 "Reached maximum delay" and
// no Retry-After, as Nextcloud's brute-force protection answers a blocked address) or
// fail its OCS calls with a status (a 503 for an outage of Nextcloud or its user backend).
type NextcloudStandIn struct {
	// URL is the server's base, "http://127.0.0.1:PORT".
	URL string

	server *http.Server
	// Now is the stand-in's clock; it may be replaced before the first request.
	Now func() time.Time
	// AllowedUserAgents is core.login_flow_v2.allowed_user_agents: when set, Grant
	// refuses a flow whose User-Agent matches none ("Please use original client"), as
	// the auth picker and grant pages do. Set before the first request.
	AllowedUserAgents []*regexp.Regexp

	mu         sync.Mutex
	flows      map[string]*standInFlow // by poll token
	byLogin    map[string]*standInFlow // by login token
	passwords  map[string]*StandInAppPassword
	throttled  bool
	failStatus int
	requests   []StandInRequest
	issued     []string // poll and login tokens, app passwords: the secrets it handed out
}

type standInFlow struct {
	loginToken, userAgent string
	started               time.Time
	loginName, password   string // set once granted
}

// StandInAppPassword is an app password the stand-in issued.
type StandInAppPassword struct {
	UID, LoginName, Name string
	Deleted              bool
}

// StandInRequest is a request the stand-in received, without its credentials.
type StandInRequest struct {
	Method, Path   string
	UserAgent      string
	OCSAPIRequest  string
	BasicLoginName string
}

// StartNextcloudStandIn starts a NextcloudStandIn and stops it when the test ends.
func StartNextcloudStandIn(t testing.TB) *NextcloudStandIn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	n := &NextcloudStandIn{
		URL:       "http://" + ln.Addr().String(),
		Now:       time.Now,
		flows:     map[string]*standInFlow{},
		byLogin:   map[string]*standInFlow{},
		passwords: map[string]*StandInAppPassword{},
	}
	n.server = &http.Server{Handler: http.HandlerFunc(n.serveHTTP), ReadHeaderTimeout: 10 * time.Second}
	go n.server.Serve(ln)
	t.Cleanup(func() { n.server.Close() })
	return n
}

// standInAlphabet is what Nextcloud draws its tokens and app passwords from: digits, lower
// and upper case letters.
const standInAlphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

func standInRandom(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = standInAlphabet[int(b[i])%len(standInAlphabet)]
	}
	return string(b)
}

// standInLifetime is how long Nextcloud keeps a login flow.
const standInLifetime = 1200 * time.Second

func (n *NextcloudStandIn) serveHTTP(w http.ResponseWriter, r *http.Request) {
	seen := StandInRequest{Method: r.Method, Path: r.URL.Path, UserAgent: r.UserAgent(), OCSAPIRequest: r.Header.Get("OCS-APIRequest")}
	login, password, hasBasic := r.BasicAuth()
	seen.BasicLoginName = login
	n.mu.Lock()
	n.requests = append(n.requests, seen)
	n.mu.Unlock()

	switch {
	case r.URL.Path == "/index.php/login/v2" && r.Method == http.MethodPost:
		n.initFlow(w, r)
	case r.URL.Path == "/index.php/login/v2/poll" && r.Method == http.MethodPost:
		n.poll(w, r)
	case strings.HasPrefix(r.URL.Path, "/ocs/v2.php/"):
		n.ocs(w, r, login, password, hasBasic)
	default:
		http.NotFound(w, r)
	}
}

func (n *NextcloudStandIn) initFlow(w http.ResponseWriter, r *http.Request) {
	f := &standInFlow{loginToken: standInRandom(128), userAgent: r.UserAgent(), started: n.Now()}
	poll := standInRandom(128)
	n.mu.Lock()
	n.flows[poll] = f
	n.byLogin[f.loginToken] = f
	n.issued = append(n.issued, poll, f.loginToken)
	n.mu.Unlock()
	base := "http://" + r.Host + "/index.php"
	writeStandInJSON(w, http.StatusOK, map[string]any{
		"poll":  map[string]string{"token": poll, "endpoint": base + "/login/v2/poll"},
		"login": base + "/login/v2/flow/" + f.loginToken,
	})
}

func (n *NextcloudStandIn) poll(w http.ResponseWriter, r *http.Request) {
	token := r.PostFormValue("token")
	n.mu.Lock()
	defer n.mu.Unlock()
	f, ok := n.flows[token]
	if ok && f.started.Before(n.Now().Add(-standInLifetime)) {
		n.dropFlow(token, f) // validateTimestamp deletes what it finds expired
		ok = false
	}
	if !ok || f.password == "" {
		writeStandInJSON(w, http.StatusNotFound, []any{})
		return
	}
	n.dropFlow(token, f)
	writeStandInJSON(w, http.StatusOK, map[string]string{
		"server": "http://" + r.Host, "loginName": f.loginName, "appPassword": f.password,
	})
}

func (n *NextcloudStandIn) dropFlow(poll string, f *standInFlow) {
	delete(n.flows, poll)
	delete(n.byLogin, f.loginToken)
}

func (n *NextcloudStandIn) ocs(w http.ResponseWriter, r *http.Request, login, password string, hasBasic bool) {
	n.mu.Lock()
	throttled, fail := n.throttled, n.failStatus
	n.mu.Unlock()
	switch {
	case throttled:
		writeOCS(w, http.StatusTooManyRequests, 429, "Reached maximum delay", []any{})
		return
	case fail != 0:
		writeOCS(w, fail, fail, "Service unavailable", []any{})
		return
	}
	n.mu.Lock()
	p, ok := n.passwords[password]
	valid := hasBasic && ok && !p.Deleted && p.LoginName == login
	n.mu.Unlock()
	if !valid {
		writeOCS(w, http.StatusUnauthorized, 997, "Current user is not logged in", []any{})
		return
	}
	switch {
	case r.URL.Path == "/ocs/v2.php/cloud/user" && r.Method == http.MethodGet:
		writeOCS(w, http.StatusOK, 200, "OK", map[string]any{
			"enabled": true, "id": p.UID, "display-name": p.UID, "email": nil,
		})
	case r.URL.Path == "/ocs/v2.php/core/apppassword" && r.Method == http.MethodDelete:
		n.mu.Lock()
		p.Deleted = true
		n.mu.Unlock()
		writeOCS(w, http.StatusOK, 200, "OK", []any{})
	default:
		writeOCS(w, http.StatusNotFound, 998, "Invalid query", []any{})
	}
}

// writeOCS writes an OCS v2 JSON answer: status "ok" for 2xx, else "failure".
func writeOCS(w http.ResponseWriter, httpStatus, ocsStatus int, message string, data any) {
	status := "failure"
	if ocsStatus >= 200 && ocsStatus < 300 {
		status = "ok"
	}
	writeStandInJSON(w, httpStatus, map[string]any{"ocs": map[string]any{
		"meta": map[string]any{"status": status, "statuscode": ocsStatus, "message": message},
		"data": data,
	}})
}

func writeStandInJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// Grant finishes the flow whose login URL the broker handed a browser as account uid
// (login name uid) would on Nextcloud's grant page: an app password named after the
// flow's User-Agent is created for uid. It fails for an unknown, expired or taken flow.
func (n *NextcloudStandIn) Grant(loginURL, uid string) error {
	u, err := url.Parse(loginURL)
	if err != nil {
		return err
	}
	i := strings.LastIndex(u.Path, "/login/v2/flow/")
	if i < 0 {
		return errors.New("not a login flow URL")
	}
	token := u.Path[i+len("/login/v2/flow/"):]
	n.mu.Lock()
	defer n.mu.Unlock()
	f, ok := n.byLogin[token]
	if !ok || f.started.Before(n.Now().Add(-standInLifetime)) {
		return errors.New("your login token is invalid or has expired")
	}
	if f.password != "" {
		return errors.New("the flow was granted already")
	}
	if len(n.AllowedUserAgents) > 0 && !slices.ContainsFunc(n.AllowedUserAgents, func(re *regexp.Regexp) bool { return re.MatchString(f.userAgent) }) {
		return errors.New("please use original client")
	}
	f.loginName, f.password = uid, standInRandom(72)
	n.issued = append(n.issued, f.password)
	n.passwords[f.password] = &StandInAppPassword{UID: uid, LoginName: uid, Name: f.userAgent}
	return nil
}

// RevokeAppPasswords deletes uid's app passwords as the user would under Settings,
// Security, Devices & sessions.
func (n *NextcloudStandIn) RevokeAppPasswords(uid string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, p := range n.passwords {
		if p.UID == uid {
			p.Deleted = true
		}
	}
}

// Throttle makes the OCS calls answer 429 as a blocked address, or stop doing so.
func (n *NextcloudStandIn) Throttle(on bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.throttled = on
}

// FailOCS makes the OCS calls answer status (0: stop failing).
func (n *NextcloudStandIn) FailOCS(status int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.failStatus = status
}

// AppPasswords are the app passwords issued so far, deleted ones marked.
func (n *NextcloudStandIn) AppPasswords() []StandInAppPassword {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []StandInAppPassword
	for _, p := range n.passwords {
		out = append(out, *p)
	}
	return out
}

// Requests are the requests received so far, oldest first.
func (n *NextcloudStandIn) Requests() []StandInRequest {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]StandInRequest(nil), n.requests...)
}

// Secrets are the poll tokens, login tokens and app passwords handed out so far, for
// tests that look for them where they must not be.
func (n *NextcloudStandIn) Secrets() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.issued...)
}

// PendingFlows is how many flows are known and not taken.
func (n *NextcloudStandIn) PendingFlows() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.flows)
}
