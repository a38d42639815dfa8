package redisstorage

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func init() {
	caddy.RegisterModule(Storage{})
	redis.SetLogger(clientLog{})
}

// clientLog sends go-redis's own messages (a failed dial, a pool event) to Caddy's log at
// debug level instead of stderr: while Redis is down every operation would print one, and
// the operations' errors already say what failed.
type clientLog struct{}

func (clientLog) Printf(_ context.Context, format string, v ...any) {
	if ce := caddy.Log().Named("storage.mcp_oauth_redis.client").Check(zap.DebugLevel, "go-redis"); ce != nil {
		ce.Write(zap.String("message", fmt.Sprintf(format, v...)))
	}
}

// Defaults of the configuration, stated in the fields' doc comments.
const (
	defaultAddress      = "127.0.0.1:6379"
	defaultKeyPrefix    = "caddy"
	defaultDialTimeout  = 5 * time.Second
	defaultReadTimeout  = 3 * time.Second
	defaultWriteTimeout = 3 * time.Second
)

// Storage is the caddy.storage.mcp_oauth_redis module: a certmagic.Storage and
// certmagic.Locker in Redis, with storage.Native's server-side TTL and atomic take-once.
type Storage struct {
	// The Redis server as host:port, exactly one: several would be a Redis Cluster, which
	// is refused (see the package documentation). With sentinel_master, the Sentinels'
	// addresses instead, one or more. Supports `{env.*}` and `{file.*}` placeholders.
	// Default: ["127.0.0.1:6379"].
	Addresses []string `json:"addresses,omitempty"`

	// The ACL user to authenticate as (Redis 6 and later). Supports `{env.*}` and
	// `{file.*}` placeholders. Default: none (the default user).
	Username string `json:"username,omitempty"`

	// The password of username, or the server's requirepass. Supports `{env.*}` and
	// `{file.*}` placeholders. Default: none.
	Password string `json:"password,omitempty"`

	// The database number. Default: 0.
	DB int `json:"db,omitempty"`

	// What every key of this storage starts with; values live under "<key_prefix>/" and
	// locks under "<key_prefix>:lock:". Instances that share storage use the same prefix.
	// Default: "caddy".
	KeyPrefix string `json:"key_prefix,omitempty"`

	// Connect with TLS, verifying the server's certificate. Default: false.
	TLS bool `json:"tls,omitempty"`

	// The name the server's certificate must carry. Needs tls. Default: the host of the
	// address connected to.
	TLSServerName string `json:"tls_server_name,omitempty"`

	// A PEM file of the CAs the server's certificate must chain to. Needs tls.
	// Default: the system's roots.
	TLSCAFile string `json:"tls_ca_file,omitempty"`

	// How long connecting may take. Default: 5s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`

	// How long a reply may take. Default: 3s.
	ReadTimeout caddy.Duration `json:"read_timeout,omitempty"`

	// How long sending a command may take. Default: 3s.
	WriteTimeout caddy.Duration `json:"write_timeout,omitempty"`

	// The master's name as the Sentinels know it. Set, the module asks the Sentinels at
	// addresses for the master and follows failovers. Default: none (no Sentinel).
	SentinelMaster string `json:"sentinel_master,omitempty"`

	// The ACL user to authenticate to the Sentinels as. Supports `{env.*}` and `{file.*}`
	// placeholders. Default: none.
	SentinelUsername string `json:"sentinel_username,omitempty"`

	// The Sentinels' password. Supports `{env.*}` and `{file.*}` placeholders.
	// Default: none.
	SentinelPassword string `json:"sentinel_password,omitempty"`

	conn    *conn
	poolKey string
	logger  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Storage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.mcp_oauth_redis",
		New: func() caddy.Module { return new(Storage) },
	}
}

// connections are the Redis clients of the loaded configurations, keyed by what they
// connect to: a config reload with the same storage keeps its client (and its held locks)
// while the old configuration's requests finish.
var connections = caddy.NewUsagePool()

