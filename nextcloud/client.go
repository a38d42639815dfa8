// Package nextcloud is the broker's client of one Nextcloud server for app passwords
// (delegation mode app_password): Login Flow v2 (start, one-shot poll) and the two OCS
// calls made with an app password (who it authenticates as; delete it). Every answer is
// read bounded, every call is bounded in time, and a brute-force block of the broker's
// address (HTTP 429) is a *ThrottledError with the time to wait. Nothing here logs;
// no error text holds a poll token, login token or app password.
package nextcloud

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Nextcloud's fixed parts of the protocol.
const (
	// FlowLifetime is how long Nextcloud keeps a Login Flow v2: after it, polls answer
	// 404 as for an unknown token.
	FlowLifetime = 1200 * time.Second

	pathLoginFlow   = "/index.php/login/v2"
	pathPoll        = "/index.php/login/v2/poll"
	pathCurrentUser = "/ocs/v2.php/cloud/user"
	pathAppPassword = "/ocs/v2.php/core/apppassword"

	// ocsUnauthorised is OCS's statuscode for "not logged in", answered with HTTP 401 on
	// /ocs/v2.php.
	ocsUnauthorised = 997
)

// Defaults of Config.
const (
	DefaultTimeout   = 10 * time.Second
	DefaultUserAgent = "MCP OAuth broker"
	// DefaultThrottleWait is how long to wait after a 429 that names no Retry-After:
	// Nextcloud's brute-force block lasts while its address made more than 10 failed
	// attempts in the last 30 minutes, and sends none.
	DefaultThrottleWait = 5 * time.Minute
	// maxAnswerBytes bounds every answer read (a flow, credentials, an OCS envelope).
	maxAnswerBytes = 64 << 10
)

// Config is where Nextcloud is and how the broker introduces itself.
type Config struct {
	// URL is where the broker reaches Nextcloud (its base, with any sub-path), possibly
	// an internal address.
	URL string
	// PublicURL is where browsers reach Nextcloud. The login URL Nextcloud answers is
	// built from the host the flow was started on; its scheme and host (and base path)
	// are rewritten to PublicURL's. Default: URL.
	PublicURL string
	// UserAgent names the app password in the user's "Devices & sessions" and is what
	// core.login_flow_v2.allowed_user_agents matches. Default: DefaultUserAgent.
	UserAgent string
	// HTTPClient makes the calls. Default: one with Timeout.
	HTTPClient *http.Client
	// Timeout bounds each call. Default: DefaultTimeout.
	Timeout time.Duration
	// Now is the clock of ThrottledError.Until. Default: time.Now.
	Now func() time.Time
}

// Client calls one Nextcloud server.
type Client struct {
	base, public *url.URL
	userAgent    string
	http         *http.Client
	timeout      time.Duration
	now          func() time.Time
}

// New checks cfg and builds its client. It does not touch the network.
func New(cfg Config) (*Client, error) {
	base, err := parseBase("url", cfg.URL)
	if err != nil {
		return nil, err
	}
	public := base
	if cfg.PublicURL != "" {
		if public, err = parseBase("public_url", cfg.PublicURL); err != nil {
			return nil, err
		}
	}
	c := &Client{base: base, public: public, userAgent: cfg.UserAgent, http: cfg.HTTPClient, timeout: cfg.Timeout, now: cfg.Now}
	if c.userAgent == "" {
		c.userAgent = DefaultUserAgent
	}
	if c.timeout <= 0 {
		c.timeout = DefaultTimeout
	}
	if c.http == nil {
		c.http = &http.Client{Timeout: c.timeout}
	}
	if c.now == nil {
		c.now = time.Now
	}
	return c, nil
}

