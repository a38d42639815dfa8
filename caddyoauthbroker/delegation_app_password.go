package caddyoauthbroker

import (
	"errors"
	"fmt"
	"net/url"

	"github.com/caddy-mcp/oauth-broker/flows"
)

// validateAppPassword checks the fields of delegation mode app_password: given in that
// mode only, nextcloud_url required, URLs absolute http(s) without query or userinfo, a
// user agent of printable characters.
func (d *Delegation) validateAppPassword() error {
	if d.Mode != flows.DelegationAppPassword {
		if d.NextcloudURL != "" || d.NextcloudPublicURL != "" || d.UserClaim != "" || d.UserAgent != "" {
			return errors.New("delegation: nextcloud_url, nextcloud_public_url, user_claim and user_agent belong to mode app_password; remove them or set that mode")
		}
		return nil
	}
	if d.NextcloudURL == "" {
		return errors.New("delegation app_password: nextcloud_url is required: where the broker reaches Nextcloud")
	}
	if d.Audience != "" || len(d.Scopes) > 0 {
		return errors.New("delegation app_password: audience and scopes do not apply (the upstream gets the user's app password, not a token); remove them")
	}
	for field, v := range map[string]string{"nextcloud_url": d.NextcloudURL, "nextcloud_public_url": d.NextcloudPublicURL} {
		if v == "" {
			continue
		}
		u, err := url.Parse(v)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
			return fmt.Errorf("delegation app_password: %s %q: want an http or https URL with a host and no query, fragment or userinfo", field, v)
		}
	}
	if d.UserClaim != "" && !isToken(d.UserClaim) {
		return fmt.Errorf("delegation app_password: user_claim %q: want a claim name", d.UserClaim)
	}
	if len(d.UserAgent) > 200 {
		return errors.New("delegation app_password: user_agent: at most 200 characters")
	}
	for _, c := range d.UserAgent {
		if c < 0x20 || c == 0x7f {
			return fmt.Errorf("delegation app_password: user_agent %q: control characters are not allowed", d.UserAgent)
		}
	}
	return nil
}