// Provision applies defaults, resolves placeholders and builds the client, which connects
// on first use: Provision needs no network, as it also runs for `caddy validate`.
func (s *Storage) Provision(ctx caddy.Context) error {
	s.logger = ctx.Logger()
	s.setDefaults()
	repl := caddy.NewReplacer()
	for i := range s.Addresses {
		s.Addresses[i] = repl.ReplaceKnown(s.Addresses[i], "")
	}
	for name, f := range map[string]*string{"username": &s.Username, "password": &s.Password,
		"sentinel_username": &s.SentinelUsername, "sentinel_password": &s.SentinelPassword,
		"tls_server_name": &s.TLSServerName, "tls_ca_file": &s.TLSCAFile} {
		given := *f
		*f = repl.ReplaceKnown(given, "")
		if *f == "" && given != "" {
			// An unset variable or an empty file would silently mean no password.
			return fmt.Errorf("%s: %s is empty; set it, or leave %s out", name, given, name)
		}
	}

	key, err := s.connectionKey()
	if err != nil {
		return err
	}
	v, _, err := connections.LoadOrNew(key, func() (caddy.Destructor, error) {
		client, err := s.newClient()
		if err != nil {
			return nil, err
		}
		return newConn(client, s.logger), nil
	})
	if err != nil {
		return err
	}
	s.poolKey = key
	s.conn = v.(*conn)
	return nil
}

// setDefaults fills the fields left empty with their documented defaults.
func (s *Storage) setDefaults() {
	if len(s.Addresses) == 0 {
		s.Addresses = []string{defaultAddress}
	}
	if s.KeyPrefix == "" {
		s.KeyPrefix = defaultKeyPrefix
	}
	if s.DialTimeout == 0 {
		s.DialTimeout = caddy.Duration(defaultDialTimeout)
	}
	if s.ReadTimeout == 0 {
		s.ReadTimeout = caddy.Duration(defaultReadTimeout)
	}
	if s.WriteTimeout == 0 {
		s.WriteTimeout = caddy.Duration(defaultWriteTimeout)
	}
}

// connectionKey names the client a configuration needs: its fields after placeholders,
// hashed so that no password is kept as a map key.
func (s *Storage) connectionKey() (string, error) {
	raw, err := json.Marshal(s)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(raw)
	return hex.EncodeToString(sum[:]), nil
}

// newClient builds the go-redis client: a plain client, or a failover client following the
// Sentinels' master.
func (s *Storage) newClient() (redis.UniversalClient, error) {
	var tlsConfig *tls.Config
	if s.TLS {
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12, ServerName: s.TLSServerName}
		if s.TLSCAFile != "" {
			pem, err := os.ReadFile(s.TLSCAFile)
			if err != nil {
				return nil, fmt.Errorf("tls_ca_file: %w", err)
			}
			tlsConfig.RootCAs = x509.NewCertPool()
			if !tlsConfig.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("tls_ca_file: %s holds no PEM certificate", s.TLSCAFile)
			}
		}
	}
	// One server, or its Sentinels when sentinel_master is set (Validate refuses several
	// servers otherwise, so this is never a cluster client).
	client := redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:                 s.Addresses,
		MasterName:            s.SentinelMaster,
		SentinelUsername:      s.SentinelUsername,
		SentinelPassword:      s.SentinelPassword,
		Username:              s.Username,
		Password:              s.Password,
		DB:                    s.DB,
		DialTimeout:           time.Duration(s.DialTimeout),
		ReadTimeout:           time.Duration(s.ReadTimeout),
		WriteTimeout:          time.Duration(s.WriteTimeout),
		ContextTimeoutEnabled: true,
		MaxRetries:            maxRetries,
		DialerRetries:         dialerRetries,
		TLSConfig:             tlsConfig,
	})
	client.AddHook(operationBound(time.Duration(s.DialTimeout + s.WriteTimeout + s.ReadTimeout)))
	return client, nil
}

