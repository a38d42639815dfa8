package flows

import (
	"errors"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
)

// Redirect URI rules (RFC 8252 §7.3, OAuth 2.1 §2.3.1, SECURITY.md W1): a URI is
// parsed, never compared by prefix. It is https with a host, or http on a loopback host
// (127.0.0.1, [::1], localhost) with at most a numeric port. It carries no userinfo and no
// fragment. A requested URI must equal a registered one exactly, except that the port of
// a loopback URI may differ.

var (
	errRedirectUnparsable = errors.New("redirect_uri is not a valid absolute URI")
	errRedirectUserinfo   = errors.New("redirect_uri must not contain userinfo")
	errRedirectFragment   = errors.New("redirect_uri must not contain a fragment")
	errRedirectPort       = errors.New("redirect_uri has an invalid port")
	errRedirectScheme     = errors.New("redirect_uri must be https, or http on a loopback host (127.0.0.1, [::1], localhost)")
)

// Application types (OpenID Connect Dynamic Client Registration 1.0 §2; MCP 2026-07-28
// asks clients to send one at registration).
const (
	ApplicationTypeWeb    = "web"
	ApplicationTypeNative = "native"
)

// knownApplicationType is t when it is web or native, else "": an unknown value is
// treated as absent (RFC 7591 §2 lets the server replace what it does not accept), and
// neither it nor the absence of one refuses a client.
func knownApplicationType(t string) string {
	if t == ApplicationTypeWeb || t == ApplicationTypeNative {
		return t
	}
	return ""
}

var (
	errRedirectPrivateScheme = errors.New("redirect_uri has a scheme that is not a private-use URI scheme")
	errRedirectNativeScheme  = errors.New("redirect_uri must be https, http on a loopback host, or (for application_type native) a private-use URI scheme")
)

// CheckRedirectURI tells whether raw has an acceptable form for registration or use.
func CheckRedirectURI(raw string) error {
	_, err := parseRedirectURI(raw)
	return err
}

// checkRedirectURIFor is CheckRedirectURI for a client of application type appType.
// Whatever the type, https and loopback http are accepted as for every client: a web
// client's loopback URI is what today's clients register without naming a type, and
// naming one must not cost them it (OIDC's "web" default would refuse it). A native client
// (RFC 8252 §7.1) may also use a private-use URI scheme.
func checkRedirectURIFor(appType, raw string) error {
	err := CheckRedirectURI(raw)
	if err == nil || appType != ApplicationTypeNative {
		return err
	}
	if u, uerr := url.Parse(raw); uerr != nil || u.Scheme == "http" || u.Scheme == "https" {
		return err
	}
	if _, perr := parsePrivateUseRedirectURI(raw); perr != nil {
		if errors.Is(perr, errRedirectPrivateScheme) {
			return errRedirectNativeScheme
		}
		return perr
	}
	return nil
}

// notPrivateUseSchemes are schemes with a meaning of their own, never an app's redirect.
var notPrivateUseSchemes = map[string]bool{
	"http": true, "https": true, "javascript": true, "data": true, "vbscript": true, "file": true,
	"blob": true, "about": true, "filesystem": true, "ftp": true, "ws": true, "wss": true,
	"mailto": true, "tel": true, "sms": true, "urn": true, "view-source": true, "chrome": true,
	"intent": true,
	// Browsers' own schemes, which open a web page in that browser: a "native" redirect URI
	// of one sends the code, or an error redirect, to any web site.
	"googlechrome": true, "googlechromes": true, "firefox": true, "opera-http": true, "opera-https": true,
	"microsoft-edge": true, "microsoft-edge-http": true, "microsoft-edge-https": true, "brave": true,
	"edge": true, "duckduckgo": true,
}

// browserSchemePrefixes are scheme prefixes of browsers' own schemes (Safari's x-safari-https,
// Firefox's firefox-focus-…), refused like notPrivateUseSchemes.
var browserSchemePrefixes = []string{"x-safari-", "firefox-", "opera-", "microsoft-edge-", "brave-", "googlechrome-"}

