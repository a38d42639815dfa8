#!/usr/bin/env node
// A second, spec-complete IdP for the interop tests: npm oidc-provider, in one of two
// profiles that mimic the IdPs mcp_oauth meets in Nextcloud deployments.
//
//   nextcloud  like the Nextcloud `oidc` app, release 2.0.9 (see "The nextcloud profile" below).
//   keycloak   like Keycloak: JWT access tokens whose aud is the RFC 8707 resource (or a
//              default audience), and an RFC 8693 token-exchange grant whose `audience`
//              may be a client id (nextcloud-mcp-server) and whose `scope` may name
//              openid, profile and email besides the API scopes the subject holds; the
//              same grant issues Identity Assertion JWT Authorization Grants (ID-JAGs,
//              draft-ietf-oauth-identity-assertion-authz-grant, MCP's Enterprise-Managed
//              Authorization) for an ID token, by the enterprise policy "idJag" (below).
//
// Usage: node idp.mjs --profile nextcloud|keycloak [--port N] [--config JSON]
// JSON: {"clients": [oidc-provider client metadata...], "defaultAudience": "..."} and, for
//        nextcloud, the `oidc` app's client settings and app settings:
//        "allowedScopes": {"<client_id>": "<scope ...>"} (the scopes a client may be granted;
//                         others it asks for are dropped without an error; default: all),
//        "tokenTypes":    {"<client_id>": "jwt"|"opaque"} (access token type; default opaque),
//        "resourceUrls":  {"<client_id>": "<url>"} (the client's resource identifier),
//        "expireTime": 900, "refreshExpireTime": 900 (the app's two lifetimes, seconds).
//        For keycloak, the enterprise policy of ID-JAGs:
//        "idJag": {"<client_id>": {"clientId": "<its id at the resource's AS>",
//                                  "scope": "<the most it may get there>"}}
//        (no entry: the client gets no ID-JAG); also settable by /test/client-settings.
// On loopback only. Prints one JSON line {"issuer": ...} on stdout once it listens.
// Logins go through oidc-provider's devInteractions: any login name is accepted as the
// subject; the harness drives the forms with an HTTP client. Test hooks, not OAuth
// endpoints: POST /test/revoke-grants?sub= revokes an account's grants, POST
// /test/clock?advance=SECONDS moves the IdP's clock forward, POST
// /test/client-settings?client_id= changes a client's oidc app settings (see below).
//
// The nextcloud profile follows the `oidc` app 2.0.9, as read in its authorization and
// token controllers, its JWT generator and its defaults:
//   - access tokens are the client's token type: opaque (the app's default; checked by
//     introspection) or an RS256 JWT (typ at+JWT) with sub = the uid, client_id, azp,
//     preferred_username, acr "0" and scope = everything granted, openid included;
//   - a JWT's aud is fixed at authorization: the `resource` parameter, else the client's
//     resource identifier, else its client id (one string); `resource` at the token
//     endpoint is ignored;
//   - a JWT's iss is the scheme and Host of the token request, not a configured issuer;
//   - refresh takes no `scope` and no `resource` (both ignored); refresh tokens come only
//     with offline_access, rotate on every use without grace (the old one is simply
//     unknown, the new one stays good) and die refreshExpireTime after the access token
//     issued with them expires, i.e. expireTime + refreshExpireTime (1800 s) after issue;
//   - token answers carry no `scope`, and refresh_expires_in beside a refresh token;
//   - grant types other than authorization_code and refresh_token (token exchange) are
//     answered 400 invalid_grant, as the app does.
import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';
import { jwtVerify, createLocalJWKSet, SignJWT } from 'jose';

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
const ID_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:id_token';
const ID_JAG_TYPE = 'urn:ietf:params:oauth:token-type:id-jag';
// API scopes in both spellings: the broker's examples (notes:read) and the Nextcloud MCP
// server's per-app scopes (notes.read). The oidc app takes any scope a client is allowed.
const API_SCOPES = ['notes:read', 'notes:write', 'notes.read', 'notes.write'];
// Identity scopes a keycloak-profile token exchange keeps when asked (see the grant).
const IDENTITY_SCOPES = ['openid', 'profile', 'email'];

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
cfg.allowedScopes ??= {};
cfg.tokenTypes ??= {};
cfg.resourceUrls ??= {};
cfg.idJag ??= {};
const expireTime = cfg.expireTime ?? 900;
const refreshExpireTime = cfg.refreshExpireTime ?? 900;
const tokenTypeOf = (clientId) => cfg.tokenTypes[clientId] ?? 'opaque';

