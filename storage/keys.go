package storage

import (
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"strings"
)

// Namespace is the top-level key segment under which every record lives.
const Namespace = "mcp_oauth"

// maxSegmentLen keeps each segment a valid file name on common file systems.
const maxSegmentLen = 255

// Key joins parts under the "mcp_oauth/" namespace:
// Key("codes", h) == "mcp_oauth/codes/<h>". Key() alone is the namespace
// itself, usable as a List prefix.
//
// Each part must be a safe segment: non-empty, at most 255 bytes of
// [A-Za-z0-9_.-], and not "." or "..". Key panics on an unsafe part because
// that is a programming error: certmagic.FileStorage turns keys into paths
// unchecked, so client-supplied text must go through Hash first.
func Key(parts ...string) string {
	for i, p := range parts {
		if !safeSegment(p) {
			// The part itself is left out: it may be client-supplied secret text.
			panic(fmt.Sprintf("storage.Key: part %d (%d bytes) is not a safe key segment; pass client-supplied text through storage.Hash", i, len(p)))
		}
	}
	if len(parts) == 0 {
		return Namespace
	}
	return Namespace + "/" + strings.Join(parts, "/")
}

// Hash turns client-supplied text (client ids, codes, tokens) into a
// fixed-length key segment: the unpadded base64url encoding of its SHA-256.
func Hash(clientSupplied string) string {
	sum := sha256.Sum256([]byte(clientSupplied))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

func safeSegment(s string) bool {
	if s == "" || s == "." || s == ".." || len(s) > maxSegmentLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9',
			c == '_', c == '-', c == '.':
		default:
			return false
		}
	}
	return true
}

// validKey reports whether key could have come from Key: the namespace
// followed by safe segments. With atLeastOne false the bare namespace is
// accepted too (a List prefix).
func validKey(key string, atLeastOne bool) bool {
	if key == Namespace {
		return !atLeastOne
	}
	rest, ok := strings.CutPrefix(key, Namespace+"/")
	if !ok {
		return false
	}
	for seg := range strings.SplitSeq(rest, "/") {
		if !safeSegment(seg) {
			return false
		}
	}
	return true
}

// lockName maps a key or lock name to a storage lock name. certmagic lock
// names are lowercased and stripped of unsafe characters by FileStorage, so
// case-sensitive names (base64url hashes) are hashed to lowercase hex rather
// than passed through; kind keeps TakeOnce and Lock names apart.
func lockName(kind, name string) string {
	sum := sha256.Sum256([]byte(name))
	return fmt.Sprintf("%s_%s_%x", Namespace, kind, sum[:16])
}
