package flows

import (
	"errors"
	"net"
	"net/url"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// What the consent page shows a person must read as what it is (SECURITY.md, "consent
// page display"): a look-alike Unicode host (сlaude.ai with a Cyrillic с) is shown in its
// ASCII (punycode) form, and text that could reorder or hide what surrounds it (bidi
// overrides, isolates, marks, control characters) is refused wherever a client supplies
// it: in redirect URIs and client names.

var (
	errClientNameCharacters = errors.New("client_name must not contain control or bidirectional-formatting characters")
	errRedirectCharacters   = errors.New("redirect_uri must not contain control or bidirectional-formatting characters")
	errRedirectHostName     = errors.New("redirect_uri host is not a valid internationalized domain name")
)

// hasControlOrBidi tells whether s is not valid UTF-8 or holds a control character (C0,
// DEL, C1) or a bidirectional formatting character (U+061C, U+200E/F, U+202A–E,
// U+2066–9).
func hasControlOrBidi(s string) bool {
	if !utf8.ValidString(s) {
		return true
	}
	for _, r := range s {
		if unicode.IsControl(r) || unicode.Is(unicode.Bidi_Control, r) {
			return true
		}
	}
	return false
}

// CheckClientName tells whether a client's display name may be shown on the consent page.
func CheckClientName(name string) error {
	if hasControlOrBidi(name) {
		return errClientNameCharacters
	}
	return nil
}

// asciiHost is host as the consent page shows it: lowercase ASCII, a Unicode domain name
// in its punycode form. ASCII hosts and IP addresses are left as they are (lowercased):
// only hosts with other characters go through IDNA, which refuses what no domain name
// can hold.
func asciiHost(host string) (string, error) {
	ascii := true
	for i := 0; i < len(host); i++ {
		if host[i] >= utf8.RuneSelf {
			ascii = false
			break
		}
	}
	if ascii {
		return strings.ToLower(host), nil
	}
	if hasControlOrBidi(host) {
		return "", errRedirectCharacters
	}
	h, err := idna.Lookup.ToASCII(host)
	if err != nil {
		return "", errRedirectHostName
	}
	return h, nil
}

// displayRedirect is a checked redirect URI as the consent page shows it: its host and
// the whole URI, both with the host in ASCII.
func displayRedirect(u *url.URL) (host, full string, err error) {
	host, err = asciiHost(u.Hostname())
	if err != nil {
		return "", "", err
	}
	shown := *u
	switch port := u.Port(); {
	case port != "":
		shown.Host = net.JoinHostPort(host, port)
	case strings.Contains(host, ":"):
		shown.Host = "[" + host + "]"
	default:
		shown.Host = host
	}
	return host, shown.String(), nil
}
