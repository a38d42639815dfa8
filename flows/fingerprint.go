package flows

import (
	"crypto/sha256"
	"encoding/hex"
)

// Fingerprint names a token, code or secret in logs without revealing it: the first 8 hex
// digits of its SHA-256 (SECURITY.md W13).
func Fingerprint(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:4])
}

// fingerprintOrEmpty is Fingerprint, or "" for "" (no session, no family).
func fingerprintOrEmpty(secret string) string {
	if secret == "" {
		return ""
	}
	return Fingerprint(secret)
}
