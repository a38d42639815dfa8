package testenv

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/modelcontextprotocol/go-sdk/oauthex"
)

// SubjectHeader names the user of a request to an Upstream that trusts it
// (see TrustedSubjectHeader).
const SubjectHeader = "X-Auth-Subject"

// upstreamClockSkew is how far an Upstream lets exp and nbf miss.
const upstreamClockSkew = 2 * time.Second

// UpstreamAuth says how an Upstream authenticates requests.
type UpstreamAuth struct {
	issuer, jwksURL string
	audiences       []string
	subjectHeader   bool
	basic           bool
}

// AccessTokens makes an Upstream take JWT bearer tokens whose signature checks
// out against the keys at jwksURL, whose iss is issuer exactly, and whose aud
// holds one of audiences (any aud, if none are given). The token must carry
// exp and sub; exp and nbf are checked with 2s of leeway. Anything else is
// refused with 401.
func AccessTokens(issuer, jwksURL string, audiences ...string) UpstreamAuth {
	return UpstreamAuth{issuer: issuer, jwksURL: jwksURL, audiences: audiences}
}

// TrustedSubjectHeader makes an Upstream believe the SubjectHeader of each
// request, as behind a gateway that authenticates users itself; a request
// without the header is refused with 401. A bearer token is ignored.
func TrustedSubjectHeader() UpstreamAuth {
	return UpstreamAuth{subjectHeader: true}
}

// BasicPassThrough makes an Upstream behave as the Nextcloud MCP server in its
// multi_user_basic mode: no request is refused at the gate, and the login name of an
// `Authorization: Basic` header, when there is one, is the caller a tool sees (that
// server hands the header on to Nextcloud, which checks it).
func BasicPassThrough() UpstreamAuth {
	return UpstreamAuth{basic: true}
}

// UpstreamOption configures an Upstream.
type UpstreamOption func(*upstreamConfig)

type upstreamConfig struct {
	scopes          []string
	responseHeaders http.Header
	// metadataScopes, when set, are the scopes_supported of the RFC 9728 document served.
	metadataScopes []string
	stateless      bool
	unrecorded     bool
}

// ProtectedResourceMetadata makes an Upstream serve its RFC 9728 protected-resource
// metadata, with scopes_supported, at MetadataURL (go-sdk's handler), as the Nextcloud
// MCP server does.
func ProtectedResourceMetadata(scopesSupported ...string) UpstreamOption {
	return func(c *upstreamConfig) { c.metadataScopes = append([]string{}, scopesSupported...) }
}

// Stateless makes an Upstream serve MCP 2026-07-28 (go-sdk's stateless mode): no
// sessions, no GET stream, every request carrying its version in _meta and the mirrored
// headers, which the go-sdk checks against the body. A stateful Upstream (the default)
// speaks 2025-11-25 and earlier; go-sdk clients fall back to it.
func Stateless() UpstreamOption {
	return func(c *upstreamConfig) { c.stateless = true }
}

// Unrecorded makes an Upstream keep no SeenRequest, only the counts Served returns, so
// that a long run (the soak) does not hold every request in memory.
func Unrecorded() UpstreamOption {
	return func(c *upstreamConfig) { c.unrecorded = true }
}

// ResponseHeader makes an Upstream add the header to every response it sends, as an
// upstream setting its own (or someone else's) cookies does.
func ResponseHeader(name, value string) UpstreamOption {
	return func(c *upstreamConfig) {
		if c.responseHeaders == nil {
			c.responseHeaders = http.Header{}
		}
		c.responseHeaders.Add(name, value)
	}
}

// RequireScopes makes an Upstream that takes access tokens refuse, with 403,
// those lacking any of scopes.
func RequireScopes(scopes ...string) UpstreamOption {
	return func(c *upstreamConfig) { c.scopes = append(c.scopes, scopes...) }
}

// Identity is who a request to an Upstream came from, as the Upstream
// established it. whoami returns it.
type Identity struct {
	Subject  string   `json:"subject"`
	Audience []string `json:"audience"`
	Scopes   []string `json:"scopes"`
}

