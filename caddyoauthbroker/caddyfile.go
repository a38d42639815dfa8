package caddyoauthbroker

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("mcp_oauth", parseCaddyfile)
	// The auth slot: before handle, route, respond and reverse_proxy, so no `order` line is needed.
	httpcaddyfile.RegisterDirectiveOrder("mcp_oauth", httpcaddyfile.After, "basic_auth")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	mcp_oauth [<matcher>] {
//		mode              hybrid|progressive
//		issuer            <url>
//		public_issuer     <url>
//		client_id         <id>
//		client_secret     <secret>
//		resource          <url>
//		audience          <aud...>
//		require_jwt_access_token_type
//		introspection_cache_ttl <duration>
//		scopes            <scope...>
//		base_scopes       <scope...>
//		encryption_key    <base64 of 32 bytes> [<older>...]
//		client <client_id> {
//			name          <display name>
//			redirect_uri  <uri...>
//			scopes        <scope...>
//			secret        <secret>
//			token_endpoint_auth_method client_secret_basic|client_secret_post|none
//		}
//		registration      on|off
//		delegation        token_exchange|refresh|none {
//			audience       <aud>
//			scopes         <scope...>
//			narrow         tool_calls|none
//			subject_header <header>
//		}
//		delegation        app_password {
//			nextcloud_url        <url>
//			nextcloud_public_url <url>
//			user_claim           <claim>
//			user_agent           <text>
//		}
//		tool_scope        <tool name or glob> <scope...>
//		upstream_metadata <url>
//		session_ttl       <duration>
//		code_ttl          <duration>
//		access_token_ttl  <duration>
//		refresh_token_ttl <duration>
//		refresh_grace     <duration>
//		session_max_lifetime <duration>
//		idp_confirm_interval <duration>
//		idp_timeout       <duration>
//		registration_rate <per minute>
//		registration_rate_total <per minute>
//		cold_verify_rate  <per client IP per minute> [<all clients per minute>]
//		client_metadata_documents on|off
//		client_metadata_allow_private
//		offline_access {
//			scopes        <scope...>
//			tools         <tool name or glob...>
//			callback_path <path>
//		}
//		enterprise_managed {
//			issuer <url> {
//				jwks_uri       <url>
//				algorithms     <alg...>
//				scopes         <scope...>
//				subject_prefix <prefix>
//			}
//		}
//		background_client <id> <secret>
//		background_token_rate <per minute>
//		max_body_bytes    <bytes>
//		storage           <module> { ... }
//	}
//
// Secrets may be written as `{env.NAME}` or `{file./path}` placeholders.
//
// A subdirective given twice is refused, since the second would silently replace the
// first; only client, tool_scope and background_client (and redirect_uri inside client)
// may repeat, each adding one more.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for d.NextBlock(0) {
		var err error
		switch d.Val() {
		case "client", "tool_scope", "background_client":
		default:
			err = once(d, seen)
		}
		if err != nil {
			return err
		}
		switch d.Val() {
		case "mode":
			err = unmarshalString(d, &h.Mode)
		case "issuer":
			err = unmarshalString(d, &h.Issuer)
		case "public_issuer":
			err = unmarshalString(d, &h.PublicIssuer)
		case "client_id":
			err = unmarshalString(d, &h.ClientID)
		case "client_secret":
			err = unmarshalString(d, &h.ClientSecret)
		case "resource":
			err = unmarshalString(d, &h.Resource)
		case "audience":
			err = unmarshalList(d, &h.Audience)
		case "scopes":
			err = unmarshalList(d, &h.Scopes)
		case "base_scopes":
			err = unmarshalList(d, &h.BaseScopes)
		case "encryption_key":
			err = unmarshalList(d, &h.EncryptionKeys)
		case "client":
			var c *Client
			if c, err = unmarshalClient(d); err == nil {
				h.Clients = append(h.Clients, c)
			}
		case "registration":
			var on bool
			if on, err = unmarshalOnOff(d); err == nil {
				h.DisableRegistration = !on
			}
		case "delegation":
			h.Delegation, err = unmarshalDelegation(d)
		case "tool_scope":
			args := d.RemainingArgs()
			if len(args) < 2 {
				return d.Err("tool_scope: want a tool name or glob and at least one scope")
			}
			h.ToolScopes = append(h.ToolScopes, &ToolScope{Tool: args[0], Scopes: args[1:]})
		case "upstream_metadata":
			err = unmarshalString(d, &h.UpstreamMetadata)
		case "require_jwt_access_token_type":
			err = unmarshalFlag(d, &h.RequireJWTAccessTokenType)
		case "introspection_cache_ttl":
			err = unmarshalDuration(d, &h.IntrospectionCacheTTL)
		case "session_ttl":
			err = unmarshalDuration(d, &h.SessionTTL)
		case "code_ttl":
			err = unmarshalDuration(d, &h.CodeTTL)
		case "access_token_ttl":
			err = unmarshalDuration(d, &h.AccessTokenTTL)
		case "refresh_token_ttl":
			err = unmarshalDuration(d, &h.RefreshTokenTTL)
		case "refresh_grace":
			err = unmarshalDuration(d, &h.RefreshGrace)
		case "session_max_lifetime":
			err = unmarshalDuration(d, &h.SessionMaxLifetime)
		case "idp_confirm_interval":
			err = unmarshalDuration(d, &h.IdPConfirmInterval)
		case "idp_timeout":
			err = unmarshalDuration(d, &h.IdPTimeout)
		case "registration_rate":
			err = unmarshalInt(d, &h.RegistrationRate)
		case "registration_rate_total":
			err = unmarshalInt(d, &h.RegistrationRateTotal)
		case "cold_verify_rate":
			args := d.RemainingArgs()
			if len(args) < 1 || len(args) > 2 {
				return d.ArgErr()
			}
			for i, dst := range []*int{&h.ColdVerifyRate, &h.ColdVerifyRateGlobal}[:len(args)] {
				if err := wholeNumber(d, "cold_verify_rate", args[i], dst); err != nil {
					return err
				}
			}
		case "client_metadata_documents":
			var on bool
			if on, err = unmarshalOnOff(d); err == nil {
				h.ClientMetadataDocuments = &on
			}
		case "client_metadata_allow_private":
			err = unmarshalFlag(d, &h.ClientMetadataAllowPrivate)
		case "offline_access", "provisioning":
			if h.OfflineAccess != nil {
				return d.Errf("%s: offline_access already specified (provisioning is its old name)", d.Val())
			}
			if d.Val() == "provisioning" {
				caddy.Log().Named("caddyfile").Warn("mcp_oauth: provisioning is deprecated; rename it to offline_access",
					zap.String("file", d.File()), zap.Int("line", d.Line()))
			}
			h.OfflineAccess, err = unmarshalOfflineAccess(d)
		case "enterprise_managed":
			h.EnterpriseManaged, err = unmarshalEnterpriseManaged(d)
		case "background_client":
			c := new(BackgroundClient)
			if !d.AllArgs(&c.ClientID, &c.ClientSecret) {
				return d.Err("background_client: want an id and a secret")
			}
			h.BackgroundClients = append(h.BackgroundClients, c)
		case "background_token_rate":
			err = unmarshalInt(d, &h.BackgroundTokenRate)
		case "max_body_bytes":
			err = unmarshalInt(d, &h.MaxBodyBytes)
		case "storage":
			h.StorageRaw, err = unmarshalStorage(d)
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// once refuses the second occurrence of a subdirective in one block.
func once(d *caddyfile.Dispenser, seen map[string]bool) error {
	if seen[d.Val()] {
		return d.Errf("%s: already specified", d.Val())
	}
	seen[d.Val()] = true
	return nil
}

// unmarshalString reads the one argument of the current subdirective.
func unmarshalString(d *caddyfile.Dispenser, dst *string) error {
	if !d.AllArgs(dst) {
		return d.ArgErr()
	}
	return nil
}

// unmarshalList reads the one or more arguments of the current subdirective.
func unmarshalList(d *caddyfile.Dispenser, dst *[]string) error {
	if *dst = d.RemainingArgs(); len(*dst) == 0 {
		return d.ArgErr()
	}
	return nil
}

// unmarshalFlag sets a subdirective that takes no argument.
func unmarshalFlag(d *caddyfile.Dispenser, dst *bool) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	*dst = true
	return nil
}

// unmarshalOnOff reads the `on` or `off` argument of the current subdirective.
func unmarshalOnOff(d *caddyfile.Dispenser) (bool, error) {
	name := d.Val()
	var v string
	if !d.AllArgs(&v) {
		return false, d.ArgErr()
	}
	switch v {
	case "on":
		return true, nil
	case "off":
		return false, nil
	}
	return false, d.Errf("%s: want on or off, got %q", name, v)
}

// unmarshalDuration reads the one duration argument of the current subdirective.
func unmarshalDuration(d *caddyfile.Dispenser, dst *caddy.Duration) error {
	name := d.Val()
	var v string
	if !d.AllArgs(&v) {
		return d.ArgErr()
	}
	dur, err := caddy.ParseDuration(v)
	if err != nil {
		return d.Errf("%s: %v", name, err)
	}
	*dst = caddy.Duration(dur)
	return nil
}

// unmarshalInt reads the one whole-number argument of the current subdirective.
func unmarshalInt[T int | int64](d *caddyfile.Dispenser, dst *T) error {
	name := d.Val()
	var v string
	if !d.AllArgs(&v) {
		return d.ArgErr()
	}
	return wholeNumber(d, name, v, dst)
}

// wholeNumber parses v, an argument of the subdirective name, into dst.
func wholeNumber[T int | int64](d *caddyfile.Dispenser, name, v string, dst *T) error {
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || int64(T(n)) != n {
		return d.Errf("%s: want a whole number, got %q", name, v)
	}
	*dst = T(n)
	return nil
}

// unmarshalOfflineAccess reads the offline_access block (or provisioning, its old name).
func unmarshalOfflineAccess(d *caddyfile.Dispenser) (*OfflineAccess, error) {
	name := d.Val()
	p := new(OfflineAccess)
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := once(d, seen); err != nil {
			return nil, err
		}
		switch d.Val() {
		case "scopes":
			if p.Scopes = d.RemainingArgs(); len(p.Scopes) == 0 {
				return nil, d.ArgErr()
			}
		case "tools":
			if p.Tools = d.RemainingArgs(); len(p.Tools) == 0 {
				return nil, d.ArgErr()
			}
		case "callback_path":
			if err := unmarshalString(d, &p.CallbackPath); err != nil {
				return nil, err
			}
		default:
			return nil, d.Errf("%s: unrecognized subdirective %q", name, d.Val())
		}
	}
	return p, nil
}

