package e2e

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// bigFile is an incompressible file on a loopback server, for server-everything's gzip
// tool to fetch and return whole: a large tool result.
type bigFile struct {
	URL string
	Sum [32]byte
	Len int
}

func serveBigFile(t *testing.T, size int) bigFile {
	t.Helper()
	data := make([]byte, size)
	rand.Read(data)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(data)
	}))
	t.Cleanup(srv.Close)
	return bigFile{URL: srv.URL + "/big.bin", Sum: sha256.Sum256(data), Len: size}
}

// everythingReport is what checkEverything saw, for callers that assert more (the
// upstream's view of the tokens, through the broker).
type everythingReport struct {
	SessionID     string
	ProgressAt    []time.Duration
	ResultAt      time.Duration
	StreamEvents  int
	ResultBytes   int
	DeleteStatus  int
	AfterDelete   int
	ToolsListSize int
}

// checkEverything drives server-everything over wire (directly, or through the broker)
// and asserts that Streamable HTTP survives: the Mcp-Session-Id, SSE responses whose
// progress notifications arrive one by one before the result (not buffered), a server
// notification on the standalone GET stream, a multi-megabyte result byte for byte, and
// session termination.
func checkEverything(t *testing.T, wire *mcpWire, big bigFile) everythingReport {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var rep everythingReport

	init, err := wire.initialize(ctx)
	if err != nil {
		t.Fatalf("initialize: %v", err)
	}
	if !strings.HasPrefix(init.Header.Get("Content-Type"), "text/event-stream") {
		t.Errorf("initialize answered %q, want an SSE stream", init.Header.Get("Content-Type"))
	}
	var info struct {
		ServerInfo struct{ Name string } `json:"serverInfo"`
	}
	json.Unmarshal(init.last().Result, &info)
	if wire.sessionID == "" || info.ServerInfo.Name != "mcp-servers/everything" {
		t.Fatalf("session %q, server %q", wire.sessionID, info.ServerInfo.Name)
	}
	rep.SessionID = wire.sessionID

	list, err := wire.request(ctx, "tools/list", nil)
	if err != nil || list.Status != http.StatusOK {
		t.Fatalf("tools/list: %v %+v", err, list)
	}
	var tools struct{ Tools []struct{ Name string } }
	json.Unmarshal(list.last().Result, &tools)
	rep.ToolsListSize = len(tools.Tools)
	names := map[string]bool{}
	for _, tool := range tools.Tools {
		names[tool.Name] = true
	}
	for _, want := range []string{"echo", "trigger-long-running-operation", "gzip-file-as-resource", "toggle-simulated-logging"} {
		if !names[want] {
			t.Errorf("tools/list lacks %s", want)
		}
	}

	// Progress notifications on the POST's SSE stream, as they happen.
	const steps = 4
	long, err := wire.request(ctx, "tools/call", map[string]any{
		"name": "trigger-long-running-operation", "arguments": map[string]any{"duration": 1.2, "steps": steps},
		"_meta": map[string]any{"progressToken": "p-1"},
	})
	if err != nil || long.Status != http.StatusOK {
		t.Fatalf("long-running tool: %v %+v", err, long)
	}
	for _, e := range long.Events {
		if m := e.message(); m.Method == "notifications/progress" {
			var p struct {
				Progress      float64
				ProgressToken string
			}
			json.Unmarshal(m.Params, &p)
			if p.ProgressToken != "p-1" || int(p.Progress) != len(rep.ProgressAt)+1 {
				t.Errorf("progress notification %s", e.Data)
			}
			if e.ID == "" {
				t.Errorf("SSE event without id (resumability lost): %s", e.Data)
			}
			rep.ProgressAt = append(rep.ProgressAt, e.At)
		}
	}
	if r := long.last(); r.Error != nil || !strings.Contains(string(r.Result), "Long running operation completed") {
		t.Errorf("long-running result %s", long.Events[len(long.Events)-1].Data)
	}
	rep.ResultAt = long.Events[len(long.Events)-1].At
	if len(rep.ProgressAt) != steps {
		t.Fatalf("%d progress notifications, want %d", len(rep.ProgressAt), steps)
	}
	// Streamed, not buffered: the first notification came well before the result.
	if gap := rep.ResultAt - rep.ProgressAt[0]; gap < 600*time.Millisecond {
		t.Errorf("first progress at %v, result at %v: the stream was buffered", rep.ProgressAt[0], rep.ResultAt)
	}

	// A server notification on the standalone GET stream.
	streamCtx, stopStream := context.WithCancel(ctx)
	defer stopStream()
	resp, events, err := wire.stream(streamCtx)
	if err != nil || resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("GET stream: %v %v", err, resp)
	}
	if r, err := wire.request(ctx, "tools/call", map[string]any{"name": "toggle-simulated-logging", "arguments": map[string]any{}}); err != nil || r.Status != http.StatusOK {
		t.Fatalf("toggle-simulated-logging: %v %+v", err, r)
	}
	select {
	case e, ok := <-events:
		if !ok {
			t.Fatal("GET stream ended without an event")
		}
		if m := e.message(); m.Method != "notifications/message" {
			t.Errorf("GET stream event %s", e.Data)
		}
		rep.StreamEvents++
	case <-time.After(10 * time.Second):
		t.Fatal("no notification on the GET stream")
	}
	wire.request(ctx, "tools/call", map[string]any{"name": "toggle-simulated-logging", "arguments": map[string]any{}})
	stopStream()

	// A large result, intact.
	gz, err := wire.request(ctx, "tools/call", map[string]any{"name": "gzip-file-as-resource",
		"arguments": map[string]any{"name": "big.bin.gz", "data": big.URL, "outputType": "resource"}})
	if err != nil || gz.Status != http.StatusOK {
		t.Fatalf("gzip tool: %v %+v", err, gz)
	}
	last := gz.Events[len(gz.Events)-1]
	rep.ResultBytes = len(last.Data)
	var res struct {
		IsError bool
		Content []struct {
			Type     string
			Text     string
			Resource struct{ Blob string }
		}
	}
	if err := json.Unmarshal(last.message().Result, &res); err != nil || res.IsError || len(res.Content) == 0 {
		t.Fatalf("gzip result (%d bytes): %v %.300s", rep.ResultBytes, err, last.Data)
	}
	blob, err := base64.StdEncoding.DecodeString(res.Content[0].Resource.Blob)
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	plain, err := io.ReadAll(zr)
	if err != nil || sha256.Sum256(plain) != big.Sum {
		t.Errorf("large result altered: %d bytes back of %d (%v)", len(plain), big.Len, err)
	}

	// Session termination passes through, and the session is gone after it.
	del, err := wire.client.Do(wire.newRequest(ctx, http.MethodDelete, nil))
	if err != nil {
		t.Fatal(err)
	}
	del.Body.Close()
	rep.DeleteStatus = del.StatusCode
	if del.StatusCode != http.StatusOK {
		t.Errorf("DELETE session: %s", del.Status)
	}
	after, err := wire.request(ctx, "tools/list", nil)
	if err != nil {
		t.Fatal(err)
	}
	rep.AfterDelete = after.Status
	if after.Status < 400 {
		t.Errorf("the deleted session still answers: %d", after.Status)
	}
	return rep
}

// TestEverythingServerDirect: server-everything, started by the harness, speaks Streamable
// HTTP as checkEverything expects, with nothing in between; the broker tests then prove the
// same through caddy.
func TestEverythingServerDirect(t *testing.T) {
	url := startEverything(t)
	rep := checkEverything(t, newMCPWire(url, nil), serveBigFile(t, 2<<20))
	t.Logf("session %s, progress at %v, result at %v, large result %d bytes, after DELETE %d",
		rep.SessionID, rep.ProgressAt, rep.ResultAt, rep.ResultBytes, rep.AfterDelete)
}
