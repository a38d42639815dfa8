package flows

import (
	"net/http"
	"testing"

	"golang.org/x/oauth2"
)

// RFC 6749 §4.1.3: redirect_uri is required at the token endpoint only "if the
// redirect_uri parameter was included in the authorization request". The broker lets a
// client with one registered URI leave it out at /oauth/authorize (§3.1.2.3), so such a
// client must be able to redeem its code without it too; one it does send must still be
// the registered URI.
func TestAuditACodeRedeemedWithoutRedirectURIWhenOmittedAtAuthorize(t *testing.T) {
	o := verifierOP(t)
	_, front := startHybridFront(t, o, "", hybridClients)

	redeem := func(t *testing.T, redirectURI string) *http.Response {
		t.Helper()
		verifier := oauth2.GenerateVerifier()
		code := hybridLogin(t, front, o, singleURIClient, "", verifier, []string{"openid", "notes:read"})
		conf := oauth2.Config{
			ClientID:    singleURIClient,
			Endpoint:    oauth2.Endpoint{TokenURL: front.URL + pathToken, AuthStyle: oauth2.AuthStyleInParams},
			RedirectURL: redirectURI, // "" leaves the parameter out
		}
		_, err := conf.Exchange(t.Context(), code, oauth2.VerifierOption(verifier))
		if err == nil {
			return &http.Response{StatusCode: http.StatusOK}
		}
		if re, ok := err.(*oauth2.RetrieveError); ok {
			t.Logf("token endpoint: %s %s", re.ErrorCode, re.ErrorDescription)
			return re.Response
		}
		t.Fatal(err)
		return nil
	}

	t.Run("left out at both endpoints", func(t *testing.T) {
		if resp := redeem(t, ""); resp.StatusCode != http.StatusOK {
			t.Errorf("status %d, want 200", resp.StatusCode)
		}
	})
	t.Run("left out at authorize, the registered URI at the token endpoint", func(t *testing.T) {
		if resp := redeem(t, singleURI); resp.StatusCode != http.StatusOK {
			t.Errorf("status %d, want 200", resp.StatusCode)
		}
	})
	t.Run("left out at authorize, another URI at the token endpoint", func(t *testing.T) {
		if resp := redeem(t, "https://evil.example/cb"); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("status %d, want 400", resp.StatusCode)
		}
	})
}
