package flows

import (
	"net/url"
	"strings"
)

// sameResource tells whether a client's RFC 8707 resource got names the resource want:
// equal once the scheme and host are compared without letter case, a default port (80
// for http, 443 for https) is dropped and an empty path is "/" (RFC 3986 §6.2.2.1,
// §6.2.3); the path, query and anything else compare exactly, as the 2026-07-28
// authorization spec asks servers to accept upper-case schemes and hosts. A resource with
// a fragment or user info is never this server (RFC 8707 §2).
func sameResource(got, want string) bool {
	if got == want {
		return true
	}
	g, err := url.Parse(got)
	if err != nil || g.Fragment != "" || strings.Contains(got, "#") || g.User != nil || g.Opaque != "" || g.Scheme == "" || g.Host == "" {
		return false
	}
	w, err := url.Parse(want)
	if err != nil {
		return false
	}
	return strings.EqualFold(g.Scheme, w.Scheme) &&
		strings.EqualFold(g.Hostname(), w.Hostname()) &&
		effectivePort(g) == effectivePort(w) &&
		rootedPath(g.EscapedPath()) == rootedPath(w.EscapedPath()) &&
		g.RawQuery == w.RawQuery && g.ForceQuery == w.ForceQuery
}

// effectivePort is u's port, or its scheme's default when it names none.
func effectivePort(u *url.URL) string {
	if p := u.Port(); p != "" {
		return p
	}
	switch strings.ToLower(u.Scheme) {
	case "http":
		return "80"
	case "https":
		return "443"
	}
	return ""
}

func rootedPath(p string) string {
	if p == "" {
		return "/"
	}
	return p
}