// SeenRequest is a request an Upstream received, whether or not it was
// authenticated.
type SeenRequest struct {
	Method string
	Path   string
	Host   string
	Header http.Header
	// Authorization and SubjectHeader are those headers' values.
	Authorization string
	SubjectHeader string
	// RPCMethod is the JSON-RPC method of a POST ("initialize", "tools/call").
	RPCMethod string
	// Body is the body of a POST as received (its first MiB).
	Body []byte
	// Trailer is the request's trailers, read once the body was.
	Trailer http.Header
	// Identity is filled when the request authenticated.
	Identity
	// AuthError says why the request did not authenticate; it is empty when
	// it did.
	AuthError string
}

// Notes is what notes_read and notes_write return: the notes kept for the
// caller.
type Notes struct {
	Subject string   `json:"subject"`
	Notes   []string `json:"notes"`
}

// NoteInput is notes_write's argument.
type NoteInput struct {
	Text string `json:"text" jsonschema:"the note to keep"`
}

// Upstream is an MCP server (go-sdk, Streamable HTTP, stateful sessions) on a
// loopback port, which authenticates every request as its UpstreamAuth says
// and records it. Its tools are whoami (the caller's Identity), notes_read
// and notes_write (a list of notes per subject; notes_read is read-only).
//
// With AccessTokens, the go-sdk binds a session to the subject that opened
// it: a request on it with another subject's token gets 403. The Upstream
// does not check the Host header (no DNS rebinding protection), since a
// proxy in front of it may pass any.
type Upstream struct {
	// URL is the MCP endpoint, "http://127.0.0.1:PORT/mcp".
	URL string
	// MetadataURL is where the RFC 9728 document is served with ProtectedResourceMetadata:
	// "http://127.0.0.1:PORT/.well-known/oauth-protected-resource/mcp".
	MetadataURL string
	// metadata is the document served there (SetScopesSupported changes it).
	metadata atomic.Pointer[oauthex.ProtectedResourceMetadata]

	auth    UpstreamAuth
	keys    *oidc.RemoteKeySet
	handler http.Handler
	server  *http.Server

	unrecorded bool

	mu    sync.Mutex
	seen  []SeenRequest
	notes map[string][]string

	authenticated, refused atomic.Int64 // requests, whether recorded or not
}

// StartUpstream starts an Upstream and stops it when the test ends.
func StartUpstream(t testing.TB, a UpstreamAuth, opts ...UpstreamOption) *Upstream {
	t.Helper()
	u, err := NewUpstream(a, opts...)
	if err != nil {
		t.Fatalf("starting upstream: %v", err)
	}
	t.Cleanup(u.Close)
	return u
}

// NewUpstream starts an Upstream; the caller must Close it.
func NewUpstream(a UpstreamAuth, opts ...UpstreamOption) (*Upstream, error) {
	var cfg upstreamConfig
	for _, opt := range opts {
		opt(&cfg)
	}
	if !a.subjectHeader && !a.basic && (a.issuer == "" || a.jwksURL == "") {
		return nil, errors.New("upstream auth: want AccessTokens with an issuer and a JWKS URL, or TrustedSubjectHeader")
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listening: %w", err)
	}
	u := &Upstream{
		URL:        "http://" + ln.Addr().String() + "/mcp",
		auth:       a,
		notes:      make(map[string][]string),
		unrecorded: cfg.unrecorded,
	}

	server := mcp.NewServer(&mcp.Implementation{Name: "testenv-upstream", Version: "v1.0.0"}, nil)
	u.addTools(server)
	mcpHandler := http.Handler(mcp.NewStreamableHTTPHandler(
		func(*http.Request) *mcp.Server { return server },
		&mcp.StreamableHTTPOptions{DisableLocalhostProtection: true, Stateless: cfg.stateless},
	))
	switch {
	case a.basic:
	case a.subjectHeader:
		mcpHandler = requireSubjectHeader(mcpHandler)
	default:
		// Bounded so that a stalled OP cannot hang a request.
		client := &http.Client{Timeout: 5 * time.Second}
		u.keys = oidc.NewRemoteKeySet(oidc.ClientContext(context.Background(), client), a.jwksURL)
		mcpHandler = auth.RequireBearerToken(verdictOf, &auth.RequireBearerTokenOptions{Scopes: cfg.scopes})(mcpHandler)
	}
	mux := http.NewServeMux()
	mux.Handle("/mcp", mcpHandler)
	if cfg.metadataScopes != nil {
		const path = "/.well-known/oauth-protected-resource/mcp"
		u.MetadataURL = "http://" + ln.Addr().String() + path
		u.SetScopesSupported(cfg.metadataScopes...)
		mux.Handle(path, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			auth.ProtectedResourceMetadataHandler(u.metadata.Load()).ServeHTTP(w, r)
		}))
	}
	u.handler = mux
	if extra := cfg.responseHeaders; extra != nil {
		u.handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			for k, v := range extra {
				w.Header()[k] = append(w.Header()[k], v...)
			}
			mux.ServeHTTP(w, r)
		})
	}

	u.server = &http.Server{Handler: http.HandlerFunc(u.serveHTTP), ReadHeaderTimeout: 10 * time.Second}
	go u.server.Serve(ln)
	return u, nil
}

