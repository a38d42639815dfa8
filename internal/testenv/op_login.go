package testenv

import (
	"context"
	"fmt"
	"html"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"strings"
)

// loginPath is where the example OP's login form lives.
const loginPath = "/login/username"

// maxLoginHops bounds the requests one Login makes.
const maxLoginHops = 20

// LoginOption configures a Login.
type LoginOption func(*login)

type login struct {
	user   User
	client *http.Client
}

// LoginAs signs in as u instead of op.User.
func LoginAs(u User) LoginOption {
	return func(l *login) { l.user = u }
}

// LoginWithClient makes the requests with c (its Jar and Transport) instead
// of a fresh client, so that cookies set along the way, by the OP or by
// whatever redirected to it, stay with the caller. Login stops c from
// following redirects itself by using a copy.
func LoginWithClient(c *http.Client) LoginOption {
	return func(l *login) { l.client = c }
}

// Login plays the user's browser. It requests authorizeURL, which may be the
// OP's authorization endpoint or anything that redirects to it, follows
// redirects, fills in the OP's login form as op.User (see LoginAs), and
// returns the first URL a redirect points at that is not on the OP, without
// requesting it: for an authorization request, the client's redirect_uri
// with code and state (or error) in its query.
func (o *OP) Login(ctx context.Context, authorizeURL string, opts ...LoginOption) (*url.URL, error) {
	l := login{user: o.User}
	for _, opt := range opts {
		opt(&l)
	}
	var c http.Client
	if l.client != nil {
		c = *l.client
	} else {
		jar, err := cookiejar.New(nil)
		if err != nil {
			return nil, err
		}
		c.Jar = jar
	}
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

	next, err := url.Parse(authorizeURL)
	if err != nil {
		return nil, fmt.Errorf("parsing authorize URL: %w", err)
	}
	var form url.Values // the login form to post to next, if any
	submitted := false
	for range maxLoginHops {
		resp, body, err := Send(ctx, &c, next, form)
		if err != nil {
			return nil, err
		}
		form = nil

		if loc := resp.Header.Get("Location"); resp.StatusCode/100 == 3 && loc != "" {
			target, err := next.Parse(loc)
			if err != nil {
				return nil, fmt.Errorf("parsing redirect from %s: %w", next, err)
			}
			if !o.serves(target) {
				return target, nil
			}
			next = target
			continue
		}
		if resp.StatusCode == http.StatusOK && o.serves(next) && next.Path == loginPath {
			if submitted {
				return nil, fmt.Errorf("logging in as %s: %s", l.user.Username, loginError(body))
			}
			form = url.Values{
				"id":       {next.Query().Get("authRequestID")},
				"username": {l.user.Username},
				"password": {l.user.Password},
			}
			next = &url.URL{Scheme: next.Scheme, Host: next.Host, Path: loginPath}
			submitted = true
			continue
		}
		return nil, fmt.Errorf("%s answered %s: %s", next.Redacted(), resp.Status, snippet(body))
	}
	return nil, fmt.Errorf("logging in: more than %d requests", maxLoginHops)
}

// serves reports whether u is on the OP.
func (o *OP) serves(u *url.URL) bool {
	return u.Scheme+"://"+u.Host == o.Issuer
}

// Send GETs u, or POSTs form to it, and reads the response (at most 1 MiB): the step of
// a scripted browser login, at this OP or any other.
func Send(ctx context.Context, c *http.Client, u *url.URL, form url.Values) (*http.Response, []byte, error) {
	method, body := http.MethodGet, io.Reader(nil)
	if form != nil {
		method, body = http.MethodPost, strings.NewReader(form.Encode())
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return nil, nil, err
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", u.Redacted(), err)
	}
	return resp, b, nil
}

// loginErrorText finds the message the example login form shows in red.
var loginErrorText = regexp.MustCompile(`<p style="color:red[^"]*">([^<]*)</p>`)

func loginError(page []byte) string {
	if m := loginErrorText.FindSubmatch(page); m != nil && len(strings.TrimSpace(string(m[1]))) > 0 {
		return "login form says " + html.UnescapeString(strings.TrimSpace(string(m[1])))
	}
	return "login form shown again"
}

func snippet(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}