// parsePrivateUseRedirectURI parses a native app's redirect URI of a private-use scheme
// (RFC 8252 §7.1: com.example.app:/oauth2redirect, or an app's own scheme with a host):
// the scheme is none of notPrivateUseSchemes, the URI has a path after the scheme, and it
// carries no userinfo, no fragment, nothing the consent page could not show plainly.
func parsePrivateUseRedirectURI(raw string) (*url.URL, error) {
	if raw == "" || strings.ContainsAny(raw, " \t\r\n\\") {
		return nil, errRedirectUnparsable
	}
	if hasControlOrBidi(raw) {
		return nil, errRedirectCharacters
	}
	u, err := url.Parse(raw)
	if err != nil || u.Scheme == "" || u.Opaque != "" || (u.Host == "" && u.Path == "") {
		return nil, errRedirectUnparsable
	}
	if notPrivateUseSchemes[u.Scheme] || hasBrowserSchemePrefix(u.Scheme) {
		return nil, errRedirectPrivateScheme
	}
	if u.User != nil || strings.Contains(u.Host, "@") {
		return nil, errRedirectUserinfo
	}
	if u.Fragment != "" || strings.Contains(raw, "#") {
		return nil, errRedirectFragment
	}
	if u.Host != "" {
		if _, err := asciiHost(u.Hostname()); err != nil {
			return nil, err
		}
	}
	return u, nil
}

// isPrivateUseRedirectURI tells whether a checked redirect URI is a native app's
// private-use scheme URI.
func isPrivateUseRedirectURI(raw string) bool {
	_, err := parsePrivateUseRedirectURI(raw)
	return err == nil
}

func parseRedirectURI(raw string) (*url.URL, error) {
	if raw == "" || strings.ContainsAny(raw, " \t\r\n\\") {
		return nil, errRedirectUnparsable
	}
	if hasControlOrBidi(raw) {
		return nil, errRedirectCharacters
	}
	u, err := url.Parse(raw)
	if err != nil || !u.IsAbs() || u.Opaque != "" || u.Host == "" {
		return nil, errRedirectUnparsable
	}
	if u.User != nil || strings.Contains(u.Host, "@") {
		return nil, errRedirectUserinfo
	}
	if u.Fragment != "" || strings.Contains(raw, "#") {
		return nil, errRedirectFragment
	}
	// "localhost:" with an empty port, and any non-numeric port, are refused.
	if strings.HasSuffix(u.Host, ":") {
		return nil, errRedirectPort
	}
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != p {
			return nil, errRedirectPort
		}
	}
	// The host as url.Parse decoded it (%-escapes included) must be a name the consent
	// page can show in ASCII.
	if _, err := asciiHost(u.Hostname()); err != nil {
		return nil, err
	}
	switch {
	case u.Scheme == "https":
	case u.Scheme == "http" && IsLoopbackHost(u.Hostname()):
	default:
		return nil, errRedirectScheme
	}
	return u, nil
}

// IsLoopbackHost accepts the loopback names RFC 8252 allows, and nothing that merely
// starts with them (127.0.0.1.evil.com).
func IsLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// MatchRedirectURI finds the registered URI that requested stands for, and tells whether
// there is one.
func MatchRedirectURI(registered []string, requested string) bool {
	req, err := parseRedirectURI(requested)
	if err != nil {
		// A native app's private-use URI matches itself only; only native clients have
		// one registered (checkRedirectURIFor).
		return isPrivateUseRedirectURI(requested) && slices.Contains(registered, requested)
	}
	for _, r := range registered {
		if r == requested {
			return true
		}
		reg, err := parseRedirectURI(r)
		if err != nil || reg.Scheme != "http" || !IsLoopbackHost(reg.Hostname()) {
			continue
		}
		if req.Scheme == reg.Scheme && strings.EqualFold(req.Hostname(), reg.Hostname()) &&
			req.EscapedPath() == reg.EscapedPath() && req.RawQuery == reg.RawQuery {
			return true
		}
	}
	return false
}

func hasBrowserSchemePrefix(scheme string) bool {
	for _, p := range browserSchemePrefixes {
		if strings.HasPrefix(scheme, p) {
			return true
		}
	}
	return false
}
