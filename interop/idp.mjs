#!/usr/bin/env node
// A second, spec-complete IdP for the interop tests: npm oidc-provider, in one of two
// profiles that mimic the IdPs mcp_oauth meets in Nextcloud deployments.
//
//   nextcloud  like the Nextcloud `oidc` app: opaque access tokens checked by introspection,
//              900 s access and refresh tokens, refresh tokens only with offline_access and
//              rotated on every use, no token-exchange grant; token answers without `scope`,
//              and a scope the client is not allowed (allowedScopes) dropped silently.
//   keycloak   like Keycloak: JWT access tokens whose aud is the RFC 8707 resource (or a
//              default audience), and an RFC 8693 token-exchange grant.
//
// Usage: node idp.mjs --profile nextcloud|keycloak [--port N] [--config JSON]
// JSON: {"clients": [oidc-provider client metadata...], "defaultAudience": "...",
//        "allowedScopes": {"<client_id>": "<scope ...>"}} (nextcloud: the scopes a client
//        may be granted; others it asks for are dropped without an error).
// On loopback only. Prints one JSON line {"issuer": ...} on stdout once it listens.
// Logins go through oidc-provider's devInteractions: any login name is accepted as the
// subject; the harness drives the forms with an HTTP client. POST /test/revoke-grants?sub=
// revokes an account's grants (see below).
import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';
import { jwtVerify, createLocalJWKSet } from 'jose';

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
const API_SCOPES = ['notes:read', 'notes:write'];

const { values: args } = parseArgs({
  options: {
    profile: { type: 'string' },
    port: { type: 'string', default: '0' },
    config: { type: 'string', default: '{}' },
  },
});
if (!['nextcloud', 'keycloak'].includes(args.profile)) {
  console.error('idp: --profile must be nextcloud or keycloak');
  process.exit(2);
}
const keycloak = args.profile === 'keycloak';
const cfg = JSON.parse(args.config);

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJWK = { ...privateKey.export({ format: 'jwk' }), kid: `${args.profile}-1`, use: 'sig', alg: 'RS256' };
const { d, p, q, dp, dq, qi, ...publicJWK } = signingJWK;
const localKeys = createLocalJWKSet({ keys: [publicJWK] });

// Clients: the broker's confidential client (and any other) as given; a confidential
// client may also exchange tokens where the profile has the grant.
const clients = (cfg.clients ?? []).map((c) => {
  const grants = new Set(c.grant_types ?? ['authorization_code', 'refresh_token']);
  if (keycloak && c.client_secret) grants.add(TOKEN_EXCHANGE);
  if (!keycloak) grants.delete(TOKEN_EXCHANGE);
  return { ...c, grant_types: [...grants] };
});

// The server listens first so that the issuer carries the real port.
const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(Number(args.port), '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;
const defaultAudience = cfg.defaultAudience ?? `${issuer}/default-audience`;

// resourceServer describes the API an audience names: JWT access tokens for it.
function resourceServer(audience, scope = API_SCOPES.join(' ')) {
  return {
    scope,
    audience,
    accessTokenTTL: 300,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  };
}

const configuration = {
  clients,
  jwks: { keys: [signingJWK] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  // API scopes are listed for both (DCR checks a client's scope against them); with
  // resource indicators (keycloak) they end up in the resource's JWT, not at userinfo.
  scopes: ['openid', 'offline_access', 'profile', 'email', ...API_SCOPES],
  claims: { profile: ['name', 'preferred_username'], email: ['email', 'email_verified'] },
  async findAccount(_ctx, sub) {
    return {
      accountId: sub,
      async claims() {
        return { sub, name: `Test User ${sub}`, preferred_username: sub, email: `${sub}@example.test`, email_verified: true };
      },
    };
  },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    // Both IdPs let clients register (the Nextcloud app drops them after an hour).
    registration: { enabled: true },
    resourceIndicators: keycloak
      ? {
        enabled: true,
        defaultResource: () => defaultAudience,
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, indicator) => resourceServer(indicator),
      }
      : { enabled: false },
  },
  issueRefreshToken: async (_ctx, client, code) => client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
  rotateRefreshToken: () => true,
  ttl: keycloak
    ? { AccessToken: 300, RefreshToken: 1800, IdToken: 300, AuthorizationCode: 60, Interaction: 600, Session: 3600, Grant: 3600 }
    : { AccessToken: 900, RefreshToken: 900, IdToken: 900, AuthorizationCode: 60, Interaction: 600, Session: 3600, Grant: 3600 },
  // Silences the "change me" advice; the defaults are what a test wants.
  clientBasedCORS: () => true,
  renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
};

const provider = new Provider(issuer, configuration);

