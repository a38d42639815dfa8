package flows

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

func TestFindClient(t *testing.T) {
	b := newRegistrationBroker(t, nil)
	for _, tc := range []struct {
		name string
		id   string
		want error
	}{
		{"configured client", testenv.NativeClientID, nil},
		{"unknown id", "no-such-client", ErrUnknownClient},
		{"empty id", "", ErrUnknownClient},
		{"overlong id is not looked up", strings.Repeat("a", maxClientIDLen+1), ErrUnknownClient},
		{"http URL is no metadata document", "http://app.example.com/client.json", ErrUnknownClient},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := b.findClient(t.Context(), tc.id)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			if tc.want == nil && (c.Source != ClientSourceConfig || c.AuthMethod != AuthMethodNone ||
				c.Name != "Native Test Client" || !c.allowsGrantType(grantRefreshToken)) {
				t.Errorf("found %+v", c)
			}
		})
	}
}

func TestAuthenticateClient(t *testing.T) {
	b := newRegistrationBroker(t, nil)
	basic := registerClient(t, b, `{"redirect_uris":["https://app.example.com/cb"],"token_endpoint_auth_method":"client_secret_basic"}`)
	post := registerClient(t, b, `{"redirect_uris":["https://app.example.com/cb"],"token_endpoint_auth_method":"client_secret_post"}`)
	public := registerClient(t, b, `{"redirect_uris":["https://app.example.com/cb"],"token_endpoint_auth_method":"none"}`)

	type creds struct {
		basicUser, basicSecret string
		hasBasic               bool
		form                   url.Values
	}
	withBasic := func(user, secret string, form url.Values) creds {
		return creds{basicUser: user, basicSecret: secret, hasBasic: true, form: form}
	}
	inForm := func(kv ...string) creds {
		f := url.Values{}
		for i := 0; i+1 < len(kv); i += 2 {
			f.Set(kv[i], kv[i+1])
		}
		return creds{form: f}
	}
	// Percent-encoding every byte is a valid form-urlencoding of the same secret.
	encodeAll := func(s string) string {
		var sb strings.Builder
		for i := 0; i < len(s); i++ {
			fmt.Fprintf(&sb, "%%%02X", s[i])
		}
		return sb.String()
	}

	for _, tc := range []struct {
		name     string
		creds    creds
		wantID   string
		wantErr  error
		wantBoth bool
	}{
		{"basic client with its secret", withBasic(basic.ClientID, basic.ClientSecret, nil), basic.ClientID, nil, false},
		{"basic credentials are form-urldecoded", withBasic(encodeAll(basic.ClientID), encodeAll(basic.ClientSecret), nil), basic.ClientID, nil, false},
		{"basic client with the same client_id in the body", withBasic(basic.ClientID, basic.ClientSecret, url.Values{"client_id": {basic.ClientID}}), basic.ClientID, nil, false},
		{"basic client with a wrong secret", withBasic(basic.ClientID, post.ClientSecret, nil), "", errClientAuth, false},
		{"basic client with an empty secret", withBasic(basic.ClientID, "", nil), "", errClientAuth, false},
		{"basic client sending its secret in the body", inForm("client_id", basic.ClientID, "client_secret", basic.ClientSecret), "", errClientAuth, false},
		{"basic client sending no secret", inForm("client_id", basic.ClientID), "", errClientAuth, false},
		{"post client with its secret", inForm("client_id", post.ClientID, "client_secret", post.ClientSecret), post.ClientID, nil, false},
		{"post client with a wrong secret", inForm("client_id", post.ClientID, "client_secret", basic.ClientSecret), "", errClientAuth, false},
		{"post client using basic", withBasic(post.ClientID, post.ClientSecret, nil), "", errClientAuth, false},
		{"credentials in header and body", withBasic(basic.ClientID, basic.ClientSecret, url.Values{"client_secret": {basic.ClientSecret}}), "", errClientAuth, true},
		{"client_id in the body differs from the basic user", withBasic(basic.ClientID, basic.ClientSecret, url.Values{"client_id": {post.ClientID}}), "", errClientAuth, false},
		{"public client by client_id", inForm("client_id", public.ClientID), public.ClientID, nil, false},
		{"public client by basic without a password", withBasic(public.ClientID, "", nil), public.ClientID, nil, false},
		{"public client sending a secret in the body", inForm("client_id", public.ClientID, "client_secret", "anything"), "", errClientAuth, false},
		{"public client sending a secret by basic", withBasic(public.ClientID, "anything", nil), "", errClientAuth, false},
		{"configured client is public", inForm("client_id", testenv.NativeClientID), testenv.NativeClientID, nil, false},
		{"configured client sending a secret", inForm("client_id", testenv.NativeClientID, "client_secret", "x"), "", errClientAuth, false},
		{"unknown client", inForm("client_id", "nobody"), "", ErrUnknownClient, false},
		{"unknown client by basic", withBasic("nobody", "secret", nil), "", ErrUnknownClient, false},
		{"no client identification", inForm(), "", errClientAuth, false},
		{"undecodable basic credentials", withBasic(basic.ClientID, "%zz", nil), "", errClientAuth, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/oauth/token", nil)
			if tc.creds.hasBasic {
				req.SetBasicAuth(tc.creds.basicUser, tc.creds.basicSecret)
			}
			c, err := b.authenticateClient(req, tc.creds.form)
			if !errors.Is(err, tc.wantErr) || errors.Is(err, errClientAuthMultiple) != tc.wantBoth {
				t.Fatalf("err %v, want %v (two methods: %v)", err, tc.wantErr, tc.wantBoth)
			}
			if tc.wantErr != nil && c != nil {
				t.Error("a client came with the error")
			}
			if tc.wantErr == nil && c.ID != tc.wantID {
				t.Errorf("client %q, want %q", c.ID, tc.wantID)
			}
			if err != nil && (strings.Contains(err.Error(), basic.ClientSecret) || strings.Contains(err.Error(), post.ClientSecret)) {
				t.Error("the error carries a secret")
			}
		})
	}

	t.Run("secrets are compared in constant time", func(t *testing.T) {
		calls := 0
		b.constantTimeCompare = func(x, y []byte) int { calls++; return subtle.ConstantTimeCompare(x, y) }
		t.Cleanup(func() { b.constantTimeCompare = subtle.ConstantTimeCompare })
		for _, secret := range []string{basic.ClientSecret, "wrong"} {
			req := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/oauth/token", nil)
			req.SetBasicAuth(basic.ClientID, secret)
			_, _ = b.authenticateClient(req, nil)
		}
		_, _ = b.authenticateClient(httptest.NewRequest(http.MethodPost, "/", nil),
			url.Values{"client_id": {post.ClientID}, "client_secret": {post.ClientSecret}})
		if calls != 3 {
			t.Errorf("%d constant-time compares for 3 secret checks", calls)
		}
	})
}