// parseBase reads a Nextcloud base URL: http or https, a host, no query or fragment.
func parseBase(field, raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	switch {
	case err != nil:
		return nil, fmt.Errorf("%s: %w", field, err)
	case u.Scheme != "https" && u.Scheme != "http", u.Host == "":
		return nil, fmt.Errorf("%s: want an http or https URL with a host, got %q", field, raw)
	case u.RawQuery != "" || u.Fragment != "" || u.User != nil:
		return nil, fmt.Errorf("%s: want no query, fragment or userinfo in %q", field, raw)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawPath = ""
	return u, nil
}

// Flow is a started Login Flow v2.
type Flow struct {
	// LoginURL is where the user's browser grants the app password, on PublicURL.
	LoginURL string
	// PollToken is the secret the broker polls with; whoever holds it gets the app password.
	PollToken string
}

// Credentials are what a granted flow yields once: an app password and the login name
// it goes with. Server is Nextcloud's idea of its own address, informative only.
type Credentials struct {
	Server      string `json:"server"`
	LoginName   string `json:"loginName"`
	AppPassword string `json:"appPassword"`
}

// User is who an app password authenticates as (OCS cloud/user).
type User struct {
	// ID is the Nextcloud user id (uid).
	ID          string `json:"id"`
	DisplayName string `json:"display-name"`
}

// ErrPending means a poll found nothing to take: the flow is not granted yet, or it is
// unknown, expired or already taken (Nextcloud answers all alike, with 404).
var ErrPending = errors.New("nextcloud: login flow not granted (yet), expired or already taken")

// ErrInvalidCredentials means Nextcloud itself refused the app password: an OCS
// answer with HTTP 401 and statuscode 997. Nothing else (a 401 without the OCS envelope,
// a 5xx, a timeout) is taken as a verdict on the password.
var ErrInvalidCredentials = errors.New("nextcloud: the app password is not valid")

// ThrottledError is Nextcloud's brute-force protection blocking the broker's address
// (HTTP 429): no call should be made before Until.
type ThrottledError struct {
	Until time.Time
}

func (e *ThrottledError) Error() string {
	return "nextcloud: brute-force protection throttles the broker's address until " + e.Until.UTC().Format(time.RFC3339)
}

// StatusError is an answer the protocol does not expect, by status; Nextcloud may be
// down, in maintenance (503) or behind a failing proxy.
type StatusError struct {
	Doing  string
	Status int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("nextcloud: %s: unexpected status %d", e.Doing, e.Status)
}

// Unavailable tells whether err says nothing about the credentials: Nextcloud could
// not be asked or gave no verdict (network, timeout, 5xx, unexpected answers, 429).
func Unavailable(err error) bool {
	return err != nil && !errors.Is(err, ErrInvalidCredentials) && !errors.Is(err, ErrPending)
}

// StartLoginFlow starts a Login Flow v2 (POST /index.php/login/v2) with the broker's
// User-Agent, and returns its login URL on PublicURL and its poll token.
func (c *Client) StartLoginFlow(ctx context.Context) (Flow, error) {
	var answer struct {
		Poll struct {
			Token    string `json:"token"`
			Endpoint string `json:"endpoint"`
		} `json:"poll"`
		Login string `json:"login"`
	}
	status, err := c.call(ctx, "starting login flow", http.MethodPost, pathLoginFlow, nil, nil, &answer)
	if err != nil {
		return Flow{}, err
	}
	if status != http.StatusOK {
		return Flow{}, &StatusError{"starting login flow", status}
	}
	if answer.Poll.Token == "" || answer.Login == "" {
		return Flow{}, errors.New("nextcloud: starting login flow: the answer lacks poll.token or login")
	}
	login, err := c.publicLoginURL(answer.Login)
	if err != nil {
		return Flow{}, err
	}
	return Flow{LoginURL: login, PollToken: answer.Poll.Token}, nil
}

// publicLoginURL rewrites the login URL Nextcloud built from the host it was reached on
// to PublicURL: scheme and host replaced, the path kept from Nextcloud's login route
// (/login/v2/flow/{token}, under index.php or not) and put under PublicURL's base path.
func (c *Client) publicLoginURL(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", errors.New("nextcloud: starting login flow: the login URL does not parse")
	}
	i := strings.Index(u.Path, "/login/v2/flow/")
	if i < 0 {
		return "", errors.New("nextcloud: starting login flow: the login URL is not a login flow URL")
	}
	rest := u.Path[i:]
	if strings.HasSuffix(u.Path[:i], "/index.php") {
		rest = "/index.php" + rest
	}
	out := *c.public
	out.Path = c.public.Path + rest
	out.RawQuery = ""
	return out.String(), nil
}

// PollLoginFlow polls a flow once (POST /index.php/login/v2/poll, form field token).
// Nextcloud answers the credentials exactly once and forgets the flow; ErrPending
// otherwise. The poll always goes to URL, whatever endpoint the flow named.
func (c *Client) PollLoginFlow(ctx context.Context, pollToken string) (Credentials, error) {
	form := url.Values{"token": {pollToken}}.Encode()
	h := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}
	var creds Credentials
	status, err := c.call(ctx, "polling login flow", http.MethodPost, pathPoll, h, strings.NewReader(form), &creds)
	switch {
	case err != nil:
		return Credentials{}, err
	case status == http.StatusNotFound:
		return Credentials{}, ErrPending
	case status != http.StatusOK:
		return Credentials{}, &StatusError{"polling login flow", status}
	case creds.LoginName == "" || creds.AppPassword == "":
		return Credentials{}, errors.New("nextcloud: polling login flow: the answer lacks loginName or appPassword")
	}
	return creds, nil
}

// CurrentUser asks who creds authenticate as (GET /ocs/v2.php/cloud/user).
func (c *Client) CurrentUser(ctx context.Context, creds Credentials) (User, error) {
	var data User
	if err := c.ocs(ctx, "asking who the app password is", http.MethodGet, pathCurrentUser, creds, &data); err != nil {
		return User{}, err
	}
	if data.ID == "" {
		return User{}, errors.New("nextcloud: asking who the app password is: the answer names no user id")
	}
	return data, nil
}