// SetScopesSupported changes the scopes_supported of the Upstream's protected-resource
// metadata (see ProtectedResourceMetadata).
func (u *Upstream) SetScopesSupported(scopes ...string) {
	u.metadata.Store(&oauthex.ProtectedResourceMetadata{
		Resource:               u.URL,
		ScopesSupported:        scopes,
		BearerMethodsSupported: []string{"header"},
	})
}

// Close stops the Upstream, dropping open connections and streams.
func (u *Upstream) Close() { u.server.Close() }

// Seen returns the requests received so far, oldest first.
func (u *Upstream) Seen() []SeenRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.seen)
}

// Served returns how many requests the Upstream has received that authenticated and how
// many did not, recorded or not (Unrecorded).
func (u *Upstream) Served() (authenticated, refused int64) {
	return u.authenticated.Load(), u.refused.Load()
}

// Reset forgets the requests received so far.
func (u *Upstream) Reset() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.seen = nil
}

type verdictKey struct{}

// verdict is the outcome of authenticating a request, made once in serveHTTP
// and handed to go-sdk's auth.RequireBearerToken through the context.
type verdict struct {
	info *auth.TokenInfo
	err  error
}

// verdictOf is the auth.TokenVerifier of an Upstream taking access tokens.
func verdictOf(ctx context.Context, _ string, _ *http.Request) (*auth.TokenInfo, error) {
	v, ok := ctx.Value(verdictKey{}).(verdict)
	if !ok {
		return nil, errors.New("request was not authenticated")
	}
	return v.info, v.err
}

func (u *Upstream) serveHTTP(w http.ResponseWriter, r *http.Request) {
	seen := SeenRequest{
		Method:        r.Method,
		Path:          r.URL.Path,
		Host:          r.Host,
		Header:        r.Header.Clone(),
		Authorization: r.Header.Get("Authorization"),
		SubjectHeader: r.Header.Get(SubjectHeader),
	}
	seen.RPCMethod, seen.Body = peekRPCMethod(r)
	seen.Trailer = r.Trailer.Clone()
	var v verdict
	if u.auth.basic {
		if login, _, ok := r.BasicAuth(); ok {
			seen.Identity = Identity{Subject: login}
		} else {
			seen.AuthError = "no Basic credentials"
		}
	} else if u.auth.subjectHeader {
		if seen.SubjectHeader == "" {
			seen.AuthError = "no " + SubjectHeader + " header"
		} else {
			seen.Identity = Identity{Subject: seen.SubjectHeader}
		}
	} else {
		v.info, v.err = u.verify(r.Context(), seen.Authorization)
		if v.err != nil {
			seen.AuthError = v.err.Error()
		} else {
			seen.Identity = identityOf(v.info)
		}
	}

	if seen.AuthError == "" {
		u.authenticated.Add(1)
	} else {
		u.refused.Add(1)
	}
	if !u.unrecorded {
		u.mu.Lock()
		u.seen = append(u.seen, seen)
		u.mu.Unlock()
	}

	u.handler.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), verdictKey{}, v)))
}

