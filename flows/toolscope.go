package flows

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"path"
)

// toolsCall is the part of a JSON-RPC request the scope check reads.
type toolsCall struct {
	Method string `json:"method"`
	Params struct {
		Name string `json:"name"`
	} `json:"params"`
}

var toolsCallMethod = []byte(`"tools/call"`)

// requiredScopes reads a JSON-RPC body (one request or a batch) and returns the scopes
// its `tools/call`s need under the configured rules, with the tools called. The body is read at most once, up to
// the bound, and put back for the upstream. A body over the bound is refused (413) rather
// than passed on unchecked; one that cannot be read is a 400.
func (b *Broker) requiredScopes(w http.ResponseWriter, r *http.Request) (need, tools []string, status int) {
	if (len(b.toolScopes) == 0 && len(b.cfg.ProvisioningTools) == 0) || r.Method != http.MethodPost || r.Body == nil || r.Body == http.NoBody {
		return nil, nil, 0
	}
	limit := b.cfg.MaxBodyBytes
	if r.ContentLength > limit {
		return nil, nil, http.StatusRequestEntityTooLarge
	}
	body, status := readBody(w, r, limit)
	if status != 0 {
		return nil, nil, status
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	// Most MCP traffic is not a tool call: skip decoding it.
	if !bytes.Contains(body, toolsCallMethod) {
		return nil, nil, 0
	}
	tools = toolNames(body)
	for _, name := range tools {
		for _, s := range b.scopesForTool(name) {
			need = appendUnique(need, s)
		}
	}
	return need, tools, 0
}

// readBody reads a request body of at most limit bytes: in one allocation when its length
// is declared (the server stops the body there), else growing up to the bound.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, int) {
	if n := r.ContentLength; n >= 0 {
		body := make([]byte, n)
		if _, err := io.ReadFull(r.Body, body); err != nil {
			return nil, http.StatusBadRequest
		}
		return body, 0
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, http.StatusRequestEntityTooLarge
		}
		return nil, http.StatusBadRequest
	}
	return body, 0
}

// toolNames lists the tools called by a JSON-RPC request or batch. A body that does not
// decode yields none: the upstream answers it with its own JSON-RPC error.
func toolNames(body []byte) []string {
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	if len(trimmed) > 0 && trimmed[0] == '[' {
		var batch []toolsCall
		if json.Unmarshal(trimmed, &batch) != nil {
			return nil
		}
		var names []string
		for _, c := range batch {
			if c.Method == "tools/call" {
				names = append(names, c.Params.Name)
			}
		}
		return names
	}
	var c toolsCall
	if json.Unmarshal(trimmed, &c) != nil || c.Method != "tools/call" {
		return nil
	}
	return []string{c.Params.Name}
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
