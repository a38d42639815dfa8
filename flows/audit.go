package flows

import "go.uber.org/zap"

// loggers are the broker's named loggers, one per concern, all under Config.Logger (in
// Caddy: http.handlers.mcp_oauth), so that an admin can level or route each by name
// (http.handlers.mcp_oauth.token, …). Built once in New.
type loggers struct {
	authorize  *zap.Logger // authorize_*.go: the authorization endpoint
	consent    *zap.Logger // consent.go
	login      *zap.Logger // idp_login.go, granted.go: the IdP login and its callback
	token      *zap.Logger // token*.go, broker_tokens.go, revoke.go
	resource   *zap.Logger // resource.go, forward.go, upstream_scopes.go: requests to the MCP endpoint, its metadata
	delegation *zap.Logger // delegation*.go
	offline    *zap.Logger // offline_access*.go, background_token.go
	register   *zap.Logger // register.go, clients.go, cimd.go
	storage    *zap.Logger // store*.go
	// audit has one entry per security-relevant event, its message the event's name
	// (the audit* constants); see audit.
	audit *zap.Logger
}

func newLoggers(root *zap.Logger) loggers {
	return loggers{
		authorize:  root.Named("authorize"),
		consent:    root.Named("consent"),
		login:      root.Named("login"),
		token:      root.Named("token"),
		resource:   root.Named("resource"),
		delegation: root.Named("delegation"),
		offline:    root.Named("offline"),
		register:   root.Named("register"),
		storage:    root.Named("storage"),
		audit:      root.Named("audit"),
	}
}

// forPath is the logger of the concern that answers path, for the one error writer.
func (l *loggers) forPath(path string) *zap.Logger {
	switch path {
	case pathAuthorize:
		return l.authorize
	case pathConsent:
		return l.consent
	case pathCallback:
		return l.login
	case pathToken, pathRevoke:
		return l.token
	case pathRegister:
		return l.register
	case pathAppPasswordStart:
		return l.delegation
	case pathOfflineAccessStart, pathOfflineAccessStartLegacy, pathOfflineAccessStatus, pathOfflineAccessStatusLegacy,
		OfflineAccessCallback, OfflineAccessCallbackLegacy, pathBackgroundToken:
		return l.offline
	}
	return l.resource // the MCP endpoint, the metadata documents
}

// The audit events: the messages of the audit logger (http.handlers.mcp_oauth.audit). Their
// names are stable; an admin may alert on them.
const (
	auditClientRegistered      = "client_registered"
	auditConsentGiven          = "consent_given"
	auditSessionCreated        = "session_created"
	auditTokenRefreshed        = "token_refreshed"
	auditReuseDetected         = "reuse_detected"
	auditSessionRevoked        = "session_revoked"
	auditOfflineAccessGranted  = "offline_access_granted"
	auditOfflineAccessRevoked  = "offline_access_revoked"
	auditBackgroundTokenIssued = "background_token_issued"
	// Delegation mode app_password: a Login Flow v2 started for a user; the app password
	// it yielded stored (the user's own), refused (another account's, or unverifiable:
	// deleted in Nextcloud), revoked (by the user, or found invalid by Nextcloud).
	auditAppPasswordFlowStarted = "app_password_flow_started"
	auditAppPasswordGranted     = "app_password_granted"
	auditAppPasswordRefused     = "app_password_refused"
	auditAppPasswordRevoked     = "app_password_revoked"
)

// audit logs event at INFO with the client's IP (when known, else "") and fields. Fields
// name the subject, the client id and at most a Fingerprint of a token: never a token,
// code, verifier, secret, cookie or Authorization value (SECURITY.md W13).
func (b *Broker) audit(event, ip string, fields ...zap.Field) {
	ce := b.log.audit.Check(zap.InfoLevel, event)
	if ce == nil {
		return
	}
	if ip != "" {
		fields = append(fields, zap.String("client_ip", ip))
	}
	ce.Write(fields...)
}