// The IdP's clock, moved forward by POST /test/clock: oidc-provider and its memory
// adapter read Date.now.
let clockOffsetMs = 0;
const realNow = Date.now;
Date.now = () => realNow() + clockOffsetMs;

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

const ALL_SCOPES = ['openid', 'offline_access', 'profile', 'email', ...API_SCOPES];

// Nextcloud: a JWT client's token without a `resource` and without a resource
// identifier is for the client itself. oidc-provider wants a URI as the indicator, so
// this one stands for "aud = the client id".
const CLIENT_ID_AUDIENCE = 'urn:test:nextcloud-oidc:client-id:';

// nextcloudResources is the resource indicators feature as the `oidc` app behaves: every
// JWT client's token is bound to one audience at authorization, and carries every scope
// granted (openid included); opaque clients' tokens are bound to none.
const nextcloudResources = {
  enabled: true,
  defaultResource(ctx, client, oneOf) {
    if (oneOf) return oneOf;
    if (ctx.path !== '/auth' || tokenTypeOf(client.clientId) !== 'jwt') return undefined;
    return cfg.resourceUrls[client.clientId] ?? `${CLIENT_ID_AUDIENCE}${client.clientId}`;
  },
  useGrantedResource: () => true,
  getResourceServerInfo(_ctx, indicator, client) {
    const jwt = tokenTypeOf(client.clientId) === 'jwt';
    return {
      scope: ALL_SCOPES.join(' '),
      audience: indicator.startsWith(CLIENT_ID_AUDIENCE) ? indicator.slice(CLIENT_ID_AUDIENCE.length) : indicator,
      accessTokenTTL: expireTime,
      accessTokenFormat: jwt ? 'jwt' : 'opaque',
      ...(jwt ? { jwt: { sign: { alg: 'RS256' } } } : {}),
    };
  },
};

