package testenv

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// NextcloudMCPSettings are the settings of a NextcloudMCP, named after the Nextcloud MCP
// server's environment.
type NextcloudMCPSettings struct {
	// Issuer is the issuer it accepts in iss: OIDC_ISSUER, else
	// NEXTCLOUD_PUBLIC_ISSUER_URL, else the issuer its discovery found.
	Issuer string
	// NextcloudHost is NEXTCLOUD_HOST, the other iss it accepts (trailing slash dropped).
	NextcloudHost string
	// JWKSURI is where it fetches the IdP's keys (jwks_uri of the IdP's discovery).
	JWKSURI string
	// ClientID is its own OIDC client's id (NEXTCLOUD_OIDC_CLIENT_ID), one aud it accepts.
	ClientID string
	// ServerURL is its NEXTCLOUD_MCP_SERVER_URL, the public URL clients reach it by (behind
	// the broker: the broker's): aud may be it or ServerURL/mcp, and its metadata names it.
	// Default: URL, where it listens.
	ServerURL string
}

// The scopes of a NextcloudMCP's tools: per app, <app>.read and <app>.write.
const (
	NextcloudNotesRead  = "notes.read"
	NextcloudNotesWrite = "notes.write"
)

// NextcloudMCP is a STAND-IN for the Nextcloud MCP server (cbcoutinho/nextcloud-mcp-server)
// in its login_flow deployment mode, as release 0.181.0 validates and filters; that Python
// server cannot be installed here. It mirrors these rules of 0.181.0, read in its token
// verifier, its scope decorator, its tool-list filter, its auth tools and the MCP Python
// SDK 1.29 it pins:
//
//   - A request without a bearer token, or whose token fails the checks below, gets 401
//     with `WWW-Authenticate: Bearer error="invalid_token", error_description="Authentication
//     required", resource_metadata="<URL>/.well-known/oauth-protected-resource"` and that
//     error as JSON (the SDK's RequireAuthMiddleware).
//   - A token with exactly two dots is a JWT: RS256 only, signature by a key of the IdP's
//     JWKS; exp, nbf and iat (not in the future) checked without leeway when present; iss
//     one of Settings.Issuer and Settings.NextcloudHost. Other tokens would be introspected
//     with its own client; the stand-in does not, and refuses them (with the oidc app,
//     introspection answers aud = the client that holds the token, so another client's
//     opaque token never passes the aud rule anyway).
//   - aud (a string or a list; when absent, client_id) must hold its client id, its URL, or
//     <URL>/mcp.
//   - The user is sub (else preferred_username); the scopes are the scope claim, split on
//     white space.
//   - tools/list shows, when the token has any scope, only the tools whose scopes the token
//     holds; tools needing none always; every tool when the token has no scope at all.
//   - tools/call of a tool whose scopes are not all openid/profile/email needs the user
//     provisioned first (an app password stored), else an isError result naming
//     nc_auth_provision_access; then a scope the token lacks is an isError result
//     ("Access denied to <tool>: Missing required scopes: …") in an HTTP 200, never a 403:
//     FastMCP turns the exception its decorator raises into a tool error, so the server's
//     403 insufficient_scope handler is never reached from a tool.
//   - nc_auth_provision_access and nc_auth_check_status need openid: without it a user
//     can never provision, so no data tool ever runs.
//   - Its protected-resource metadata (RFC 9728), at /.well-known/oauth-protected-resource
//     and /.well-known/oauth-protected-resource/mcp: resource <URL>/mcp, scopes_supported
//     every tool scope plus openid, profile, email, offline_access, authorization_servers
//     its own URL (its AS proxy, not served by the stand-in).
//
// Its shortcut: Login Flow v2 with Nextcloud. nc_auth_provision_access answers
// login_required with a login_url on the stand-in itself; a GET of that URL (the user's
// browser, which in Nextcloud logs in and grants the app password, outside the broker)
// provisions the user, and nc_auth_check_status then answers provisioned. The data tools
// keep notes in memory per user: nc_notes_search_notes (notes.read) and
// nc_notes_create_note (notes.write).
type NextcloudMCP struct {
	// URL is where it listens, "http://127.0.0.1:PORT"; the MCP endpoint is URL + "/mcp".
	URL string
	// ServerURL is its NEXTCLOUD_MCP_SERVER_URL: Settings.ServerURL, else URL.
	ServerURL string

	settings NextcloudMCPSettings
	keys     *oidc.RemoteKeySet
	server   *http.Server
	mcp      http.Handler

	mu          sync.Mutex
	seen        []NextcloudMCPRequest
	provisioned map[string]bool   // user → app password stored
	pending     map[string]string // login flow token → user
	notes       map[string][]NextcloudNote
}