// peekRPCMethod reads the JSON-RPC method of a POST body and puts the body
// back; it returns the body too.
func peekRPCMethod(r *http.Request) (string, []byte) {
	if r.Method != http.MethodPost || r.Body == nil {
		return "", nil
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	r.Body.Close()
	r.Body = io.NopCloser(bytes.NewReader(body))
	if err != nil {
		return "", body
	}
	var msg struct {
		Method string `json:"method"`
	}
	if json.Unmarshal(body, &msg) != nil {
		return "", body
	}
	return msg.Method, body
}

// verify checks a bearer token as AccessTokens describes.
func (u *Upstream) verify(ctx context.Context, authorization string) (*auth.TokenInfo, error) {
	fields := strings.Fields(authorization)
	if len(fields) != 2 || !strings.EqualFold(fields[0], "bearer") {
		return nil, fmt.Errorf("%w: no bearer token", auth.ErrInvalidToken)
	}
	payload, err := u.keys.VerifySignature(ctx, fields[1])
	if err != nil {
		return nil, fmt.Errorf("%w: %v", auth.ErrInvalidToken, err)
	}
	var claims struct {
		jwt.Claims
		Scope string `json:"scope"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return nil, fmt.Errorf("%w: decoding claims: %v", auth.ErrInvalidToken, err)
	}
	if claims.Expiry == nil {
		return nil, fmt.Errorf("%w: no exp", auth.ErrInvalidToken)
	}
	if claims.Subject == "" {
		return nil, fmt.Errorf("%w: no sub", auth.ErrInvalidToken)
	}
	want := jwt.Expected{Issuer: u.auth.issuer, AnyAudience: u.auth.audiences, Time: time.Now()}
	if err := claims.ValidateWithLeeway(want, upstreamClockSkew); err != nil {
		return nil, fmt.Errorf("%w: %v (iss %q, aud %q)", auth.ErrInvalidToken, err, claims.Issuer, []string(claims.Audience))
	}
	return &auth.TokenInfo{
		Scopes:     strings.Fields(claims.Scope),
		Expiration: claims.Expiry.Time(),
		UserID:     claims.Subject,
		Extra:      map[string]any{"aud": []string(claims.Audience)},
	}, nil
}

func identityOf(info *auth.TokenInfo) Identity {
	aud, _ := info.Extra["aud"].([]string)
	return Identity{Subject: info.UserID, Audience: aud, Scopes: info.Scopes}
}

func requireSubjectHeader(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(SubjectHeader) == "" {
			http.Error(w, "no "+SubjectHeader+" header", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// caller is the Identity of the request a tool is called on.
func caller(req *mcp.CallToolRequest) Identity {
	if req.Extra == nil {
		return Identity{}
	}
	if req.Extra.TokenInfo != nil {
		return identityOf(req.Extra.TokenInfo)
	}
	if login, _, ok := (&http.Request{Header: req.Extra.Header}).BasicAuth(); ok {
		return Identity{Subject: login}
	}
	return Identity{Subject: req.Extra.Header.Get(SubjectHeader)}
}

func (u *Upstream) addTools(s *mcp.Server) {
	readOnly := &mcp.ToolAnnotations{ReadOnlyHint: true}
	additive := &mcp.ToolAnnotations{DestructiveHint: new(false)}

	mcp.AddTool(s, &mcp.Tool{
		Name:        "whoami",
		Description: "Reports the subject, audience and scopes of the token this request carried.",
		Annotations: readOnly,
	}, func(_ context.Context, req *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, Identity, error) {
		return nil, caller(req), nil
	})

	mcp.AddTool(s, &mcp.Tool{
		Name:        "notes_read",
		Description: "Lists the caller's notes.",
		Annotations: readOnly,
	}, func(_ context.Context, req *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, Notes, error) {
		subject := caller(req).Subject
		u.mu.Lock()
		defer u.mu.Unlock()
		return nil, Notes{Subject: subject, Notes: slices.Clone(u.notes[subject])}, nil
	})

	mcp.AddTool(s, &mcp.Tool{
		Name:        "notes_write",
		Description: "Adds a note to the caller's notes.",
		Annotations: additive,
	}, func(_ context.Context, req *mcp.CallToolRequest, in NoteInput) (*mcp.CallToolResult, Notes, error) {
		subject := caller(req).Subject
		u.mu.Lock()
		defer u.mu.Unlock()
		u.notes[subject] = append(u.notes[subject], in.Text)
		return nil, Notes{Subject: subject, Notes: slices.Clone(u.notes[subject])}, nil
	})
}

// BearerClient returns an HTTP client that sends token as a bearer token on
// every request, for an MCP client's transport.
func BearerClient(token string) *http.Client {
	return &http.Client{Transport: bearerTransport{token: token, next: http.DefaultTransport}}
}

type bearerTransport struct {
	token string
	next  http.RoundTripper
}

func (t bearerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+t.token)
	return t.next.RoundTrip(r)
}
