package mcprequest

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"strings"
)

// MCP 2026-07-28's multi round-trip requests: a server that needs the user's input
// answers a tools/call, prompts/get or resources/read with an InputRequiredResult whose
// inputRequests the client fulfils (an elicitation/create, say) and whose requestState it
// echoes; the client then retries the request with params.inputResponses, keyed as the
// input requests were, and params.requestState. What a request says of this is read by
// Inspect (Message.RoundTrip, URLElicitation, Retry); a broker that answers some input
// requests itself reads its own input with ReadRetry, binds its state to the request
// with RequestDigest, and takes its input out with StripInput before the upstream, which
// never asked for it, sees the request.

// declaresURLElicitation tells whether any of the clientCapabilities values declares
// elicitation with URL mode: {"elicitation": {"url": {...}}}.
func declaresURLElicitation(capabilities *rawValues) bool {
	for i := 0; i < capabilities.n; i++ {
		caps, url := capabilities.at(i), false
		if caps[0] != '{' {
			continue
		}
		jsonMembers(caps, func(key, value []byte) {
			if !keyIs(key, "elicitation") || value[0] != '{' {
				return
			}
			jsonMembers(value, func(key, value []byte) {
				if keyIs(key, "url") && value[0] == '{' {
					url = true
				}
			})
		})
		if url {
			return true
		}
	}
	return false
}

// RetryInput is what a retried request carries for the input requests it answers.
type RetryInput struct {
	// States are the string values of params.requestState, under every spelling.
	States []string
	// Responses are the entries of params.inputResponses, under every spelling, raw;
	// where a key repeats, the last one read.
	Responses map[string]json.RawMessage
}

// ReadRetry reads the requestState and inputResponses of body, a single JSON-RPC request
// (valid JSON, as Inspect found it).
func ReadRetry(body []byte) RetryInput {
	var in RetryInput
	i := skipSpace(body, 0)
	if i >= len(body) || body[i] != '{' {
		return in
	}
	eachParams(body[i:], func(key, value []byte) {
		switch {
		case keyIs(key, "requestState"):
			if s, ok := jsonString(value); ok {
				in.States = append(in.States, s)
			}
		case keyIs(key, "inputResponses") && value[0] == '{':
			jsonMembers(value, func(key, value []byte) {
				if k, ok := jsonString(key); ok {
					if in.Responses == nil {
						in.Responses = make(map[string]json.RawMessage)
					}
					in.Responses[k] = json.RawMessage(value)
				}
			})
		}
	})
	return in
}

// eachParams calls fn with every member of every params object of msg (valid JSON).
func eachParams(msg []byte, fn func(key, value []byte)) {
	jsonMembers(msg, func(key, value []byte) {
		if keyIs(key, "params") && value[0] == '{' {
			jsonMembers(value, fn)
		}
	})
}

// RequestDigest identifies the request body makes apart from its round trip: the
// SHA-256 of its members (method, params) in a canonical JSON form, without id, jsonrpc,
// and params' requestState, inputResponses and _meta, which change between the tries of
// one request. ok is false for a body that is not a JSON object.
func RequestDigest(body []byte) (digest []byte, ok bool) {
	d := json.NewDecoder(bytes.NewReader(body))
	d.UseNumber()
	var msg map[string]any
	if d.Decode(&msg) != nil || msg == nil {
		return nil, false
	}
	for k, v := range msg {
		switch {
		case strings.EqualFold(k, "id"), strings.EqualFold(k, "jsonrpc"):
			delete(msg, k)
		case strings.EqualFold(k, "params"):
			if params, ok := v.(map[string]any); ok {
				for p := range params {
					if strings.EqualFold(p, "requestState") || strings.EqualFold(p, "inputResponses") || strings.EqualFold(p, "_meta") {
						delete(params, p)
					}
				}
			}
		}
	}
	canonical, err := json.Marshal(msg) // map keys sorted, numbers as written
	if err != nil {
		return nil, false
	}
	sum := sha256.Sum256(canonical)
	return sum[:], true
}

// StripInput returns body, a single JSON-RPC request (valid JSON), without the
// params.requestState members whose value own says is the caller's, and without the
// params.inputResponses entries whose key is in keys; an inputResponses left empty goes
// whole. Every spelling of the members counts. The rest is kept as sent, but for the
// whitespace between the members of the objects rewritten; the method, params.name and
// _meta, which the request's headers mirror, are untouched.
func StripInput(body []byte, own func(state string) bool, keys []string) []byte {
	i := skipSpace(body, 0)
	if i >= len(body) || body[i] != '{' {
		return body
	}
	return rewriteObject(body[i:], func(key, value []byte) ([]byte, bool) {
		if !keyIs(key, "params") || value[0] != '{' {
			return value, true
		}
		return rewriteObject(value, func(key, value []byte) ([]byte, bool) {
			switch {
			case keyIs(key, "requestState"):
				s, ok := jsonString(value)
				return value, !ok || !own(s)
			case keyIs(key, "inputResponses") && value[0] == '{':
				kept := 0
				out := rewriteObject(value, func(key, value []byte) ([]byte, bool) {
					k, ok := jsonString(key)
					if ok && contains(keys, k) {
						return nil, false
					}
					kept++
					return value, true
				})
				return out, kept > 0
			}
			return value, true
		}), true
	})
}

// rewriteObject rebuilds obj (a valid JSON object) from the members fn keeps, each with
// the value fn returns.
func rewriteObject(obj []byte, fn func(key, value []byte) ([]byte, bool)) []byte {
	out := make([]byte, 0, len(obj))
	out = append(out, '{')
	jsonMembers(obj, func(key, value []byte) {
		v, keep := fn(key, value)
		if !keep {
			return
		}
		if len(out) > 1 {
			out = append(out, ',')
		}
		out = append(out, key...)
		out = append(out, ':')
		out = append(out, v...)
	})
	return append(out, '}')
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
