package flows

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/mcprequest"
)

// A tool call that needs a step only the user can take (granting offline access, an app
// password) is answered by the broker itself, in the way the request's revision asks
// for user input (SECURITY.md S1.26):
//
//   - MCP 2026-07-28 with a client that declares URL-mode elicitation in the request's
//     _meta: an InputRequiredResult whose one input request is a URL-mode
//     elicitation/create of the one-time link, with a request state the client echoes on
//     its retry. On the retry, once the user took the step, the call goes upstream without
//     the broker's own input (its requestState and its inputResponses entry), which the
//     upstream never asked for; until then, the same answer again. A user who declined
//     gets the tool error below.
//   - MCP 2026-07-28 with a client that declares no URL elicitation: a tool result with
//     isError whose text carries the link and says what to do, which the model or the
//     user can act on.
//   - Earlier revisions: the 2025-11-25 URL elicitation error, -32042
//     (offline_access_elicitation.go).
//
// The request state is integrity-protected (an HMAC under a key derived from the key
// ring, store_request_state.go) and binds the user and client, the request (its method
// and parameters, without the round trip's own members) and a short expiry, as the
// multi round-trip pattern's server requirements ask; a state that fails any check is
// refused, never forwarded. It decides nothing but that: whether the user took the step
// is read from storage on every try, so a replayed state gains nothing.

// The keys of the broker's input requests, one per step; any other key of a retry's
// inputResponses is the upstream's and goes on untouched.
const (
	inputKeyOfflineAccess = "mcp_oauth/offline_access"
	inputKeyAppPassword   = "mcp_oauth/app_password"
)

var inputKeys = []string{inputKeyOfflineAccess, inputKeyAppPassword}

// requestStatePrefix starts every request state the broker issues; a requestState
// without it is the upstream's, passed on untouched.
const requestStatePrefix = "mcp_oauth.rs1."

// requestStateTTL bounds how long a request state is accepted: as long as the one-time
// link it came with can be opened.
const requestStateTTL = 10 * time.Minute

// maxRequestStateLen bounds the request state the broker reads: its own are under 200
// bytes.
const maxRequestStateLen = 512

// requestState is what a request state says, tagged: whom, which request, until when.
type requestState struct {
	// Principal is the SHA-256 of the subject and client the state was issued to.
	Principal []byte `json:"p"`
	// Request is mcprequest.RequestDigest of the request it answered.
	Request []byte `json:"r"`
	// Expires is when the state stops being accepted, in Unix seconds.
	Expires int64 `json:"e"`
}

// requestStateRefused is the message refusing a retry whose request state the broker
// issued (by its prefix) but which fails a check. It says which checks there are, not
// which one failed.
const requestStateRefused = "Invalid params: the requestState was not issued by this server for this user and request, or it expired; call the tool again without it"

// inputRound is what admit read of a request for the broker's own input requests.
type inputRound struct {
	msg mcprequest.Message
	// own tells whether the body carries the broker's request state or inputResponses
	// entries, checked: they are stripped before the upstream sees the request.
	own bool
	// actions are the user's answers to the broker's input requests, by key ("accept",
	// "decline", "cancel").
	actions map[string]string
}

// readInputRound reads and checks the broker's own input in a 2026-07-28 retry into in,
// whose msg is set. A request state of the broker's that fails a check refuses the
// request.
func (b *Broker) readInputRound(who *idp.Principal, in *inputRound) error {
	msg := in.msg
	if !msg.RoundTrip || !msg.Retry {
		return nil
	}
	retry := mcprequest.ReadRetry(msg.Body)
	for _, s := range retry.States {
		if !isBrokerRequestState(s) {
			continue
		}
		if !b.checkRequestState(s, who, msg.Body) {
			e := newRequestError(http.StatusBadRequest, "invalid_request", requestStateRefused)
			e.rpc, e.cors = &rpcError{code: codeInvalidParams, id: msg.ID}, mcpMethods
			return e
		}
		in.own = true
	}
	for _, key := range inputKeys {
		raw, ok := retry.Responses[key]
		if !ok {
			continue
		}
		in.own = true
		var result struct {
			Action string `json:"action"`
		}
		_ = json.Unmarshal(raw, &result) // an unreadable answer is no answer
		if in.actions == nil {
			in.actions = make(map[string]string, len(inputKeys))
		}
		in.actions[key] = result.Action
	}
	return nil
}

// codeInvalidParams is JSON-RPC's Invalid params.
const codeInvalidParams = -32602

func isBrokerRequestState(s string) bool { return strings.HasPrefix(s, requestStatePrefix) }

// principalDigest binds a request state to the user and the client that hold it.
func principalDigest(who *idp.Principal) []byte {
	h := sha256.New()
	h.Write([]byte(who.Subject))
	h.Write([]byte{0})
	h.Write([]byte(who.ClientID))
	return h.Sum(nil)
}

