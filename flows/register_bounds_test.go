package flows

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// longURI is an https redirect URI of exactly n bytes whose tail repeats fill.
func longURI(n int, fill string) string {
	u := "https://app.example.com/cb?x="
	for len(u) < n {
		u += fill
	}
	return u[:n]
}

// registrationJSON is a registration request with uris, name and extra members.
func registrationJSON(uris []string, name, extra string) string {
	u, _ := json.Marshal(uris)
	n, _ := json.Marshal(name)
	body := `{"redirect_uris":` + string(u) + `,"client_name":` + string(n)
	if extra != "" {
		body += "," + extra
	}
	return body + "}"
}

func repeatURI(n int, u string) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%d", u[:len(u)-1], i%10)
	}
	return out
}

// The caps of one registration (SECURITY.md: strangers filling Caddy's storage): at most
// 5 redirect URIs of at most 512 bytes, a client_name of at most 100 characters, and a
// stored record of at most 4 KiB.
func TestRegistrationCaps(t *testing.T) {
	b := newRegistrationBroker(t, func(c *Config) { c.RegistrationRate = 1000; c.RegistrationRateTotal = 1000 })
	uri512 := longURI(512, "a")
	for _, tc := range []struct {
		name string
		body string
		code string // "" when accepted
	}{
		{"5 redirect URIs of 512 bytes are accepted", registrationJSON(repeatURI(5, uri512), "x", ""), ""},
		{"6 redirect URIs are refused", registrationJSON(repeatURI(6, "https://app.example.com/cb0"), "x", ""), "invalid_redirect_uri"},
		{"a redirect URI of 513 bytes is refused", registrationJSON([]string{longURI(513, "a")}, "x", ""), "invalid_redirect_uri"},
		{"a client_name of 100 characters is accepted", registrationJSON([]string{uri512}, strings.Repeat("名", 100), ""), ""},
		{"a client_name of 101 characters is refused", registrationJSON([]string{uri512}, strings.Repeat("a", 101), ""), "invalid_client_metadata"},
		{"URIs that escape to more than 4 KiB are refused", registrationJSON(repeatURI(5, longURI(512, "<&")), "x", ""), "invalid_client_metadata"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := answerOwn(t, b, registerRequest(tc.body, ""))
			if tc.code == "" {
				if rec.Code != http.StatusCreated {
					t.Fatalf("%d %s, want 201", rec.Code, rec.Body)
				}
				return
			}
			wantRegistrationError(t, rec, http.StatusBadRequest, tc.code)
		})
	}
}

// Whatever a stranger sends, the record a registration leaves on disk (Caddy's file
// storage) is at most 4 KiB.
func TestRegisteredClientRecordOnDiskIsAtMost4KiB(t *testing.T) {
	dir := t.TempDir()
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		t.Fatal(err)
	}
	b := newRegistrationBroker(t, func(c *Config) {
		c.Records = storage.New(&certmagic.FileStorage{Path: dir}, ring)
		c.RegistrationRate, c.RegistrationRateTotal = 1000, 1000
	})
	name := strings.Repeat("\U0001F600", 100) // 4 bytes each in UTF-8
	many := func(v string) string { return strings.TrimSuffix(strings.Repeat(`"`+v+`",`, 2000), ",") }
	accepted := 0
	for _, tc := range []struct{ name, body string }{
		{"longest plain URIs and name", registrationJSON(repeatURI(5, longURI(512, "a")), name, "")},
		{"URIs with characters JSON escapes", registrationJSON(repeatURI(5, longURI(512, "a&")), name, "")},
		{"mostly escaped URIs", registrationJSON(repeatURI(5, longURI(512, "aaa<")), strings.Repeat("a", 100), "")},
		{"repeated grant and response types", registrationJSON(repeatURI(5, longURI(512, "a")), name,
			`"grant_types":[`+many("authorization_code")+`],"response_types":[`+many("code")+`]`)},
		{"repeated scopes", registrationJSON(repeatURI(5, longURI(512, "a")), name,
			`"scope":"`+strings.Repeat("notes:write ", 50)+`","token_endpoint_auth_method":"client_secret_post"`)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := answerOwn(t, b, registerRequest(tc.body, ""))
			if rec.Code != http.StatusCreated {
				wantRegistrationError(t, rec, http.StatusBadRequest, "invalid_client_metadata")
				return
			}
			accepted++
			var info clientInformation
			if err := json.Unmarshal(rec.Body.Bytes(), &info); err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(filepath.Join(dir, filepath.FromSlash(recordKey(kindClient, info.ClientID))))
			if err != nil {
				t.Fatal(err)
			}
			if st.Size() > 4096 {
				t.Errorf("the stored registration is %d bytes, want at most 4096", st.Size())
			}
		})
	}
	if accepted < 3 {
		t.Errorf("only %d of the largest registrations were accepted: the caps refuse more than they say", accepted)
	}
}
