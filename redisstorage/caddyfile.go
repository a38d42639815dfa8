package redisstorage

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// UnmarshalCaddyfile reads the module's block, as Caddy's global `storage` option and
// mcp_oauth's `storage` subdirective give it. Each subdirective may appear once.
//
// Syntax:
//
//	mcp_oauth_redis {
//		addresses         <host:port>...
//		username          <user>
//		password          <password>
//		db                <number>
//		key_prefix        <prefix>
//		tls
//		tls_server_name   <name>
//		tls_ca_file       <path>
//		dial_timeout      <duration>
//		read_timeout      <duration>
//		write_timeout     <duration>
//		sentinel_master   <name>
//		sentinel_username <user>
//		sentinel_password <password>
//	}
func (s *Storage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module's name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for d.NextBlock(0) {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("%s: given twice", sub)
		}
		seen[sub] = true
		switch sub {
		case "addresses":
			s.Addresses = d.RemainingArgs()
			if len(s.Addresses) == 0 {
				return d.ArgErr()
			}
		case "username":
			if err := oneArg(d, &s.Username); err != nil {
				return err
			}
		case "password":
			if err := oneArg(d, &s.Password); err != nil {
				return err
			}
		case "db":
			var n string
			if err := oneArg(d, &n); err != nil {
				return err
			}
			db, err := strconv.Atoi(n)
			if err != nil {
				return d.Errf("db: want a number, got %q", n)
			}
			s.DB = db
		case "key_prefix":
			if err := oneArg(d, &s.KeyPrefix); err != nil {
				return err
			}
		case "tls":
			if d.NextArg() {
				return d.ArgErr()
			}
			s.TLS = true
		case "tls_server_name":
			if err := oneArg(d, &s.TLSServerName); err != nil {
				return err
			}
		case "tls_ca_file":
			if err := oneArg(d, &s.TLSCAFile); err != nil {
				return err
			}
		case "dial_timeout":
			if err := durationArg(d, sub, &s.DialTimeout); err != nil {
				return err
			}
		case "read_timeout":
			if err := durationArg(d, sub, &s.ReadTimeout); err != nil {
				return err
			}
		case "write_timeout":
			if err := durationArg(d, sub, &s.WriteTimeout); err != nil {
				return err
			}
		case "sentinel_master":
			if err := oneArg(d, &s.SentinelMaster); err != nil {
				return err
			}
		case "sentinel_username":
			if err := oneArg(d, &s.SentinelUsername); err != nil {
				return err
			}
		case "sentinel_password":
			if err := oneArg(d, &s.SentinelPassword); err != nil {
				return err
			}
		default:
			return d.Errf("mcp_oauth_redis: unrecognized subdirective %q", sub)
		}
	}
	return nil
}

// oneArg reads the subdirective's single argument into dst.
func oneArg(d *caddyfile.Dispenser, dst *string) error {
	if !d.AllArgs(dst) {
		return d.ArgErr()
	}
	return nil
}

// durationArg reads the subdirective sub's single argument as a Caddy duration into dst.
func durationArg(d *caddyfile.Dispenser, sub string, dst *caddy.Duration) error {
	var s string
	if err := oneArg(d, &s); err != nil {
		return err
	}
	v, err := caddy.ParseDuration(s)
	if err != nil {
		return d.Errf("%s: %v", sub, err)
	}
	*dst = caddy.Duration(v)
	return nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Storage)(nil)
)