if (!keycloak) {
  // The Nextcloud oidc app grants a client only its allowed scopes and drops the others
  // without an error, and its token answers carry no `scope`: a client learns what it
  // was granted by introspection.
  const allowed = cfg.allowedScopes ?? {};
  provider.use(async (ctx, next) => {
    const only = ctx.path === '/auth' && allowed[ctx.query.client_id];
    if (only && typeof ctx.query.scope === 'string') {
      const keep = new Set(only.split(' '));
      ctx.query = { ...ctx.query, scope: ctx.query.scope.split(' ').filter((s) => keep.has(s)).join(' ') };
    }
    await next();
    if (ctx.path === '/token' && ctx.body && typeof ctx.body === 'object') delete ctx.body.scope;
  });
}

if (keycloak) {
  // RFC 8693 as Keycloak's standard token exchange does it: a client exchanges an access
  // token it holds (issued by this IdP to that client) for one aimed at another audience,
  // with scopes narrowed to those asked for.
  provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
    const p = ctx.oidc.params;
    const { client } = ctx.oidc;
    if (!p.subject_token) throw new errors.InvalidRequest('missing subject_token');
    if (p.subject_token_type !== ACCESS_TOKEN_TYPE) throw new errors.InvalidRequest('unsupported subject_token_type');
    if (p.requested_token_type && p.requested_token_type !== ACCESS_TOKEN_TYPE) {
      throw new errors.InvalidRequest('unsupported requested_token_type');
    }
    let subject;
    try {
      ({ payload: subject } = await jwtVerify(p.subject_token, localKeys, { issuer, typ: 'at+jwt' }));
    } catch {
      throw new errors.InvalidGrant('subject_token is invalid');
    }
    if (subject.client_id !== client.clientId) throw new errors.InvalidGrant('subject_token was issued to another client');
    const audiences = [].concat(p.audience ?? [], p.resource ?? []);
    if (audiences.length > 1) throw new errors.InvalidTarget('only one audience is supported');
    const audience = audiences[0] ?? subject.aud;
    const held = new Set(String(subject.scope ?? '').split(' ').filter(Boolean));
    const asked = p.scope ? p.scope.split(' ').filter(Boolean) : [...held];
    const scope = asked.filter((s) => held.has(s) && API_SCOPES.includes(s));
    if (p.scope && scope.length !== asked.length) throw new errors.InvalidScope('scope exceeds the subject token', asked.filter((s) => !scope.includes(s)).join(' '));

    const token = new provider.AccessToken({
      accountId: subject.sub,
      client,
      gty: 'token_exchange',
      scope: scope.join(' ') || undefined,
    });
    token.resourceServer = new provider.ResourceServer(audience, resourceServer(audience, scope.join(' ')));
    ctx.oidc.entity('AccessToken', token);
    const value = await token.save();
    ctx.body = {
      access_token: value,
      issued_token_type: ACCESS_TOKEN_TYPE,
      token_type: 'Bearer',
      expires_in: token.expiration,
      scope: token.scope,
    };
  }, ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'requested_token_type', 'audience', 'resource', 'scope'], ['audience', 'resource']);
}

// Events the harness may want to count, one JSON line each on stderr.
for (const ev of ['grant.success', 'introspection.error', 'grant.error', 'server_error']) {
  provider.on(ev, (ctx, err) => {
    const line = { event: ev, grant_type: ctx?.oidc?.params?.grant_type };
    if (err) line.error = err.message ?? String(err);
    if (ev === 'server_error' && err?.stack) line.stack = err.stack;
    process.stderr.write(`${JSON.stringify(line)}\n`);
  });
}

// Test hook, not an OAuth endpoint: POST /test/revoke-grants?sub=SUB revokes every grant
// of an account (its access and refresh tokens), as an admin disabling the user or the
// user withdrawing the grant does. Answers {"revoked": N}.
const grantsOf = new Map(); // accountId → Set of grantIds
for (const ev of ['access_token.saved', 'refresh_token.saved']) {
  provider.on(ev, (token) => {
    if (!token.accountId || !token.grantId) return;
    if (!grantsOf.has(token.accountId)) grantsOf.set(token.accountId, new Set());
    grantsOf.get(token.accountId).add(token.grantId);
  });
}
const callback = provider.callback();
server.on('request', async (req, res) => {
  const u = new URL(req.url, issuer);
  if (u.pathname !== '/test/revoke-grants') return callback(req, res);
  if (req.method !== 'POST') {
    res.writeHead(405).end();
    return;
  }
  const grants = grantsOf.get(u.searchParams.get('sub') ?? '') ?? new Set();
  for (const grantId of grants) await provider.RefreshToken.revokeByGrantId(grantId);
  grantsOf.delete(u.searchParams.get('sub') ?? '');
  res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ revoked: grants.size }));
});
process.stdout.write(`${JSON.stringify({ issuer, profile: args.profile, defaultAudience })}\n`);
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => server.close(() => process.exit(0)));
