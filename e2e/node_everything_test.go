package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// startEverything runs @modelcontextprotocol/server-everything in Streamable HTTP mode on
// a free loopback port (interop/everything.mjs) until the test ends, and returns its MCP
// endpoint URL.
func startEverything(t *testing.T) string {
	t.Helper()
	p := startNode(t, "everything.mjs", nil, "--port", "0")
	var hello struct {
		URL string `json:"url"`
	}
	p.ready(&hello)
	if !strings.HasPrefix(hello.URL, "http://127.0.0.1:") {
		t.Fatalf("server-everything URL %q is not on loopback", hello.URL)
	}
	return hello.URL
}

// mcpProtocolVersion is the MCP revision the wire client speaks.
const mcpProtocolVersion = "2025-06-18"

// mcpWire is a plain-HTTP MCP Streamable HTTP client that keeps what a proxy could break
// in view: status codes, headers, the SSE events of each response with their arrival
// times, and the Mcp-Session-Id.
type mcpWire struct {
	url       string
	client    *http.Client
	header    http.Header // sent with every request (Authorization)
	sessionID string
	nextID    atomic.Int64
}

func newMCPWire(url string, header http.Header) *mcpWire {
	if header == nil {
		header = http.Header{}
	}
	return &mcpWire{url: url, client: &http.Client{Timeout: 60 * time.Second}, header: header}
}

// sseEvent is one Server-Sent Event, or a plain JSON body as one event.
type sseEvent struct {
	ID    string
	Event string
	Data  json.RawMessage
	At    time.Duration // since the request was sent
}

// rpcMessage is the part of a JSON-RPC message the tests read.
type rpcMessage struct {
	ID     json.RawMessage `json:"id"`
	Method string          `json:"method"`
	Params json.RawMessage `json:"params"`
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func (e sseEvent) message() rpcMessage {
	var m rpcMessage
	_ = json.Unmarshal(e.Data, &m)
	return m
}

// wireResponse is what one POST got back.
type wireResponse struct {
	Status int
	Header http.Header
	Events []sseEvent
	Body   []byte // the raw body when it was not SSE
}

// last is the final JSON-RPC message of a response: the result (or error).
func (r *wireResponse) last() rpcMessage {
	if len(r.Events) == 0 {
		return rpcMessage{}
	}
	return r.Events[len(r.Events)-1].message()
}

func (m *mcpWire) newRequest(ctx context.Context, method string, body []byte) *http.Request {
	req, _ := http.NewRequestWithContext(ctx, method, m.url, bytes.NewReader(body))
	for k, v := range m.header {
		req.Header[k] = v
	}
	req.Header.Set("Accept", "application/json, text/event-stream")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if m.sessionID != "" {
		req.Header.Set("Mcp-Session-Id", m.sessionID)
		req.Header.Set("Mcp-Protocol-Version", mcpProtocolVersion)
	}
	return req
}

// post sends one JSON-RPC message and reads the whole answer, SSE or JSON.
func (m *mcpWire) post(ctx context.Context, msg map[string]any) (*wireResponse, error) {
	msg["jsonrpc"] = "2.0"
	body, err := json.Marshal(msg)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	resp, err := m.client.Do(m.newRequest(ctx, http.MethodPost, body))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out := &wireResponse{Status: resp.StatusCode, Header: resp.Header}
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		events := make(chan sseEvent)
		errc := make(chan error, 1)
		go func() { errc <- readSSE(resp.Body, start, events) }()
		for e := range events {
			out.Events = append(out.Events, e)
		}
		return out, <-errc
	}
	out.Body, err = io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if json.Valid(out.Body) && len(bytes.TrimSpace(out.Body)) > 0 {
		out.Events = []sseEvent{{Data: out.Body, At: time.Since(start)}}
	}
	return out, err
}

// request sends a JSON-RPC request with a fresh id.
func (m *mcpWire) request(ctx context.Context, method string, params any) (*wireResponse, error) {
	msg := map[string]any{"id": m.nextID.Add(1), "method": method}
	if params != nil {
		msg["params"] = params
	}
	return m.post(ctx, msg)
}

// initialize opens a session: initialize, then notifications/initialized.
func (m *mcpWire) initialize(ctx context.Context) (*wireResponse, error) {
	r, err := m.request(ctx, "initialize", map[string]any{
		"protocolVersion": mcpProtocolVersion,
		"capabilities":    map[string]any{},
		"clientInfo":      map[string]any{"name": "e2e-wire", "version": "1"},
	})
	if err != nil {
		return nil, err
	}
	if r.Status != http.StatusOK {
		return r, fmt.Errorf("initialize: %d %s", r.Status, r.Body)
	}
	m.sessionID = r.Header.Get("Mcp-Session-Id")
	n, err := m.post(ctx, map[string]any{"method": "notifications/initialized"})
	if err != nil {
		return r, err
	}
	if n.Status != http.StatusAccepted {
		return r, fmt.Errorf("notifications/initialized: %d %s", n.Status, n.Body)
	}
	return r, nil
}

// stream opens the standalone GET SSE stream; events arrive on the channel until ctx ends.
func (m *mcpWire) stream(ctx context.Context) (*http.Response, <-chan sseEvent, error) {
	req := m.newRequest(ctx, http.MethodGet, nil)
	req.Header.Set("Accept", "text/event-stream")
	c := *m.client
	c.Timeout = 0 // bounded by ctx
	resp, err := c.Do(req)
	if err != nil {
		return nil, nil, err
	}
	events := make(chan sseEvent, 64)
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		close(events)
		return resp, events, nil
	}
	start := time.Now()
	go func() {
		defer resp.Body.Close()
		readSSE(resp.Body, start, events)
	}()
	return resp, events, nil
}

// readSSE parses an event stream into events, closing the channel at its end.
func readSSE(r io.Reader, start time.Time, events chan<- sseEvent) error {
	defer close(events)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	var e sseEvent
	var data []string
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if len(data) > 0 {
				e.Data = json.RawMessage(strings.Join(data, "\n"))
				e.At = time.Since(start)
				events <- e
			}
			e, data = sseEvent{}, nil
		case strings.HasPrefix(line, "data:"):
			data = append(data, strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " "))
		case strings.HasPrefix(line, "id:"):
			e.ID = strings.TrimSpace(strings.TrimPrefix(line, "id:"))
		case strings.HasPrefix(line, "event:"):
			e.Event = strings.TrimSpace(strings.TrimPrefix(line, "event:"))
		}
	}
	return sc.Err()
}