// unmarshalEnterpriseManaged reads the enterprise_managed block: one issuer block per
// trusted enterprise identity provider.
func unmarshalEnterpriseManaged(d *caddyfile.Dispenser) (*EnterpriseManaged, error) {
	em := new(EnterpriseManaged)
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "issuer":
			ei, err := unmarshalEnterpriseIssuer(d)
			if err != nil {
				return nil, err
			}
			em.Issuers = append(em.Issuers, ei)
		default:
			return nil, d.Errf("enterprise_managed: unrecognized subdirective %q", d.Val())
		}
	}
	return em, nil
}

// unmarshalEnterpriseIssuer reads one issuer block of enterprise_managed.
func unmarshalEnterpriseIssuer(d *caddyfile.Dispenser) (*EnterpriseIssuer, error) {
	ei := new(EnterpriseIssuer)
	if !d.AllArgs(&ei.Issuer) {
		return nil, d.Err("enterprise_managed: issuer: want exactly one issuer URL")
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := once(d, seen); err != nil {
			return nil, err
		}
		switch d.Val() {
		case "jwks_uri":
			if err := unmarshalString(d, &ei.JWKSURI); err != nil {
				return nil, err
			}
		case "algorithms":
			if err := unmarshalList(d, &ei.Algorithms); err != nil {
				return nil, err
			}
		case "scopes":
			if err := unmarshalList(d, &ei.Scopes); err != nil {
				return nil, err
			}
		case "subject_prefix":
			if err := unmarshalString(d, &ei.SubjectPrefix); err != nil {
				return nil, err
			}
		default:
			return nil, d.Errf("enterprise_managed: issuer: unrecognized subdirective %q", d.Val())
		}
	}
	return ei, nil
}

