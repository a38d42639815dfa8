package flows

import (
	"net/http"
	"time"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// The IdP's verifier as the broker's tests build it; the tokens they log in for or forge
// are testenv's, and the verifier's own tests are in package idp.

// verifierResource is the protected resource the tokens of these tests are meant for.
const verifierResource = "https://mcp.example.test/mcp"

// newVerifierFor builds an idp.Verifier for o's tokens meant for verifierResource, with
// the broker's credentials, after applying change to its configuration.
func newVerifierFor(o *testenv.OP, change func(*idp.VerifierConfig)) *idp.Verifier {
	cfg := idp.VerifierConfig{
		Provider:     idp.NewProvider(idp.ProviderConfig{Issuer: o.Issuer, HTTPClient: http.DefaultClient}),
		Audiences:    []string{verifierResource},
		ClientID:     testenv.BrokerClientID,
		ClientSecret: testenv.BrokerClientSecret,
		HTTPClient:   http.DefaultClient,
	}
	if change != nil {
		change(&cfg)
	}
	return idp.NewVerifier(cfg)
}

// useIdPClocks rebuilds b's IdP and token verifier as New built them, the IdP on the
// clock discovery and the verifier on the clock verify (nil: time.Now). Call it before
// any request: what the old ones cached is gone.
func (b *Broker) useIdPClocks(discovery, verify func() time.Time) {
	b.idp = newProvider(&b.cfg, discovery)
	b.verifier = newVerifier(&b.cfg, b.idp, verify)
}
