package flows

import "testing"

// SECURITY.md W1 (a weakness of the Python original): redirect URIs were checked by string prefix.
func TestCheckRedirectURI(t *testing.T) {
	for _, tc := range []struct {
		name string
		uri  string
		ok   bool
	}{
		{"https with a path is accepted", "https://claude.ai/api/mcp/auth_callback", true},
		{"loopback IPv4 with a port is accepted", "http://127.0.0.1:33418/callback", true},
		{"loopback IPv6 with a port is accepted", "http://[::1]:8080/cb", true},
		{"localhost with a port is accepted", "http://localhost:6274/oauth/callback", true},
		{"loopback without a port is accepted", "http://127.0.0.1/callback", true},
		{"userinfo before host is rejected", "http://localhost:@evil.com/cb", false},
		{"userinfo with password is rejected", "https://user:pw@app.example.com/cb", false},
		{"loopback name as a subdomain prefix is rejected", "http://127.0.0.1.evil.com/cb", false},
		{"localhost as a subdomain prefix is rejected", "http://localhost.evil.com/cb", false},
		{"non-numeric port is rejected", "http://localhost:abc/cb", false},
		{"empty port is rejected", "http://localhost:/cb", false},
		{"port out of range is rejected", "http://localhost:70000/cb", false},
		{"fragment is rejected", "https://app.example.com/cb#frag", false},
		{"empty fragment is rejected", "https://app.example.com/cb#", false},
		{"plain http off loopback is rejected", "http://app.example.com/cb", false},
		{"javascript scheme is rejected", "javascript:alert(1)", false},
		{"custom scheme is rejected", "myapp://callback", false},
		{"relative URI is rejected", "/callback", false},
		{"empty is rejected", "", false},
		{"backslash trick is rejected", `https://app.example.com\@evil.com/cb`, false},
		{"whitespace is rejected", "https://app.example.com/cb x", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckRedirectURI(tc.uri)
			if (err == nil) != tc.ok {
				t.Errorf("CheckRedirectURI(%q) = %v, want ok=%v", tc.uri, err, tc.ok)
			}
		})
	}
}

func TestMatchRedirectURI(t *testing.T) {
	registered := []string{"http://127.0.0.1/callback", "https://app.example.com/cb", "http://localhost:3000/cb?x=1"}
	for _, tc := range []struct {
		name      string
		requested string
		ok        bool
	}{
		{"exact https match", "https://app.example.com/cb", true},
		{"loopback on any port", "http://127.0.0.1:49152/callback", true},
		{"loopback on the registered host without a port", "http://127.0.0.1/callback", true},
		{"loopback with its query, other port", "http://localhost:4000/cb?x=1", true},
		{"loopback with another path", "http://127.0.0.1:49152/other", false},
		{"loopback with another host name", "http://localhost:49152/callback", false},
		{"loopback with an extra query", "http://127.0.0.1:49152/callback?next=evil", false},
		{"https with another port", "https://app.example.com:8443/cb", false},
		{"https with a longer path", "https://app.example.com/cb/evil", false},
		{"https prefix of another host", "https://app.example.com.evil.com/cb", false},
		{"userinfo smuggled onto a registered loopback", "http://localhost:@127.0.0.1/callback", false},
		{"non-numeric port", "http://127.0.0.1:abc/callback", false},
		{"empty port", "http://127.0.0.1:/callback", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := MatchRedirectURI(registered, tc.requested); got != tc.ok {
				t.Errorf("MatchRedirectURI(%q) = %v, want %v", tc.requested, got, tc.ok)
			}
		})
	}
}
