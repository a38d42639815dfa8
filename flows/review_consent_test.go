package flows

import "testing"

// Review (h-review): S1.40 remembers consent only for https redirect URIs off loopback,
// but tells loopback by IsLoopbackHost, which knows the names RFC 8252 lets a client
// register over http, not every host a browser sends to the user's own computer: a
// trailing dot, a subdomain of localhost (RFC 6761 §6.3; browsers resolve it to
// loopback), an IPv4 address in a form the WHATWG URL parser reads as 127.0.0.1 (127.1,
// 0x7f.0.0.1, 2130706433), full-width digits or letters that IDNA maps to ASCII, or the
// unspecified address, which reaches this computer. Each is accepted at registration as
// an https URI, and with an approval remembered for it a program on the computer holding
// a certificate for it gets a code without the page.
func TestReviewConsentNotRememberedForLoopbackAliases(t *testing.T) {
	for _, uri := range []string{
		"https://localhost/cb", "https://LOCALHOST/cb", "https://127.0.0.1/cb", "https://[::1]/cb",
		"https://[::ffff:127.0.0.1]/cb", "https://127.0.0.2:8443/cb",
		"https://localhost./cb", "https://app.localhost/cb", "https://app.LOCALHOST.:8443/cb",
		"https://127.1/cb", "https://0x7f.0.0.1/cb", "https://0177.0.0.1/cb", "https://2130706433/cb",
		"https://0x7f000001/cb", "https://127.0.0.1./cb",
		"https://\uff11\uff12\uff17.\uff10.\uff10.\uff11/cb", "https://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/cb",
		"https://0.0.0.0/cb", "https://[::]/cb",
	} {
		if err := CheckRedirectURI(uri); err != nil {
			t.Logf("%s: refused at registration (%v)", uri, err)
			continue
		}
		if consentMayBeRemembered(uri) {
			t.Errorf("%s: consent may be remembered; it leads to this computer", uri)
		}
	}
	for _, uri := range []string{
		"https://claude.example/cb", "https://localhost.example/cb", "https://mylocalhost/cb",
		"https://app.example.:8443/cb", "https://203.0.113.7/cb", "https://1.2.3.4.example/cb",
	} {
		if !consentMayBeRemembered(uri) {
			t.Errorf("%s: consent not remembered", uri)
		}
	}
}