// issueRequestState returns a request state for the request body of who: prefix,
// base64url of the JSON payload, '.', its tag.
func (b *Broker) issueRequestState(who *idp.Principal, body []byte) (string, error) {
	digest, ok := mcprequest.RequestDigest(body)
	if !ok {
		return "", errors.New("the request has no digest")
	}
	payload, err := json.Marshal(requestState{Principal: principalDigest(who), Request: digest, Expires: b.now().Add(requestStateTTL).Unix()})
	if err != nil {
		return "", err
	}
	tag, err := b.requestStates.tag(payload)
	if err != nil {
		return "", err
	}
	return requestStatePrefix + base64.RawURLEncoding.EncodeToString(payload) + "." + tag, nil
}

// checkRequestState tells whether s is a request state the broker issued to who for the
// request body, unexpired.
func (b *Broker) checkRequestState(s string, who *idp.Principal, body []byte) bool {
	if len(s) > maxRequestStateLen {
		return false
	}
	encoded, tag, ok := strings.Cut(strings.TrimPrefix(s, requestStatePrefix), ".")
	if !ok {
		return false
	}
	payload, err := base64.RawURLEncoding.DecodeString(encoded)
	if err != nil || !b.requestStates.check(payload, tag) {
		return false
	}
	var st requestState
	if json.Unmarshal(payload, &st) != nil || b.now().Unix() >= st.Expires {
		return false
	}
	digest, ok := mcprequest.RequestDigest(body)
	return ok && subtle.ConstantTimeCompare(st.Principal, principalDigest(who)) == 1 &&
		subtle.ConstantTimeCompare(st.Request, digest) == 1
}

// stripOwnInput takes the broker's own input out of a retry that goes upstream: its
// request state and its inputResponses entries. What the headers mirror stays as it
// was.
func stripOwnInput(r *http.Request, in *inputRound) {
	if !in.own {
		return
	}
	body := mcprequest.StripInput(in.msg.Body, isBrokerRequestState, inputKeys)
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	if r.Header.Get("Content-Length") != "" {
		r.Header.Set("Content-Length", strconv.Itoa(len(body)))
	}
}

// userStep is a step only the user can take before a tool call can go on.
type userStep struct {
	// key is the broker's input request for it (inputKeys).
	key  string
	link string
	// message names the link and says what to do, for a client that cannot open it:
	// the 2025-11-25 error's message and the 2026-07-28 tool error's text.
	message string
	// prompt is the elicitation's own message, shown beside the link.
	prompt string
}

// The answers to a 2026-07-28 request (MCP 2026-07-28 schema: InputRequiredResult,
// ElicitRequestURLParams, CallToolResult).
type (
	urlElicitRequest struct {
		Method string                `json:"method"`
		Params urlElicitRequestParam `json:"params"`
	}
	urlElicitRequestParam struct {
		Mode    string `json:"mode"`
		Message string `json:"message"`
		URL     string `json:"url"`
	}
	inputRequiredResult struct {
		ResultType    string                      `json:"resultType"`
		InputRequests map[string]urlElicitRequest `json:"inputRequests"`
		RequestState  string                      `json:"requestState"`
	}
	toolErrorResult struct {
		ResultType string        `json:"resultType"`
		Content    []textContent `json:"content"`
		IsError    bool          `json:"isError"`
	}
	textContent struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	jsonrpcResult struct {
		JSONRPC string          `json:"jsonrpc"`
		ID      json.RawMessage `json:"id"`
		Result  any             `json:"result"`
	}
)

// askUser answers a tool call with step in the way its revision asks for user input
// (see the top of this file).
func (b *Broker) askUser(w http.ResponseWriter, r *http.Request, who *idp.Principal, in *inputRound, step userStep) error {
	if !in.msg.RoundTrip {
		b.answerURLElicitation(w, r, step.link, step.message, step.prompt)
		return nil
	}
	id := json.RawMessage(in.msg.ID)
	if len(id) == 0 {
		id = json.RawMessage("null")
	}
	var result any = toolErrorResult{ResultType: "complete", Content: []textContent{{Type: "text", Text: step.message}}, IsError: true}
	if in.msg.URLElicitation && in.actions[step.key] != "decline" {
		state, err := b.issueRequestState(who, in.msg.Body)
		if err != nil {
			return errServer(http.StatusInternalServerError, "the request state could not be issued", err)
		}
		result = inputRequiredResult{
			ResultType: "input_required",
			InputRequests: map[string]urlElicitRequest{step.key: {
				Method: "elicitation/create",
				Params: urlElicitRequestParam{Mode: "url", Message: step.prompt, URL: step.link},
			}},
			RequestState: state,
		}
	}
	allowCORS(w, mcpMethods)
	writeJSON(w, http.StatusOK, jsonrpcResult{JSONRPC: "2.0", ID: id, Result: result})
	return nil
}