// NextcloudMCPRequest is a request a NextcloudMCP received on its MCP endpoint.
type NextcloudMCPRequest struct {
	Method    string
	RPCMethod string
	// TokenSHA256 is the hex SHA-256 of the bearer token, if any.
	TokenSHA256 string
	// Claims are the token's claims once it validated.
	Claims NextcloudMCPClaims
	// Error says why the token did not validate; empty when it did.
	Error string
}

// NextcloudMCPClaims are the claims of a token a NextcloudMCP accepted.
type NextcloudMCPClaims struct {
	Issuer   string
	Audience []string
	Subject  string
	Scopes   []string
	ClientID string
}

// NextcloudNote is a note a NextcloudMCP keeps.
type NextcloudNote struct {
	ID       int    `json:"id"`
	Title    string `json:"title"`
	Content  string `json:"content,omitempty"`
	Category string `json:"category"`
}

// StartNextcloudMCP starts a NextcloudMCP on a loopback port and stops it when the test
// ends.
func StartNextcloudMCP(t testing.TB, s NextcloudMCPSettings) *NextcloudMCP {
	t.Helper()
	if s.JWKSURI == "" || s.ClientID == "" {
		t.Fatal("nextcloud MCP stand-in: want a JWKS URI and a client id")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	n := &NextcloudMCP{
		URL:         "http://" + ln.Addr().String(),
		ServerURL:   s.ServerURL,
		settings:    s,
		provisioned: map[string]bool{},
		pending:     map[string]string{},
		notes:       map[string][]NextcloudNote{},
	}
	if n.ServerURL == "" {
		n.ServerURL = n.URL
	}
	client := &http.Client{Timeout: 5 * time.Second}
	n.keys = oidc.NewRemoteKeySet(oidc.ClientContext(context.Background(), client), s.JWKSURI)

	server := mcp.NewServer(&mcp.Implementation{Name: "Nextcloud MCP (stand-in)", Version: "0.181.0"}, nil)
	n.addTools(server)
	server.AddReceivingMiddleware(n.filterToolsList)
	verdict := func(ctx context.Context, _ string, _ *http.Request) (*auth.TokenInfo, error) {
		if info, ok := ctx.Value(nextcloudVerdictKey{}).(*auth.TokenInfo); ok {
			return info, nil
		}
		return nil, auth.ErrInvalidToken
	}
	n.mcp = auth.RequireBearerToken(verdict, &auth.RequireBearerTokenOptions{AllowMissingExpiration: true})(
		mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return server },
			&mcp.StreamableHTTPOptions{DisableLocalhostProtection: true}))

	mux := http.NewServeMux()
	mux.HandleFunc("/mcp", n.serveMCP)
	mux.HandleFunc("GET /.well-known/oauth-protected-resource", n.serveMetadata)
	mux.HandleFunc("GET /.well-known/oauth-protected-resource/mcp", n.serveMetadata)
	mux.HandleFunc("GET /stand-in/login/v2/flow/{token}", n.serveLoginFlow)
	n.server = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go n.server.Serve(ln)
	t.Cleanup(func() { n.server.Close() })
	return n
}

// nextcloudVerdictKey carries the TokenInfo of a request NextcloudMCP.serveMCP validated
// to go-sdk's auth.RequireBearerToken, which hands it to the tools.
type nextcloudVerdictKey struct{}

// toolRefusal is a tool's refusal, its text as the server words it: go-sdk makes it an
// isError result, as FastMCP does with the exception its scope decorator raises.
type toolRefusal string

func (r toolRefusal) Error() string { return string(r) }

func refusef(format string, args ...any) error { return toolRefusal(fmt.Sprintf(format, args...)) }

// Seen returns the requests its MCP endpoint received so far, oldest first.
func (n *NextcloudMCP) Seen() []NextcloudMCPRequest {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.seen)
}

// Provisioned tells whether user has an app password stored.
func (n *NextcloudMCP) Provisioned(user string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.provisioned[user]
}

