package flows

import "github.com/caddy-mcp/oauth-broker/storage"

// requestStateTagger authenticates the request state the broker puts in an
// InputRequiredResult (input_request.go), which the client echoes on its retry: an HMAC
// under a key derived from the encryption key ring (storage.KeyRing.Tag), so that it
// checks on every instance that shares the ring and across a key rotation. Nothing is
// stored.
type requestStateTagger struct {
	records *storage.Records
}

// requestStatePurpose keeps a request state's tag from passing for any other tag.
const requestStatePurpose = "mcp request state v1"

func (s requestStateTagger) tag(payload []byte) (string, error) {
	return s.records.Tag(requestStatePurpose, payload)
}

func (s requestStateTagger) check(payload []byte, tag string) bool {
	return s.records.CheckTag(requestStatePurpose, payload, tag)
}