func unmarshalClient(d *caddyfile.Dispenser) (*Client, error) {
	c := new(Client)
	if !d.AllArgs(&c.ClientID) {
		return nil, d.Err("client: want exactly one client id")
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if d.Val() != "redirect_uri" {
			if err := once(d, seen); err != nil {
				return nil, err
			}
		}
		switch d.Val() {
		case "name":
			if !d.AllArgs(&c.Name) {
				return nil, d.ArgErr()
			}
		case "redirect_uri":
			uris := d.RemainingArgs()
			if len(uris) == 0 {
				return nil, d.ArgErr()
			}
			c.RedirectURIs = append(c.RedirectURIs, uris...)
		case "scopes":
			if c.Scopes = d.RemainingArgs(); len(c.Scopes) == 0 {
				return nil, d.ArgErr()
			}
		case "secret":
			if !d.AllArgs(&c.Secret) {
				// Not d.ArgErr(), which would quote the secret's token.
				return nil, d.Err("client: secret: want exactly one secret")
			}
		case "token_endpoint_auth_method":
			if !d.AllArgs(&c.TokenEndpointAuthMethod) {
				return nil, d.ArgErr()
			}
		default:
			return nil, d.Errf("client: unrecognized subdirective %q", d.Val())
		}
	}
	return c, nil
}

