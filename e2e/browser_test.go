package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"strings"

	"golang.org/x/net/html"

	"github.com/modelcontextprotocol/go-sdk/auth"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// browser walks a hybrid login as a person would: the broker's authorize URL, its consent
// page (approve), the IdP's login form, the broker's callback, and stops at the client's
// redirect URI. It keeps cookies like a browser.
type browser struct {
	o        *testenv.OP
	client   *http.Client
	approve  bool
	visited  []string // authorize URLs the client sent the browser to
	codes    []string // every code seen, for the log check
	onCode   func()   // runs after the code is in hand, before the client redeems it
	consents int      // consent pages shown
}

func newBrowser(o *testenv.OP) *browser {
	jar, _ := cookiejar.New(nil)
	return &browser{o: o, approve: true, client: &http.Client{
		Jar:           jar,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

// fetch is an auth.AuthorizationCodeFetcher.
func (b *browser) fetch(ctx context.Context, args *auth.AuthorizationArgs) (*auth.AuthorizationResult, error) {
	b.visited = append(b.visited, args.URL)
	final, err := b.login(ctx, args.URL)
	if err != nil {
		return nil, err
	}
	q := final.Query()
	if q.Get("error") != "" {
		return nil, fmt.Errorf("authorization error %q", q.Get("error"))
	}
	b.codes = append(b.codes, q.Get("code"))
	if b.onCode != nil {
		b.onCode()
	}
	return &auth.AuthorizationResult{Code: q.Get("code"), State: q.Get("state"), Iss: q.Get("iss")}, nil
}

// login follows the flow from the broker's authorize URL to the client's redirect URI.
func (b *browser) login(ctx context.Context, authorizeURL string) (*url.URL, error) {
	next, _ := url.Parse(authorizeURL)
	broker := next.Host
	for hops := 0; hops < 20; hops++ {
		switch {
		case next.Host == broker && next.Path == "/oauth/consent":
			u, err := b.consent(ctx, next)
			if err != nil {
				return nil, err
			}
			next = u
		case next.Host == broker && strings.HasPrefix(next.Path, "/oauth/"):
			u, err := b.get(ctx, next)
			if err != nil {
				return nil, err
			}
			next = u
		case b.o.Issuer == next.Scheme+"://"+next.Host:
			u, err := b.o.Login(ctx, next.String())
			if err != nil {
				return nil, err
			}
			next = u
		default:
			return next, nil // the client's redirect URI
		}
	}
	return nil, fmt.Errorf("too many hops")
}

// get requests u and returns where it redirects.
func (b *browser) get(ctx context.Context, u *url.URL) (*url.URL, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	resp, err := b.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if resp.StatusCode != http.StatusFound && resp.StatusCode != http.StatusSeeOther {
		return nil, fmt.Errorf("GET %s: %s: %s", u.Path, resp.Status, body)
	}
	return resp.Request.URL.Parse(resp.Header.Get("Location"))
}

// consent loads the consent page and submits its form with the approve (or deny) button.
func (b *browser) consent(ctx context.Context, u *url.URL) (*url.URL, error) {
	b.consents++
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	resp, err := b.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusFound || resp.StatusCode == http.StatusSeeOther {
		return u.Parse(resp.Header.Get("Location"))
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("consent page: %s", resp.Status)
	}
	action, form, buttons, err := parseForm(resp.Body)
	if err != nil {
		return nil, err
	}
	choice := "deny"
	if b.approve {
		choice = "approve"
	}
	for name, values := range buttons {
		for _, v := range values {
			if strings.Contains(strings.ToLower(v), choice) {
				form.Set(name, v)
			}
		}
	}
	target, err := u.Parse(action)
	if err != nil {
		return nil, err
	}
	post, _ := http.NewRequestWithContext(ctx, http.MethodPost, target.String(), strings.NewReader(form.Encode()))
	post.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	post.Header.Set("Origin", u.Scheme+"://"+u.Host)
	resp2, err := b.client.Do(post)
	if err != nil {
		return nil, err
	}
	defer resp2.Body.Close()
	if resp2.StatusCode != http.StatusFound && resp2.StatusCode != http.StatusSeeOther {
		body, _ := io.ReadAll(io.LimitReader(resp2.Body, 1<<16))
		return nil, fmt.Errorf("consent post: %s: %s", resp2.Status, body)
	}
	return target.Parse(resp2.Header.Get("Location"))
}

// parseForm reads the first POST form of a page: its action, hidden fields and the
// name/value of its submit buttons.
func parseForm(r io.Reader) (action string, fields url.Values, buttons map[string][]string, err error) {
	doc, err := html.Parse(r)
	if err != nil {
		return "", nil, nil, err
	}
	fields, buttons = url.Values{}, map[string][]string{}
	var walk func(n *html.Node)
	walk = func(n *html.Node) {
		if n.Type == html.ElementNode {
			attr := map[string]string{}
			for _, a := range n.Attr {
				attr[a.Key] = a.Val
			}
			switch {
			case n.Data == "form" && action == "":
				action = attr["action"]
			case n.Data == "input" && attr["type"] == "hidden":
				fields.Set(attr["name"], attr["value"])
			case n.Data == "button" || (n.Data == "input" && attr["type"] == "submit"):
				if attr["name"] != "" {
					buttons[attr["name"]] = append(buttons[attr["name"]], attr["value"])
				}
			}
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk(doc)
	if action == "" {
		action = "/oauth/consent"
	}
	return action, fields, buttons, nil
}