// Retries on network errors: one retry of a command and of a dial, so that an operation
// on a Redis that is down fails within about twice its timeouts rather than the client's
// default five dials per attempt.
const (
	maxRetries    = 1
	dialerRetries = 1
)

// Validate refuses a configuration that cannot work, naming the field and the fix.
func (s *Storage) Validate() error {
	switch {
	case len(s.Addresses) == 0:
		return errors.New("addresses: required")
	case len(s.Addresses) > 1 && s.SentinelMaster == "":
		return fmt.Errorf("addresses: %d addresses would be a Redis Cluster, which this module does not support "+
			"(List must see every key under a prefix, and a SCAN on a cluster sees one node's); "+
			"give one server, or set sentinel_master and list the Sentinels", len(s.Addresses))
	case s.DB < 0:
		return fmt.Errorf("db: want 0 or more, got %d", s.DB)
	case strings.HasSuffix(s.KeyPrefix, "/"):
		return fmt.Errorf("key_prefix: %q ends with \"/\", which the module adds itself", s.KeyPrefix)
	case s.DialTimeout < 0 || s.ReadTimeout < 0 || s.WriteTimeout < 0:
		return errors.New("dial_timeout, read_timeout, write_timeout: want a positive duration")
	case !s.TLS && (s.TLSServerName != "" || s.TLSCAFile != ""):
		return errors.New("tls_server_name, tls_ca_file: need tls")
	case s.SentinelMaster == "" && (s.SentinelUsername != "" || s.SentinelPassword != ""):
		return errors.New("sentinel_username, sentinel_password: need sentinel_master")
	}
	for i, a := range s.Addresses {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("addresses[%d]: want host:port, got %q", i, a)
		}
	}
	return nil
}

// Cleanup releases this configuration's use of the client, which closes when no loaded
// configuration uses it any more. It copes with a Provision that failed before the client.
func (s *Storage) Cleanup() error {
	if s.poolKey == "" {
		return nil
	}
	_, err := connections.Delete(s.poolKey)
	return err
}

// MarshalLogObject is how the storage appears in logs: certmagic and Caddy log their
// storage with zap.Any (when cleaning storage, when a lock cannot be released), which would
// otherwise print every field, passwords included. No secret is logged.
func (s *Storage) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("module", "mcp_oauth_redis")
	if err := enc.AddArray("addresses", zapcore.ArrayMarshalerFunc(func(a zapcore.ArrayEncoder) error {
		for _, addr := range s.Addresses {
			a.AppendString(addr)
		}
		return nil
	})); err != nil {
		return err
	}
	enc.AddInt("db", s.DB)
	enc.AddString("key_prefix", s.KeyPrefix)
	if s.SentinelMaster != "" {
		enc.AddString("sentinel_master", s.SentinelMaster)
	}
	enc.AddBool("tls", s.TLS)
	return nil
}

// String names the storage for messages that print it, without secrets.
func (s *Storage) String() string {
	return fmt.Sprintf("mcp_oauth_redis:%s/%d/%s", strings.Join(s.Addresses, ","), s.DB, s.KeyPrefix)
}

// CertMagicStorage returns the storage itself.
func (s *Storage) CertMagicStorage() (certmagic.Storage, error) {
	return s, nil
}

// Interface guards
var (
	_ caddy.Provisioner       = (*Storage)(nil)
	_ caddy.Validator         = (*Storage)(nil)
	_ caddy.CleanerUpper      = (*Storage)(nil)
	_ caddy.StorageConverter  = (*Storage)(nil)
	_ certmagic.Storage       = (*Storage)(nil)
	_ certmagic.TryLocker     = (*Storage)(nil)
	_ zapcore.ObjectMarshaler = (*Storage)(nil)
	_ fmt.Stringer            = (*Storage)(nil)
)
