package flows

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// RFC 6750 §3.1 at the MCP endpoint: a request without any token gets the bare challenge
// and no error code, neither in WWW-Authenticate nor in the body; a token in the query
// (a method the broker does not accept) is a 400 whose challenge names invalid_request.
func TestChallengeErrorCodes(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)

	t.Run("no token: no error code anywhere", func(t *testing.T) {
		resp := do(t, http.MethodPost, front.URL+"/mcp", nil, `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`)
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") != wantChallenge {
			t.Errorf("%s %q", resp.Status, resp.Header.Get("WWW-Authenticate"))
		}
		if strings.Contains(string(body), "error") || strings.Contains(string(body), "invalid_token") {
			t.Errorf("the body carries error information: %s", body)
		}
		if resp.Header.Get("Access-Control-Allow-Origin") != "*" || !strings.Contains(resp.Header.Get("Access-Control-Expose-Headers"), "WWW-Authenticate") {
			t.Errorf("a browser client cannot read the challenge: %v", resp.Header)
		}
	})
	t.Run("a token in the query: 400 naming invalid_request in the challenge", func(t *testing.T) {
		tok := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid"}, testResource)
		resp := get(t, front.URL+"/mcp?access_token="+tok, nil)
		var e oauthError
		decodeJSON(t, resp, &e)
		if resp.StatusCode != http.StatusBadRequest || e.Error != "invalid_request" {
			t.Errorf("%s %+v", resp.Status, e)
		}
		if got, want := resp.Header.Get("WWW-Authenticate"), wantChallenge+`, error="invalid_request"`; got != want {
			t.Errorf("WWW-Authenticate\n got %s\nwant %s", got, want)
		}
	})
	if len(up.Seen()) != 0 {
		t.Errorf("the upstream saw %d requests", len(up.Seen()))
	}
}
