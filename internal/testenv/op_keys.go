package testenv

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/hex"
	"fmt"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/zitadel/oidc/v3/pkg/op"
)

// WithSigningAlgorithm makes the OP sign with a fresh key for alg instead of
// the example storage's RS256 key: ID tokens, JWT access tokens and MintJWT.
// The key is the only one at JWKSURI, and discovery's
// id_token_signing_alg_values_supported names alg alone. RS* and PS* get an
// RSA 2048 key, ES256, ES384 and ES512 a P-256, P-384 or P-521 key, EdDSA an
// Ed25519 key; any other alg makes NewOP fail.
//
// zitadel verifies the JWTs it issued (at userinfo, introspection and as a
// token exchange's subject token) with RS256, ES256 and PS256 only: with any
// other alg those endpoints refuse the OP's own JWT access tokens.
func WithSigningAlgorithm(alg jose.SignatureAlgorithm) OPOption {
	return func(c *opConfig) { c.signingAlg = alg }
}

// signingKey is an op.SigningKey of any type go-jose signs with.
type signingKey struct {
	id      string
	alg     jose.SignatureAlgorithm
	private crypto.Signer
}

func newSigningKey(alg jose.SignatureAlgorithm) (*signingKey, error) {
	var (
		k   crypto.Signer
		err error
	)
	switch alg {
	case jose.RS256, jose.RS384, jose.RS512, jose.PS256, jose.PS384, jose.PS512:
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	case jose.ES256:
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case jose.ES384:
		k, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case jose.ES512:
		k, err = ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	case jose.EdDSA:
		_, k, err = ed25519.GenerateKey(rand.Reader)
	default:
		return nil, fmt.Errorf("signing algorithm %q: want RS*, PS*, ES* or EdDSA", alg)
	}
	if err != nil {
		return nil, fmt.Errorf("generating a %s key: %w", alg, err)
	}
	id := make([]byte, 8)
	rand.Read(id)
	return &signingKey{id: string(alg) + "-" + hex.EncodeToString(id), alg: alg, private: k}, nil
}

func (k *signingKey) SignatureAlgorithm() jose.SignatureAlgorithm { return k.alg }
func (k *signingKey) Key() any                                    { return k.private }
func (k *signingKey) ID() string                                  { return k.id }

// publicKey is the public half of a signingKey, as the JWKS publishes it.
type publicKey struct{ k *signingKey }

func (p publicKey) ID() string                         { return p.k.id }
func (p publicKey) Algorithm() jose.SignatureAlgorithm { return p.k.alg }
func (p publicKey) Use() string                        { return "sig" }
func (p publicKey) Key() any                           { return p.k.private.Public() }

// SigningKey, SignatureAlgorithms and KeySet replace the example storage's with
// WithSigningAlgorithm's key when there is one.

func (s *opStorage) SigningKey(ctx context.Context) (op.SigningKey, error) {
	if s.signing != nil {
		return s.signing, nil
	}
	return s.Storage.SigningKey(ctx)
}

func (s *opStorage) SignatureAlgorithms(ctx context.Context) ([]jose.SignatureAlgorithm, error) {
	if s.signing != nil {
		return []jose.SignatureAlgorithm{s.signing.alg}, nil
	}
	return s.Storage.SignatureAlgorithms(ctx)
}

func (s *opStorage) KeySet(ctx context.Context) ([]op.Key, error) {
	if s.signing != nil {
		return []op.Key{publicKey{s.signing}}, nil
	}
	return s.Storage.KeySet(ctx)
}

var (
	_ op.SigningKey = (*signingKey)(nil)
	_ op.Key        = publicKey{}
)
