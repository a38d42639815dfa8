package flows

import (
	"net/http"
	"path"

	"github.com/caddy-mcp/oauth-broker/mcprequest"
)

// requiredScopes reads a JSON-RPC body (one request or a batch) and returns the scopes
// its `tools/call`s need under the configured rules, with what was read (msg.Tools, the
// tools called). The body is read at most once, up to the bound, and put back for the
// upstream.
//
// While any rule applies (a tool_scope rule or an offline access tool), the request must be
// framed the one way the check reads it, or it is refused (SECURITY.md S1.10): see
// mcprequest.Inspect. Having read the body, the broker is a party that processes it, so
// the MCP request headers that mirror it (MCP 2026-07-28) must match it or the request is
// refused with HeaderMismatch (SECURITY.md S1.23); the tools whose scopes are checked are
// the body's, which the headers were found to mirror. A request no rule applies to is not
// read: the broker only forwards it, as an intermediary that does not process the body,
// and the upstream, which does, checks its headers.
func (b *Broker) requiredScopes(w http.ResponseWriter, r *http.Request) (need []string, msg mcprequest.Message, err *requestError) {
	if len(b.toolScopes) == 0 && len(b.cfg.OfflineAccessTools) == 0 && b.appPasswords == nil {
		return nil, msg, nil
	}
	msg, refused := mcprequest.Inspect(w, r, b.cfg.MaxBodyBytes)
	if refused != nil {
		e := errRefusal(refused)
		if e.rpc != nil {
			e.rpc.id = msg.ID
		}
		return nil, msg, e
	}
	for _, name := range msg.Tools {
		for _, s := range b.scopesForTool(name) {
			need = appendUnique(need, s)
		}
	}
	return need, msg, nil
}

// errRefusal is the answer to a request mcprequest refused: 4xx invalid_request, with
// the header the refusal names; or, for the MCP transport's own refusals, the JSON-RPC
// error it names. Either is readable by browser clients, as the MCP endpoint's other
// answers are (SECURITY.md W12).
func errRefusal(refused *mcprequest.Refusal) *requestError {
	e := newRequestError(refused.Status, "invalid_request", refused.Description)
	e.header, e.value = refused.Header, refused.Value
	if refused.RPCCode != 0 {
		e.rpc = &rpcError{code: refused.RPCCode}
		e.cors = mcpMethods
	}
	return e
}

// scopesForTool returns the scopes of the first rule whose pattern matches name.
func (b *Broker) scopesForTool(name string) []string {
	for _, rule := range b.toolScopes {
		if ok, _ := path.Match(rule.Tool, name); ok {
			return rule.Scopes
		}
	}
	return nil
}

func appendUnique(list []string, s string) []string {
	for _, x := range list {
		if x == s {
			return list
		}
	}
	return append(list, s)
}
