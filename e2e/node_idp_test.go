package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"strings"
	"testing"

	"golang.org/x/net/html"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// Profiles of the npm oidc-provider IdP (interop/idp.mjs).
const (
	profileNextcloud = "nextcloud" // opaque tokens, introspection, no token exchange
	profileKeycloak  = "keycloak"  // JWT tokens, resource → aud, RFC 8693
)

// Credentials of the broker's confidential client at the Node IdP.
const (
	nodeBrokerClientID     = "mcp-broker"
	nodeBrokerClientSecret = "node-idp-broker-secret-0123456789"
	// nodeNativeClientID is a public client, as an MCP client pre-registered at the IdP
	// would be (progressive mode).
	nodeNativeClientID = "mcp-native"
	// nodeUser is who the login helper signs in as, by default.
	nodeUser = "alice"
)

// nodeClient is a client registered at the Node IdP: oidc-provider client metadata.
type nodeClient map[string]any

// nodeBrokerClient is the broker's client. Native, so that a loopback redirect URI
// matches on any port (RFC 8252 §7.3, which oidc-provider implements): the caddy port is
// not known before the IdP starts.
func nodeBrokerClient() nodeClient {
	return nodeClient{
		"client_id":        nodeBrokerClientID,
		"client_secret":    nodeBrokerClientSecret,
		"application_type": "native",
		"redirect_uris":    []string{"http://127.0.0.1/oauth/callback", "http://127.0.0.1/oauth/callback-nextcloud"},
		"grant_types":      []string{"authorization_code", "refresh_token"},
		"response_types":   []string{"code"},
		"client_name":      "mcp_oauth broker",
	}
}

// nodeNativeClient is a public MCP client with a loopback redirect URI.
func nodeNativeClient() nodeClient {
	return nodeClient{
		"client_id":                  nodeNativeClientID,
		"application_type":           "native",
		"token_endpoint_auth_method": "none",
		"redirect_uris":              []string{"http://127.0.0.1/callback"},
		"grant_types":                []string{"authorization_code", "refresh_token"},
		"response_types":             []string{"code"},
	}
}

// NodeIdP is interop/idp.mjs running: oidc-provider on a loopback port.
type NodeIdP struct {
	Issuer          string
	Profile         string
	DefaultAudience string
	proc            *nodeProc
}

// startNodeIdP starts the Node IdP in profile with clients, until the test ends.
func startNodeIdP(t *testing.T, profile string, clients ...nodeClient) *NodeIdP {
	t.Helper()
	return startNodeIdPConfig(t, profile, map[string]any{"clients": clients})
}

// startNodeIdPConfig starts the Node IdP in profile with config (idp.mjs's --config:
// clients, allowedScopes, defaultAudience), until the test ends.
func startNodeIdPConfig(t *testing.T, profile string, config map[string]any) *NodeIdP {
	t.Helper()
	cfg, err := json.Marshal(config)
	if err != nil {
		t.Fatal(err)
	}
	p := startNode(t, "idp.mjs", nil, "--profile", profile, "--port", "0", "--config", string(cfg))
	var hello struct {
		Issuer          string `json:"issuer"`
		DefaultAudience string `json:"defaultAudience"`
	}
	p.ready(&hello)
	if !strings.HasPrefix(hello.Issuer, "http://127.0.0.1:") {
		t.Fatalf("node IdP issuer %q is not on loopback", hello.Issuer)
	}
	return &NodeIdP{Issuer: hello.Issuer, Profile: profile, DefaultAudience: hello.DefaultAudience, proc: p}
}

// Discovery fetches the IdP's OpenID configuration.
func (n *NodeIdP) Discovery(ctx context.Context) (map[string]any, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, n.Issuer+"/.well-known/openid-configuration", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("discovery: %s", resp.Status)
	}
	var d map[string]any
	return d, json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&d)
}

// Logs is what the IdP wrote on stderr (one JSON line per grant and error).
func (n *NodeIdP) Logs() string { return n.proc.stderr.String() }

// nodeLogin configures a Login.
type nodeLogin struct {
	user   string
	client *http.Client
}

// NodeLoginOption configures NodeIdP.Login.
type NodeLoginOption func(*nodeLogin)

// Login plays the user's browser at the IdP, like testenv.OP.Login: it requests
// authorizeURL (the IdP's authorization endpoint or anything that redirects to it),
// follows redirects, fills in devInteractions' login form (any login name is the
// subject; the password is not checked) and confirms its consent form, and returns the
// first URL a redirect points at that is not on the IdP, without requesting it.
func (n *NodeIdP) Login(ctx context.Context, authorizeURL string, opts ...NodeLoginOption) (*url.URL, error) {
	l := nodeLogin{user: nodeUser}
	for _, o := range opts {
		o(&l)
	}
	var c http.Client
	if l.client != nil {
		c = *l.client
	} else {
		jar, _ := cookiejar.New(nil)
		c.Jar = jar
	}
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

	next, err := url.Parse(authorizeURL)
	if err != nil {
		return nil, fmt.Errorf("parsing authorize URL: %w", err)
	}
	var form url.Values
	for range 20 {
		resp, body, err := testenv.Send(ctx, &c, next, form)
		if err != nil {
			return nil, err
		}
		form = nil
		if loc := resp.Header.Get("Location"); resp.StatusCode/100 == 3 && loc != "" {
			target, err := next.Parse(loc)
			if err != nil {
				return nil, fmt.Errorf("parsing redirect from %s: %w", next.Redacted(), err)
			}
			if target.Scheme+"://"+target.Host != n.Issuer {
				return target, nil
			}
			next = target
			continue
		}
		if resp.StatusCode == http.StatusOK && strings.HasPrefix(next.Path, "/interaction/") {
			action, fields := interactionForm(body)
			if action == "" {
				return nil, fmt.Errorf("interaction page without a form: %s", snippetOf(body))
			}
			switch fields.Get("prompt") {
			case "login":
				fields.Set("login", l.user)
				fields.Set("password", "any")
			case "consent":
			default:
				return nil, fmt.Errorf("unknown interaction %q", fields.Get("prompt"))
			}
			target, err := next.Parse(action)
			if err != nil {
				return nil, err
			}
			next, form = target, fields
			continue
		}
		return nil, fmt.Errorf("%s answered %s: %s", next.Redacted(), resp.Status, snippetOf(body))
	}
	return nil, fmt.Errorf("logging in at the node IdP: too many requests")
}

// interactionForm reads devInteractions' form: its action and its inputs with values.
func interactionForm(page []byte) (action string, fields url.Values) {
	doc, err := html.Parse(strings.NewReader(string(page)))
	if err != nil {
		return "", nil
	}
	fields = url.Values{}
	var walk func(*html.Node)
	walk = func(n *html.Node) {
		if n.Type == html.ElementNode {
			attr := map[string]string{}
			for _, a := range n.Attr {
				attr[a.Key] = a.Val
			}
			switch {
			case n.Data == "form" && action == "":
				action = attr["action"]
			case n.Data == "input" && attr["name"] != "":
				fields.Set(attr["name"], attr["value"])
			}
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk(doc)
	return action, fields
}

func snippetOf(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 400 {
		s = s[:400] + "…"
	}
	return s
}