func (n *NextcloudMCP) serveMCP(w http.ResponseWriter, r *http.Request) {
	seen := NextcloudMCPRequest{Method: r.Method}
	seen.RPCMethod, _ = peekRPCMethod(r)
	header := r.Header.Get("Authorization")
	var info *auth.TokenInfo
	var err error
	if len(header) > len("bearer ") && strings.EqualFold(header[:len("bearer ")], "bearer ") {
		token := header[len("bearer "):]
		sum := sha256.Sum256([]byte(token))
		seen.TokenSHA256 = hex.EncodeToString(sum[:])
		info, seen.Claims, err = n.verify(r.Context(), token)
	} else {
		err = errors.New("no bearer token")
	}
	if err != nil {
		seen.Error = err.Error()
	}
	n.mu.Lock()
	n.seen = append(n.seen, seen)
	n.mu.Unlock()
	if err != nil {
		const description = "Authentication required"
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer error="invalid_token", error_description=%q, resource_metadata=%q`,
			description, n.ServerURL+"/.well-known/oauth-protected-resource"))
		w.WriteHeader(http.StatusUnauthorized)
		json.NewEncoder(w).Encode(map[string]string{"error": "invalid_token", "error_description": description})
		return
	}
	n.mcp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), nextcloudVerdictKey{}, info)))
}

// verify applies the server's token rules (see NextcloudMCP).
func (n *NextcloudMCP) verify(ctx context.Context, token string) (*auth.TokenInfo, NextcloudMCPClaims, error) {
	var none NextcloudMCPClaims
	if strings.Count(token, ".") != 2 {
		return nil, none, errors.New("opaque token: the stand-in does not introspect")
	}
	if _, err := jose.ParseSignedCompact(token, []jose.SignatureAlgorithm{jose.RS256}); err != nil {
		return nil, none, fmt.Errorf("not an RS256 JWT: %w", err)
	}
	payload, err := n.keys.VerifySignature(ctx, token)
	if err != nil {
		return nil, none, fmt.Errorf("signature: %w", err)
	}
	var c struct {
		Issuer            string          `json:"iss"`
		Audience          json.RawMessage `json:"aud"`
		Subject           string          `json:"sub"`
		PreferredUsername string          `json:"preferred_username"`
		Scope             string          `json:"scope"`
		ClientID          string          `json:"client_id"`
		Expiry            *float64        `json:"exp"`
		NotBefore         *float64        `json:"nbf"`
		IssuedAt          *float64        `json:"iat"`
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return nil, none, fmt.Errorf("claims: %w", err)
	}
	now := float64(time.Now().Unix())
	switch {
	case c.Expiry != nil && *c.Expiry <= now:
		return nil, none, errors.New("expired")
	case c.NotBefore != nil && *c.NotBefore > now:
		return nil, none, errors.New("not yet valid (nbf)")
	case c.IssuedAt != nil && *c.IssuedAt > now:
		return nil, none, errors.New("not yet valid (iat)")
	}
	if issuers := n.validIssuers(); len(issuers) > 0 && !slices.Contains(issuers, c.Issuer) {
		return nil, none, fmt.Errorf("invalid issuer %q, expected one of %q", c.Issuer, issuers)
	}
	var aud []string
	if len(c.Audience) > 0 {
		var one string
		if json.Unmarshal(c.Audience, &one) == nil {
			aud = []string{one}
		} else if json.Unmarshal(c.Audience, &aud) != nil {
			return nil, none, errors.New("aud is neither a string nor a list")
		}
	}
	accepted := aud
	if len(accepted) == 0 && c.ClientID != "" {
		accepted = []string{c.ClientID}
	}
	if !slices.Contains(accepted, n.settings.ClientID) && !slices.Contains(accepted, n.ServerURL) && !slices.Contains(accepted, n.ServerURL+"/mcp") {
		return nil, none, fmt.Errorf("bad audience %q, need %s or %s", aud, n.settings.ClientID, n.ServerURL)
	}
	user := c.Subject
	if user == "" {
		user = c.PreferredUsername
	}
	if user == "" {
		return nil, none, errors.New("no sub or preferred_username")
	}
	claims := NextcloudMCPClaims{Issuer: c.Issuer, Audience: aud, Subject: user, Scopes: strings.Fields(c.Scope), ClientID: c.ClientID}
	info := &auth.TokenInfo{Scopes: claims.Scopes, UserID: user}
	if c.Expiry != nil {
		info.Expiration = time.Unix(int64(*c.Expiry), 0)
	}
	return info, claims, nil
}

func (n *NextcloudMCP) validIssuers() []string {
	var out []string
	if n.settings.Issuer != "" {
		out = append(out, n.settings.Issuer)
	}
	if h := strings.TrimRight(n.settings.NextcloudHost, "/"); h != "" && !slices.Contains(out, h) {
		out = append(out, h)
	}
	return out
}

func (n *NextcloudMCP) serveMetadata(w http.ResponseWriter, _ *http.Request) {
	scopes := []string{"email", "offline_access", "openid", "profile", NextcloudNotesRead, NextcloudNotesWrite}
	slices.Sort(scopes)
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"resource":                              n.ServerURL + "/mcp",
		"scopes_supported":                      scopes,
		"authorization_servers":                 []string{n.ServerURL},
		"bearer_methods_supported":              []string{"header"},
		"resource_signing_alg_values_supported": []string{"RS256"},
	})
}

// serveLoginFlow is the stand-in's shortcut for Login Flow v2: the user's browser opening
// the login URL provisions the user whose flow it is.
func (n *NextcloudMCP) serveLoginFlow(w http.ResponseWriter, r *http.Request) {
	n.mu.Lock()
	user, ok := n.pending[r.PathValue("token")]
	if ok {
		delete(n.pending, r.PathValue("token"))
		n.provisioned[user] = true
	}
	n.mu.Unlock()
	if !ok {
		http.Error(w, "no such login flow", http.StatusNotFound)
		return
	}
	fmt.Fprintln(w, "Nextcloud access granted (stand-in). Return to your MCP client.")
}

// toolScopes are the scopes each tool requires (its @require_scopes).
var toolScopes = map[string][]string{
	"nc_auth_provision_access": {"openid"},
	"nc_auth_check_status":     {"openid"},
	"nc_notes_search_notes":    {NextcloudNotesRead},
	"nc_notes_create_note":     {NextcloudNotesWrite},
}

// identityOnlyScopes are the scopes that assert identity only: tools needing no others
// run for users not yet provisioned.
var identityOnlyScopes = []string{"openid", "profile", "email"}

// filterToolsList hides from tools/list the tools whose scopes the token lacks, when it
// has any scope at all.
func (n *NextcloudMCP) filterToolsList(next mcp.MethodHandler) mcp.MethodHandler {
	return func(ctx context.Context, method string, req mcp.Request) (mcp.Result, error) {
		res, err := next(ctx, method, req)
		list, ok := res.(*mcp.ListToolsResult)
		if method != "tools/list" || err != nil || !ok {
			return res, err
		}
		var held []string
		if extra := req.GetExtra(); extra != nil && extra.TokenInfo != nil {
			held = extra.TokenInfo.Scopes
		}
		if len(held) == 0 {
			return res, nil
		}
		list.Tools = slices.DeleteFunc(list.Tools, func(t *mcp.Tool) bool {
			return slices.ContainsFunc(toolScopes[t.Name], func(s string) bool { return !slices.Contains(held, s) })
		})
		return list, nil
	}
}

// authorize applies the scope decorator of tool to a call: provisioning first (unless the
// tool needs identity scopes only), then the token's scopes.
func (n *NextcloudMCP) authorize(req *mcp.CallToolRequest, tool string) (user string, err error) {
	info := req.Extra.TokenInfo
	if info == nil {
		return "", refusef("Access denied to %s: no verified access token on this request.", tool)
	}
	required := toolScopes[tool]
	if slices.ContainsFunc(required, func(s string) bool { return !slices.Contains(identityOnlyScopes, s) }) {
		n.mu.Lock()
		provisioned := n.provisioned[info.UserID]
		n.mu.Unlock()
		if !provisioned {
			return "", refusef("Access denied to %s: Nextcloud access not provisioned. Please call 'nc_auth_provision_access' first.", tool)
		}
	}
	var missing []string
	for _, s := range required {
		if !slices.Contains(info.Scopes, s) {
			missing = append(missing, s)
		}
	}
	if len(missing) > 0 {
		held := slices.Sorted(slices.Values(info.Scopes))
		has := strings.Join(held, ", ")
		if has == "" {
			has = "none"
		}
		return "", refusef("Access denied to %s: Missing required scopes: %s. Token has scopes: %s. These are OAuth token scopes, not stored app-password scopes: re-authorize to obtain a new token.",
			tool, strings.Join(slices.Sorted(slices.Values(missing)), ", "), has)
	}
	return info.UserID, nil
}

// ProvisionAccess is what nc_auth_provision_access and nc_auth_check_status return.
type ProvisionAccess struct {
	Status   string `json:"status"`
	LoginURL string `json:"login_url,omitempty"`
	Message  string `json:"message"`
	UserID   string `json:"user_id,omitempty"`
}

// NewNote is nc_notes_create_note's argument.
type NewNote struct {
	Title    string `json:"title"`
	Content  string `json:"content"`
	Category string `json:"category"`
}

// NoteSearch is nc_notes_search_notes's argument and NoteSearchResults its result.
type NoteSearch struct {
	Query string `json:"query"`
}

// NoteSearchResults are the notes a search found.
type NoteSearchResults struct {
	Results []NextcloudNote `json:"results"`
}

func (n *NextcloudMCP) addTools(s *mcp.Server) {
	mcp.AddTool(s, &mcp.Tool{Name: "nc_auth_provision_access", Title: "Provision Nextcloud Access",
		Description: "Start Nextcloud Login Flow v2 to obtain an app password."},
		func(_ context.Context, req *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, ProvisionAccess, error) {
			const tool = "nc_auth_provision_access"
			user, err := n.authorize(req, tool)
			if err != nil {
				return nil, ProvisionAccess{}, refusef("Error executing tool %s: %v", tool, err)
			}
			n.mu.Lock()
			defer n.mu.Unlock()
			if n.provisioned[user] {
				return nil, ProvisionAccess{Status: "already_provisioned", Message: "Nextcloud access already provisioned for " + user + ".", UserID: user}, nil
			}
			b := make([]byte, 16)
			rand.Read(b)
			token := hex.EncodeToString(b)
			n.pending[token] = user
			loginURL := n.URL + "/stand-in/login/v2/flow/" + token
			return nil, ProvisionAccess{Status: "login_required", LoginURL: loginURL, UserID: user,
				Message: "Please open this URL in your browser to log in to Nextcloud: " + loginURL + " After logging in, call nc_auth_check_status to complete provisioning."}, nil
		})

	mcp.AddTool(s, &mcp.Tool{Name: "nc_auth_check_status", Title: "Check Nextcloud Access Status",
		Description: "Check if Nextcloud access has been provisioned.", Annotations: &mcp.ToolAnnotations{ReadOnlyHint: true}},
		func(_ context.Context, req *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, ProvisionAccess, error) {
			const tool = "nc_auth_check_status"
			user, err := n.authorize(req, tool)
			if err != nil {
				return nil, ProvisionAccess{}, refusef("Error executing tool %s: %v", tool, err)
			}
			n.mu.Lock()
			defer n.mu.Unlock()
			switch {
			case n.provisioned[user]:
				return nil, ProvisionAccess{Status: "provisioned", Message: "Nextcloud access is provisioned.", UserID: user}, nil
			case slices.Contains(slices.Collect(maps.Values(n.pending)), user):
				return nil, ProvisionAccess{Status: "pending", Message: "Login flow pending.", UserID: user}, nil
			}
			return nil, ProvisionAccess{Status: "not_initiated", Message: "Call nc_auth_provision_access.", UserID: user}, nil
		})

	mcp.AddTool(s, &mcp.Tool{Name: "nc_notes_search_notes", Title: "Search Notes",
		Description: "Search notes by title or content (requires notes.read scope).", Annotations: &mcp.ToolAnnotations{ReadOnlyHint: true}},
		func(_ context.Context, req *mcp.CallToolRequest, in NoteSearch) (*mcp.CallToolResult, NoteSearchResults, error) {
			const tool = "nc_notes_search_notes"
			user, err := n.authorize(req, tool)
			if err != nil {
				return nil, NoteSearchResults{}, refusef("Error executing tool %s: %v", tool, err)
			}
			n.mu.Lock()
			defer n.mu.Unlock()
			out := NoteSearchResults{Results: []NextcloudNote{}}
			for _, note := range n.notes[user] {
				if strings.Contains(note.Title, in.Query) || strings.Contains(note.Content, in.Query) {
					out.Results = append(out.Results, NextcloudNote{ID: note.ID, Title: note.Title, Category: note.Category})
				}
			}
			return nil, out, nil
		})

	mcp.AddTool(s, &mcp.Tool{Name: "nc_notes_create_note", Title: "Create Note",
		Description: "Create a new note (requires notes.write scope).", Annotations: &mcp.ToolAnnotations{DestructiveHint: new(false)}},
		func(_ context.Context, req *mcp.CallToolRequest, in NewNote) (*mcp.CallToolResult, NextcloudNote, error) {
			const tool = "nc_notes_create_note"
			user, err := n.authorize(req, tool)
			if err != nil {
				return nil, NextcloudNote{}, refusef("Error executing tool %s: %v", tool, err)
			}
			n.mu.Lock()
			defer n.mu.Unlock()
			note := NextcloudNote{ID: len(n.notes[user]) + 1, Title: in.Title, Content: in.Content, Category: in.Category}
			n.notes[user] = append(n.notes[user], note)
			return nil, note, nil
		})
}
