package flows

import (
	"errors"
	"net"
	"net/url"
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

// CheckRedirectURI tells whether raw has an acceptable form for registration or use.
func CheckRedirectURI(raw string) error {
	_, err := parseRedirectURI(raw)
	return err
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
		return false
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
