// Command demo starts the whole stack on loopback for a first look: a development IdP (the
// zitadel example OP), a sample MCP server that accepts only delegated tokens, and Caddy
// with mcp_oauth in hybrid mode in front of it on file storage. It prints the MCP URL and the test login, and runs until interrupted.
//
//	go run ./cmd/demo [-port 8080]
package main

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-mcp/oauth-broker/caddyoauthbroker"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

func main() {
	port := flag.Int("port", 8080, "loopback port of the MCP endpoint")
	dataDir := flag.String("data", filepath.Join(os.TempDir(), "mcp_oauth-demo"), "folder of Caddy's file storage")
	flag.Parse()
	slog.SetLogLoggerLevel(slog.LevelWarn)

	op, err := testenv.NewOP()
	if err != nil {
		log.Fatalf("starting the demo IdP: %v", err)
	}
	defer op.Close()
	// The sample MCP server accepts only delegated tokens: audience "nextcloud", signed by the IdP.
	upstream, err := testenv.NewUpstream(testenv.AccessTokens(op.Issuer, op.JWKSURI, "nextcloud"))
	if err != nil {
		log.Fatalf("starting the sample MCP server: %v", err)
	}
	defer upstream.Close()

	key := make([]byte, 32)
	rand.Read(key)
	resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", *port)
	up, _ := url.Parse(upstream.URL)
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
		"storage": map[string]any{"module": "file_system", "root": *dataDir},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "WARN"}}},
		"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"demo": map[string]any{
			"listen":          []string{fmt.Sprintf("127.0.0.1:%d", *port)},
			"automatic_https": map[string]any{"disable": true},
			"routes": []any{map[string]any{"handle": []any{
				map[string]any{
					"handler":         "mcp_oauth",
					"mode":            "hybrid",
					"issuer":          op.Issuer,
					"client_id":       testenv.BrokerClientID,
					"client_secret":   testenv.BrokerClientSecret,
					"resource":        resource,
					"scopes":          []string{"openid", "profile", "notes:read", "notes:write"},
					"encryption_keys": []string{base64.StdEncoding.EncodeToString(key)},
					"clients": []any{map[string]any{
						"client_id": "demo-client", "name": "Demo client",
						"redirect_uris": []string{"http://127.0.0.1/callback", "http://localhost/oauth/callback", "http://localhost/oauth/callback/debug"},
					}},
					"delegation": map[string]any{"mode": "token_exchange", "audience": "nextcloud", "scopes": []string{"notes:read"}},
					"tool_scopes": []any{
						map[string]any{"tool": "notes_write", "scopes": []string{"notes:write"}},
						map[string]any{"tool": "notes_read", "scopes": []string{"notes:read"}},
					},
				},
				map[string]any{"handler": "reverse_proxy", "upstreams": []any{map[string]any{"dial": up.Host}}},
			}}},
		}}}},
	}
	raw, _ := json.Marshal(cfg)
	if err := caddy.Load(raw, true); err != nil {
		log.Fatalf("starting Caddy: %v", err)
	}
	defer caddy.Stop()

	fmt.Printf(`
mcp_oauth demo is running (hybrid mode, token exchange for audience "nextcloud")

  MCP URL            %s
  IdP (issuer)       %s
  login at the IdP   %s / %s
  clients            any client by dynamic registration or a metadata document,
                     or the pre-registered public client "demo-client" (loopback redirects)
  tools              whoami, notes_read (notes:read), notes_write (notes:write)

Try:  curl -i %s      # 401 with the discovery challenge
Point MCP Inspector or any MCP client at the MCP URL: it registers, shows you the
consent page, sends you to the IdP's login, and calls tools with the broker's token;
the sample server only ever sees short-lived delegated tokens.
Ctrl-C stops it.
`, resource, op.Issuer, op.User.Username, op.User.Password, resource)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	<-stop
}
