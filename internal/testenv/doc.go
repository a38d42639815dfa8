// Package testenv runs the real parts the broker's tests talk to, in-process
// on loopback ports: zitadel/oidc's example OpenID Provider ([OP]) and an MCP
// server built with the go-sdk ([Upstream]) that checks the tokens it is sent
// and reports what it saw; [NextcloudMCP] is a stand-in for the Nextcloud MCP server
// in its login_flow mode (its token rules, scope filtering and isError refusals).
// Production code never imports it.
//
// A package's tests share one OP, [SharedOP]; a test that needs its own (with
// options, or for exact counts) uses [StartOP]. [OP.LoginGrant] and
// [OP.LoginAccessToken] get real tokens through the OP's login form;
// [AttackerKey], [SignJWT] and [CompactJWS] forge the tokens it never issued;
// [Redis] starts a redis-server process of the test's own (Debian's; without it
// the test fails under CI and is skipped elsewhere); [Clock] is a clock a test
// moves by hand; [AccessLogFilter] is the README's Caddy access log filter, for
// the tests that hold it to its promise.
//
// The example OP logs every request through slog's default logger at info
// level; a TestMain may raise that logger's level to keep failures readable.
package testenv