const configuration = {
  clients,
  jwks: { keys: [signingJWK] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  // API scopes are listed for both (DCR checks a client's scope against them); with
  // resource indicators (keycloak) they end up in the resource's JWT, not at userinfo.
  scopes: ALL_SCOPES,
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
      : nextcloudResources,
  },
  // The `oidc` app's JWT access token: iss from the token request's Host (the app builds
  // it from getServerProtocol() and getServerHost()), and its other claims.
  formats: keycloak ? undefined : {
    customizers: {
      jwt(ctx, token, jwt) {
        jwt.payload.iss = `${ctx.protocol}://${ctx.host}`;
        jwt.payload.azp = token.clientId;
        jwt.payload.preferred_username = token.accountId;
        jwt.payload.acr = '0';
        jwt.header = { typ: 'at+JWT' };
      },
    },
  },
  issueRefreshToken: async (_ctx, client, code) => client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
  rotateRefreshToken: () => true,
  ttl: keycloak
    ? { AccessToken: 300, RefreshToken: 1800, IdToken: 300, AuthorizationCode: 60, Interaction: 600, Session: 3600, Grant: 3600 }
    : {
      AccessToken: expireTime,
      RefreshToken: expireTime + refreshExpireTime,
      IdToken: expireTime,
      AuthorizationCode: 60,
      Interaction: 600,
      Session: 3600,
      Grant: 30 * 24 * 3600, // the app keeps a grant as long as its refresh tokens are used
    },
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
  // without an error; an opaque client's token has no audience. Its token endpoint knows
  // two grants, ignores `resource` (and `scope` on refresh), and answers without `scope`:
  // a client learns what it was granted by introspection or from the JWT.
  const allowed = cfg.allowedScopes;
  provider.use(async (ctx, next) => {
    if (ctx.path === '/auth') {
      const only = allowed[ctx.query.client_id];
      const query = { ...ctx.query };
      if (only && typeof query.scope === 'string') {
        const keep = new Set(only.split(' '));
        query.scope = query.scope.split(' ').filter((s) => keep.has(s)).join(' ');
      }
      if (tokenTypeOf(query.client_id) !== 'jwt') delete query.resource;
      ctx.query = query;
    }
    if (ctx.path === '/token' && ctx.method === 'POST' && ctx.is('application/x-www-form-urlencoded')) {
      const chunks = [];
      for await (const chunk of ctx.req) chunks.push(chunk);
      const form = new URLSearchParams(Buffer.concat(chunks).toString());
      const grantType = form.get('grant_type');
      if (grantType !== 'authorization_code' && grantType !== 'refresh_token') {
        process.stderr.write(`${JSON.stringify({ event: 'grant.error', grant_type: grantType, error: 'invalid grant_type' })}\n`);
        ctx.status = 400;
        ctx.type = 'json';
        ctx.body = { error: 'invalid_grant', error_description: 'Invalid grant_type provided. Must be authorization_code or refresh_token.' };
        return;
      }
      form.delete('resource');
      if (grantType === 'refresh_token') form.delete('scope');
      ctx.request.body = form.toString();
    }
    await next();
    if (ctx.path === '/token' && ctx.body && typeof ctx.body === 'object') {
      delete ctx.body.scope;
      if (ctx.body.refresh_token) ctx.body.refresh_expires_in = refreshExpireTime;
    }
  });
  // Rotation without grace: the app overwrites the grant's one refresh token, so the old
  // value is unknown afterwards (invalid_grant), and presenting it revokes nothing.
  provider.on('refresh_token.consumed', (token) => { token.destroy().catch(() => {}); });
}

