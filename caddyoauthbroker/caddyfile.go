package caddyoauthbroker

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
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
//		encryption_key    <base64 of 32 bytes> [<older>...]
//		client <client_id> {
//			name          <display name>
//			redirect_uri  <uri...>
//			scopes        <scope...>
//		}
//		registration      on|off
//		delegation        token_exchange|refresh|none {
//			audience       <aud>
//			scopes         <scope...>
//			subject_header <header>
//		}
//		tool_scope        <tool name or glob> <scope...>
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
//		provisioning {
//			scopes        <scope...>
//			tools         <tool name or glob...>
//		}
//		background_client <id> <secret>
//		background_token_rate <per minute>
//		max_body_bytes    <bytes>
//		storage           <module> { ... }
//	}
//
// Secrets may be written as `{env.NAME}` or `{file./path}` placeholders.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "mode", "issuer", "public_issuer", "client_id", "client_secret", "resource":
			if err := h.unmarshalString(d); err != nil {
				return err
			}
		case "audience":
			if h.Audience = d.RemainingArgs(); len(h.Audience) == 0 {
				return d.ArgErr()
			}
		case "scopes":
			if h.Scopes = d.RemainingArgs(); len(h.Scopes) == 0 {
				return d.ArgErr()
			}
		case "encryption_key":
			if h.EncryptionKeys = d.RemainingArgs(); len(h.EncryptionKeys) == 0 {
				return d.ArgErr()
			}
		case "client":
			c, err := unmarshalClient(d)
			if err != nil {
				return err
			}
			h.Clients = append(h.Clients, c)
		case "registration":
			if !d.NextArg() {
				return d.ArgErr()
			}
			switch d.Val() {
			case "on":
				h.DisableRegistration = false
			case "off":
				h.DisableRegistration = true
			default:
				return d.Errf("registration: want on or off, got %q", d.Val())
			}
			if d.NextArg() {
				return d.ArgErr()
			}
		case "delegation":
			del, err := unmarshalDelegation(d)
			if err != nil {
				return err
			}
			h.Delegation = del
		case "tool_scope":
			args := d.RemainingArgs()
			if len(args) < 2 {
				return d.Err("tool_scope: want a tool name or glob and at least one scope")
			}
			h.ToolScopes = append(h.ToolScopes, &ToolScope{Tool: args[0], Scopes: args[1:]})
		case "require_jwt_access_token_type":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.RequireJWTAccessTokenType = true
		case "session_ttl", "code_ttl", "access_token_ttl", "refresh_token_ttl", "refresh_grace", "idp_timeout",
			"session_max_lifetime", "idp_confirm_interval", "introspection_cache_ttl":
			if err := h.unmarshalDuration(d); err != nil {
				return err
			}
		case "max_body_bytes":
			n, err := unmarshalInt(d)
			if err != nil {
				return err
			}
			h.MaxBodyBytes = n
		case "registration_rate":
			n, err := unmarshalInt(d)
			if err != nil {
				return err
			}
			h.RegistrationRate = int(n)
		case "registration_rate_total":
			n, err := unmarshalInt(d)
			if err != nil {
				return err
			}
			h.RegistrationRateTotal = int(n)
		case "cold_verify_rate":
			args := d.RemainingArgs()
			if len(args) < 1 || len(args) > 2 {
				return d.ArgErr()
			}
			for i, a := range args {
				n, err := strconv.Atoi(a)
				if err != nil {
					return d.Errf("cold_verify_rate: want a whole number, got %q", a)
				}
				if i == 0 {
					h.ColdVerifyRate = n
				} else {
					h.ColdVerifyRateGlobal = n
				}
			}
		case "background_token_rate":
			n, err := unmarshalInt(d)
			if err != nil {
				return err
			}
			h.BackgroundTokenRate = int(n)
		case "client_metadata_documents":
			if !d.NextArg() {
				return d.ArgErr()
			}
			var on bool
			switch d.Val() {
			case "on":
				on = true
			case "off":
			default:
				return d.Errf("client_metadata_documents: want on or off, got %q", d.Val())
			}
			h.ClientMetadataDocuments = &on
			if d.NextArg() {
				return d.ArgErr()
			}
		case "client_metadata_allow_private":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.ClientMetadataAllowPrivate = true
		case "provisioning":
			p, err := unmarshalProvisioning(d)
			if err != nil {
				return err
			}
			h.Provisioning = p
		case "background_client":
			c := new(BackgroundClient)
			if !d.AllArgs(&c.ClientID, &c.ClientSecret) {
				return d.Err("background_client: want an id and a secret")
			}
			h.BackgroundClients = append(h.BackgroundClients, c)
		case "storage":
			raw, err := unmarshalStorage(d)
			if err != nil {
				return err
			}
			h.StorageRaw = raw
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
	}
	return nil
}

func (h *Handler) unmarshalString(d *caddyfile.Dispenser) error {
	name := d.Val()
	var v string
	if !d.AllArgs(&v) {
		return d.ArgErr()
	}
	switch name {
	case "mode":
		h.Mode = v
	case "issuer":
		h.Issuer = v
	case "public_issuer":
		h.PublicIssuer = v
	case "client_id":
		h.ClientID = v
	case "client_secret":
		h.ClientSecret = v
	case "resource":
		h.Resource = v
	}
	return nil
}

func (h *Handler) unmarshalDuration(d *caddyfile.Dispenser) error {
	name := d.Val()
	var v string
	if !d.AllArgs(&v) {
		return d.ArgErr()
	}
	dur, err := caddy.ParseDuration(v)
	if err != nil {
		return d.Errf("%s: %v", name, err)
	}
	switch name {
	case "session_ttl":
		h.SessionTTL = caddy.Duration(dur)
	case "code_ttl":
		h.CodeTTL = caddy.Duration(dur)
	case "access_token_ttl":
		h.AccessTokenTTL = caddy.Duration(dur)
	case "refresh_token_ttl":
		h.RefreshTokenTTL = caddy.Duration(dur)
	case "refresh_grace":
		h.RefreshGrace = caddy.Duration(dur)
	case "idp_timeout":
		h.IdPTimeout = caddy.Duration(dur)
	case "session_max_lifetime":
		h.SessionMaxLifetime = caddy.Duration(dur)
	case "idp_confirm_interval":
		h.IdPConfirmInterval = caddy.Duration(dur)
	case "introspection_cache_ttl":
		h.IntrospectionCacheTTL = caddy.Duration(dur)
	}
	return nil
}

// unmarshalInt reads the one whole-number argument of the current subdirective.
func unmarshalInt(d *caddyfile.Dispenser) (int64, error) {
	name := d.Val()
	var v string
	if !d.AllArgs(&v) {
		return 0, d.ArgErr()
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, d.Errf("%s: want a whole number, got %q", name, v)
	}
	return n, nil
}

func unmarshalProvisioning(d *caddyfile.Dispenser) (*Provisioning, error) {
	p := new(Provisioning)
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "scopes":
			if p.Scopes = d.RemainingArgs(); len(p.Scopes) == 0 {
				return nil, d.ArgErr()
			}
		case "tools":
			if p.Tools = d.RemainingArgs(); len(p.Tools) == 0 {
				return nil, d.ArgErr()
			}
		default:
			return nil, d.Errf("provisioning: unrecognized subdirective %q", d.Val())
		}
	}
	return p, nil
}

func unmarshalClient(d *caddyfile.Dispenser) (*Client, error) {
	c := new(Client)
	if !d.AllArgs(&c.ClientID) {
		return nil, d.Err("client: want exactly one client id")
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
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
	for nesting := d.Nesting(); d.NextBlock(nesting); {
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
