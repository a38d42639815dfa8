package caddyoauthbroker

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Two sites of one Caddy on one storage share their registered clients, and each keeps
// the ones it read in memory for up to 30 s: a deletion through the admin API, which
// names one site, is refused at once by both.
func TestAdminClientDeletionReachesEverySiteOfThisProcessAtOnce(t *testing.T) {
	ctx, _ := provisionContext(t)
	handlers := map[string]*Handler{}
	for _, site := range []string{"https://a.example.com/mcp", "https://b.example.com/mcp"} {
		cfg := progressiveConfig()
		cfg["mode"], cfg["resource"] = "hybrid", site
		h, err := load(t, ctx, cfg)
		if err != nil {
			t.Fatalf("provisioning %s: %v", site, err)
		}
		handlers[site] = h
	}
	a, b := handlers["https://a.example.com/mcp"], handlers["https://b.example.com/mcp"]
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })
	serve := func(h *Handler, r *http.Request) *httptest.ResponseRecorder {
		t.Helper()
		r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), nil, nil)
		w := httptest.NewRecorder()
		if err := h.ServeHTTP(w, r, next); err != nil {
			t.Fatal(err)
		}
		return w
	}

	reg := httptest.NewRequest(http.MethodPost, "https://a.example.com/oauth/register",
		strings.NewReader(`{"redirect_uris":["http://127.0.0.1/callback"],"token_endpoint_auth_method":"none"}`))
	reg.Header.Set("Content-Type", "application/json")
	w := serve(a, reg)
	var info struct {
		ClientID string `json:"client_id"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &info); w.Code != http.StatusCreated || err != nil {
		t.Fatalf("registration: %d %s", w.Code, w.Body)
	}
	authorize := func(h *Handler, host string) int {
		t.Helper()
		q := url.Values{
			"response_type": {"code"}, "client_id": {info.ClientID}, "redirect_uri": {"http://127.0.0.1/callback"},
			"code_challenge": {strings.Repeat("A", 43)}, "code_challenge_method": {"S256"},
		}
		return serve(h, httptest.NewRequest(http.MethodGet, "https://"+host+"/oauth/authorize?"+q.Encode(), nil)).Code
	}
	if ca, cb := authorize(a, "a.example.com"), authorize(b, "b.example.com"); ca != http.StatusFound || cb != http.StatusFound {
		t.Fatalf("authorize with the registered client: %d on a, %d on b; want 302 on both", ca, cb)
	}

	del := httptest.NewRequest(http.MethodDelete, "http://localhost:2019/mcp_oauth/clients?site="+
		url.QueryEscape("https://a.example.com/mcp")+"&client_id="+url.QueryEscape(info.ClientID), nil)
	w = httptest.NewRecorder()
	if err := (&AdminAPI{}).serveClients(w, del); err != nil || w.Code != http.StatusNoContent {
		t.Fatalf("admin DELETE: %v, %d %s", err, w.Code, w.Body)
	}
	if ca, cb := authorize(a, "a.example.com"), authorize(b, "b.example.com"); ca != http.StatusBadRequest || cb != http.StatusBadRequest {
		t.Errorf("authorize with the deleted client: %d on a, %d on b; want 400 on both", ca, cb)
	}
}