func unmarshalDelegation(d *caddyfile.Dispenser) (*Delegation, error) {
	del := new(Delegation)
	if d.NextArg() {
		del.Mode = d.Val()
	}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := once(d, seen); err != nil {
			return nil, err
		}
		switch d.Val() {
		case "audience":
			if !d.AllArgs(&del.Audience) {
				return nil, d.ArgErr()
			}
		case "scopes":
			if del.Scopes = d.RemainingArgs(); len(del.Scopes) == 0 {
				return nil, d.ArgErr()
			}
		case "subject_header":
			if !d.AllArgs(&del.SubjectHeader) {
				return nil, d.ArgErr()
			}
		case "narrow":
			if !d.AllArgs(&del.Narrow) {
				return nil, d.ArgErr()
			}
		case "nextcloud_url":
			if !d.AllArgs(&del.NextcloudURL) {
				return nil, d.ArgErr()
			}
		case "nextcloud_public_url":
			if !d.AllArgs(&del.NextcloudPublicURL) {
				return nil, d.ArgErr()
			}
		case "user_claim":
			if !d.AllArgs(&del.UserClaim) {
				return nil, d.ArgErr()
			}
		case "user_agent":
			if !d.AllArgs(&del.UserAgent) {
				return nil, d.ArgErr()
			}
		default:
			return nil, d.Errf("delegation: unrecognized subdirective %q", d.Val())
		}
	}
	return del, nil
}

// unmarshalStorage reads `storage <module> { ... }` the way Caddy's global storage option
// does, into the module's JSON.
func unmarshalStorage(d *caddyfile.Dispenser) ([]byte, error) {
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	name := d.Val()
	unm, err := caddyfile.UnmarshalModule(d, "caddy.storage."+name)
	if err != nil {
		return nil, err
	}
	st, ok := unm.(caddy.StorageConverter)
	if !ok {
		return nil, d.Errf("storage: module %q is not a storage module", name)
	}
	return caddyconfig.JSONModuleObject(st, "module", name, nil), nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
