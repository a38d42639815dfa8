package testenv

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"sync"
	"testing"

	jose "github.com/go-jose/go-jose/v4"
)

// Tokens the OP never issued, for the tests of what a verifier refuses.

// AttackerKey is an RSA key no OP ever published, the same one for a whole test binary.
var AttackerKey = sync.OnceValue(func() *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	return k
})

// RandomKID is a fresh key ID no OP ever published.
func RandomKID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// SignJWT signs claims with go-jose under kid with key, as an OP signs a token of JWS
// type "JWT".
func SignJWT(tb testing.TB, key any, alg jose.SignatureAlgorithm, kid string, claims map[string]any) string {
	tb.Helper()
	return SignJWS(tb, key, alg, kid, "JWT", claims)
}

// SignJWS signs claims with go-jose under kid with key and the JWS header typ (none if
// empty).
func SignJWS(tb testing.TB, key any, alg jose.SignatureAlgorithm, kid, typ string, claims map[string]any) string {
	tb.Helper()
	opts := &jose.SignerOptions{}
	if typ != "" {
		opts = opts.WithType(jose.ContentType(typ))
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: jose.JSONWebKey{Key: key, KeyID: kid}}, opts)
	if err != nil {
		tb.Fatal(err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		tb.Fatal(err)
	}
	jws, err := signer.Sign(payload)
	if err != nil {
		tb.Fatal(err)
	}
	out, err := jws.CompactSerialize()
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

// CompactJWS assembles header.payload.signature by hand, for what go-jose refuses to
// sign; sign (nil: an empty signature) signs the signing input.
func CompactJWS(tb testing.TB, header, claims map[string]any, sign func(signingInput []byte) []byte) string {
	tb.Helper()
	h, err := json.Marshal(header)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := json.Marshal(claims)
	if err != nil {
		tb.Fatal(err)
	}
	input := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(c)
	var sig []byte
	if sign != nil {
		sig = sign([]byte(input))
	}
	return input + "." + base64.RawURLEncoding.EncodeToString(sig)
}