// DeleteAppPassword deletes creds' app password in Nextcloud (DELETE
// /ocs/v2.php/core/apppassword, authenticated with it). ErrInvalidCredentials means
// Nextcloud no longer knows it: it is gone already.
func (c *Client) DeleteAppPassword(ctx context.Context, creds Credentials) error {
	return c.ocs(ctx, "deleting app password", http.MethodDelete, pathAppPassword, creds, nil)
}

// ocsEnvelope is an OCS answer in JSON.
type ocsEnvelope struct {
	OCS struct {
		Meta struct {
			Status     string `json:"status"`
			StatusCode int    `json:"statuscode"`
		} `json:"meta"`
		Data json.RawMessage `json:"data"`
	} `json:"ocs"`
}

// ocs makes an OCS v2 call with creds as Basic credentials and reads data into out
// (nil: ignored).
func (c *Client) ocs(ctx context.Context, doing, method, path string, creds Credentials, out any) error {
	h := http.Header{
		"Ocs-Apirequest": {"true"},
		"Accept":         {"application/json"},
		"Authorization":  {basic(creds)},
	}
	var env ocsEnvelope
	status, err := c.call(ctx, doing, method, path+"?format=json", h, nil, &env)
	if err != nil {
		return err // a 401 that is not OCS's envelope among them: no verdict
	}
	switch {
	case status == http.StatusUnauthorized && env.OCS.Meta.StatusCode == ocsUnauthorised:
		return ErrInvalidCredentials
	case status != http.StatusOK || env.OCS.Meta.Status != "ok":
		return &StatusError{doing, status}
	}
	if out != nil {
		if err := json.Unmarshal(env.OCS.Data, out); err != nil {
			return fmt.Errorf("nextcloud: %s: decoding data: %w", doing, err)
		}
	}
	return nil
}

// basic is the Authorization value of creds (RFC 7617).
func basic(creds Credentials) string {
	req := http.Request{Header: http.Header{}}
	req.SetBasicAuth(creds.LoginName, creds.AppPassword)
	return req.Header.Get("Authorization")
}

// BasicAuthorization is the `Authorization: Basic` value the upstream receives for
// creds: base64 of loginName:appPassword (RFC 7617).
func BasicAuthorization(loginName, appPassword string) string {
	return basic(Credentials{LoginName: loginName, AppPassword: appPassword})
}

// call makes one bounded request and decodes a JSON answer into out. It returns the
// status; a 429 is a *ThrottledError. A non-JSON answer of any status other than 200
// is no error of decoding: the status tells.
func (c *Client) call(ctx context.Context, doing, method, path string, h http.Header, body io.Reader, out any) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	target := c.base.Scheme + "://" + c.base.Host + c.base.Path + path
	req, err := http.NewRequestWithContext(ctx, method, target, body)
	if err != nil {
		return 0, fmt.Errorf("nextcloud: %s: %w", doing, err)
	}
	for k, v := range h {
		req.Header[k] = v
	}
	req.Header.Set("User-Agent", c.userAgent)
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, fmt.Errorf("nextcloud: %s: %w", doing, scrub(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusTooManyRequests {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxAnswerBytes))
		return resp.StatusCode, &ThrottledError{Until: c.now().Add(retryAfter(resp.Header.Get("Retry-After"), c.now()))}
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswerBytes+1))
	if err != nil {
		return resp.StatusCode, fmt.Errorf("nextcloud: %s: reading answer: %w", doing, err)
	}
	if len(data) > maxAnswerBytes {
		return resp.StatusCode, fmt.Errorf("nextcloud: %s: answer over %d bytes", doing, maxAnswerBytes)
	}
	if err := json.Unmarshal(data, out); err != nil && resp.StatusCode == http.StatusOK {
		return resp.StatusCode, fmt.Errorf("nextcloud: %s: decoding answer: %w", doing, err)
	} else if err != nil && resp.StatusCode == http.StatusUnauthorized {
		return resp.StatusCode, &StatusError{doing, resp.StatusCode}
	}
	return resp.StatusCode, nil
}

// scrub keeps the URL of a *url.Error out of err's text (it holds no secret here, but
// the text should name what failed, not where).
func scrub(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// retryAfter reads a Retry-After value (RFC 9110 §10.2.3): seconds or an HTTP date;
// DefaultThrottleWait when absent or unreadable, at most an hour.
func retryAfter(v string, now time.Time) time.Duration {
	d := DefaultThrottleWait
	if s, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && s >= 0 {
		d = time.Duration(s) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now)
	}
	return min(max(d, time.Second), time.Hour)
}
