package flows

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"path"
	"strings"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Tools that need the user's offline access grant (OfflineAccessTools) are answered, until the
// user has granted offline access, with a one-time offline access link the client can open
// for the user without a copy-paste step: for MCP 2025-11-25, the URL elicitation error
// (SEP-1036), a JSON-RPC error -32042 whose data lists one URL-mode elicitation carrying
// the link; for 2026-07-28, an input request or a tool error (input_request.go).

// codeURLElicitationRequired is the JSON-RPC error code of URLElicitationRequiredError.
const codeURLElicitationRequired = -32042

// urlElicitation is one entry of the error's data.elicitations (ElicitRequestURLParams).
type urlElicitation struct {
	Mode          string `json:"mode"`
	ElicitationID string `json:"elicitationId"`
	URL           string `json:"url"`
	Message       string `json:"message"`
}

type urlElicitationError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Data    any    `json:"data,omitempty"`
}

type urlElicitationResponse struct {
	JSONRPC string              `json:"jsonrpc"`
	ID      json.RawMessage     `json:"id"`
	Error   urlElicitationError `json:"error"`
}

// jsonrpcRequestID is the part of a JSON-RPC request the answer echoes.
type jsonrpcRequestID struct {
	ID json.RawMessage `json:"id"`
}

// checkOfflineAccess answers a tools/call of a tool that needs the user's offline access grant
// when the user has none (askUser) and tells that it answered. It runs after
// authentication and the scope check, with the body read (in) and put back.
func (b *Broker) checkOfflineAccess(w http.ResponseWriter, r *http.Request, who *idp.Principal, tools []string, in *inputRound) (answered bool, err error) {
	if !b.needsOfflineAccess(tools) {
		return false, nil
	}
	ctx := r.Context()
	_, err = b.loadOfflineAccessGrant(ctx, who.Subject)
	if err == nil {
		return false, nil
	}
	if !errors.Is(err, storage.ErrNotFound) {
		return false, errStorage("offline access: reading offline access grant of subject "+who.Subject, err)
	}
	link, _, err := b.offlineAccessLink(ctx, who)
	if err != nil {
		return false, errStorage("offline access: storing offline access link", err)
	}
	// The user is told which background clients the grant is for before granting it.
	forWhom := ""
	if ids := b.backgroundClientIDs(); len(ids) > 0 {
		forWhom = " for the background clients " + strings.Join(ids, ", ")
	}
	b.log.offline.Info("tool needs offline access; URL elicitation sent", zap.String("subject", who.Subject))
	return true, b.askUser(w, r, who, in, userStep{
		key:     inputKeyOfflineAccess,
		link:    link,
		message: "This tool needs offline access to your account" + forWhom + ". Open " + link + " to grant it, then try again.",
		prompt:  "This tool needs offline access to your account" + forWhom + ". Sign in to grant it, then try again.",
	})
}

// answerURLElicitation answers a JSON-RPC request (or batch, whole) with the URL
// elicitation error of link: message is the error's text, which names the link for
// clients without URL elicitation; prompt is the elicitation's own. The body was read,
// bounded, and put back in r.Body.
func (b *Broker) answerURLElicitation(w http.ResponseWriter, r *http.Request, link, message, prompt string) {
	e := urlElicitationError{
		Code:    codeURLElicitationRequired,
		Message: message,
		Data: map[string][]urlElicitation{"elicitations": {{
			Mode:          "url",
			ElicitationID: randomToken(),
			URL:           link,
			Message:       prompt,
		}}},
	}
	body, _ := io.ReadAll(io.LimitReader(r.Body, b.cfg.MaxBodyBytes))
	var answer any
	if trimmed := bytes.TrimLeft(body, " \t\r\n"); len(trimmed) > 0 && trimmed[0] == '[' {
		// A batch is refused whole, each request answered with the same error.
		var batch []jsonrpcRequestID
		_ = json.Unmarshal(trimmed, &batch)
		out := make([]urlElicitationResponse, 0, len(batch))
		for _, req := range batch {
			if len(req.ID) > 0 {
				out = append(out, urlElicitationResponse{JSONRPC: "2.0", ID: req.ID, Error: e})
			}
		}
		answer = out
	} else {
		var req jsonrpcRequestID
		_ = json.Unmarshal(trimmed, &req)
		if len(req.ID) == 0 {
			req.ID = json.RawMessage("null")
		}
		answer = urlElicitationResponse{JSONRPC: "2.0", ID: req.ID, Error: e}
	}
	allowCORS(w, "GET, POST, DELETE, OPTIONS")
	writeJSON(w, http.StatusOK, answer)
}

// needsOfflineAccess tells whether any of tools matches a OfflineAccessTools glob.
func (b *Broker) needsOfflineAccess(tools []string) bool {
	for _, name := range tools {
		for _, glob := range b.cfg.OfflineAccessTools {
			if ok, _ := path.Match(glob, name); ok {
				return true
			}
		}
	}
	return false
}