if (keycloak) {
  // RFC 8693 as Keycloak's standard token exchange does it: a client exchanges an access
  // token it holds (issued by this IdP to that client) for one aimed at another audience,
  // with scopes narrowed to those asked for.
  provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
    const p = ctx.oidc.params;
    const { client } = ctx.oidc;
    if (!p.subject_token) throw new errors.InvalidRequest('missing subject_token');
    if (p.requested_token_type === ID_JAG_TYPE) {
      await issueIDJAG(ctx);
      return;
    }
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
    // API scopes narrow to those the subject token holds; openid, profile and email,
    // asked in `scope`, are kept without being held, as Keycloak puts openid in a
    // token's scope when the request names it and profile and email are client scopes
    // of the requester client.
    const held = new Set(String(subject.scope ?? '').split(' ').filter(Boolean));
    const asked = p.scope ? p.scope.split(' ').filter(Boolean) : [...held];
    const scope = asked.filter((s) => (held.has(s) && API_SCOPES.includes(s)) || (p.scope && IDENTITY_SCOPES.includes(s)));
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

// issueIDJAG answers a token exchange for an ID-JAG as the draft's IdP does: the subject
// token is an ID token this IdP issued to the requesting client (its aud), the audience
// is the resource's authorization server and resource the MCP server (both required);
// the enterprise policy (cfg.idJag) names the client's id there and caps the scopes.
async function issueIDJAG(ctx) {
  const p = ctx.oidc.params;
  const { client } = ctx.oidc;
  if (p.subject_token_type !== ID_TOKEN_TYPE) throw new errors.InvalidRequest('unsupported subject_token_type');
  if (!p.audience || !p.resource) throw new errors.InvalidRequest('audience and resource are required');
  if ([].concat(p.audience).length !== 1 || [].concat(p.resource).length !== 1) throw new errors.InvalidTarget('one audience and one resource');
  let subject;
  try {
    ({ payload: subject } = await jwtVerify(p.subject_token, localKeys, { issuer, audience: client.clientId }));
  } catch {
    throw new errors.InvalidGrant('subject_token is invalid');
  }
  const policy = cfg.idJag[client.clientId];
  if (!policy) throw new errors.InvalidGrant('the enterprise policy grants this client no access to that audience');
  const allowed = new Set(String(policy.scope ?? '').split(' ').filter(Boolean));
  const asked = p.scope ? p.scope.split(' ').filter(Boolean) : [...allowed];
  const scope = asked.filter((s) => allowed.has(s)).join(' ');
  const now = Math.floor(Date.now() / 1000);
  const jag = await new SignJWT({
    client_id: policy.clientId,
    resource: p.resource,
    ...(scope ? { scope } : {}),
  })
    .setProtectedHeader({ alg: 'RS256', kid: signingJWK.kid, typ: 'oauth-id-jag+jwt' })
    .setIssuer(issuer)
    .setSubject(subject.sub)
    .setAudience(p.audience)
    .setJti(randomBytes(16).toString('hex'))
    .setIssuedAt(now)
    .setExpirationTime(now + 300)
    .sign(privateKey);
  ctx.body = {
    issued_token_type: ID_JAG_TYPE,
    access_token: jag,
    token_type: 'N_A',
    scope,
    expires_in: 300,
  };
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
// POST /test/clock?advance=SECONDS moves the IdP's clock forward, so that tests see
// lifetimes end without waiting for them. Answers {"offset": SECONDS}.
// POST /test/client-settings?client_id=ID with {"tokenType", "resourceUrl",
// "allowedScopes", "idJag"} (any of them) changes what an admin sets for a client in the oidc app
// (idJag: the enterprise policy of ID-JAGs, keycloak),
// for the logins that follow. Answers 204.
const callback = provider.callback();
server.on('request', async (req, res) => {
  const u = new URL(req.url, issuer);
  if (!['/test/revoke-grants', '/test/clock', '/test/client-settings'].includes(u.pathname)) return callback(req, res);
  if (req.method !== 'POST') {
    res.writeHead(405).end();
    return;
  }
  if (u.pathname === '/test/client-settings') {
    const id = u.searchParams.get('client_id') ?? '';
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    let settings;
    try {
      settings = JSON.parse(Buffer.concat(chunks).toString() || '{}');
    } catch {
      res.writeHead(400).end();
      return;
    }
    if (settings.tokenType !== undefined) cfg.tokenTypes[id] = settings.tokenType;
    if (settings.resourceUrl !== undefined) cfg.resourceUrls[id] = settings.resourceUrl;
    if (settings.allowedScopes !== undefined) cfg.allowedScopes[id] = settings.allowedScopes;
    if (settings.idJag !== undefined) cfg.idJag[id] = settings.idJag;
    res.writeHead(204).end();
    return;
  }
  if (u.pathname === '/test/clock') {
    const advance = Number(u.searchParams.get('advance'));
    if (!Number.isInteger(advance) || advance < 0) {
      res.writeHead(400).end();
      return;
    }
    clockOffsetMs += advance * 1000;
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ offset: clockOffsetMs / 1000 }));
    return;
  }
  const grants = grantsOf.get(u.searchParams.get('sub') ?? '') ?? new Set();
  for (const grantId of grants) await provider.RefreshToken.revokeByGrantId(grantId);
  grantsOf.delete(u.searchParams.get('sub') ?? '');
  res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ revoked: grants.size }));
});
process.stdout.write(`${JSON.stringify({ issuer, profile: args.profile, defaultAudience })}\n`);
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => server.close(() => process.exit(0)));
