#!/usr/bin/env node
// A headless third-party MCP client: @modelcontextprotocol/sdk's Streamable HTTP client with
// an OAuthClientProvider, against an MCP endpoint behind mcp_oauth; with --sdk 2, the same
// with the 2.x @modelcontextprotocol/client.
//
// Usage: node client.mjs --url <MCP URL> [--client-id ID] [--redirect-url URL]
//          [--call JSON] [--stepup JSON] [--refresh] [--sdk-stepup] [--sdk 1|2]
//   --client-id     a client pre-registered at the authorization server (else DCR)
//   --call          {"name": tool, "arguments": {...}}: called after tools/list (repeatable)
//   --stepup        a tool call that needs a scope the first token lacks (403 insufficient_scope)
//   --refresh       force a refresh: the access token is made invalid, the next request's
//                   401 makes the SDK use its refresh token
//   --sdk-stepup    leave step-up to the SDK alone (see README: 1.32.2 refreshes first)
//   --sdk           1 (default): @modelcontextprotocol/sdk 1.x; 2: @modelcontextprotocol/client 2.x,
//                   whose callback is finished with the whole redirect (code and iss)
//   --first-scope   ask for this scope first, as a client asking for less than the server's
//                   challenge names (the scope of the first 401 is read as this), so that a
//                   later call needs a step-up
//   --negotiate     with --sdk 2: the client's versionNegotiation mode, "auto" (probe with
//                   server/discover, 2026-07-28 where the server offers it) or "legacy" (the
//                   default: the 2025 initialize handshake)
//   --client-metadata-url  with --sdk 2: the https URL of this client's metadata document
//                   (CIMD); the SDK uses it as client_id where the authorization server
//                   advertises client_id_metadata_document_supported, else it registers
//   --listen        with a 2026-07-28 connection: subscriptions/listen for tool list changes
//                   after tools/list, kept open through the calls; the summary counts the
//                   notifications that arrived on it
//   --offline       a tool call that needs the user to grant offline access: a 2026-07-28
//                   server answers it with an InputRequiredResult carrying a URL-mode
//                   elicitation; the client declares URL elicitation and its handler asks
//                   the harness to open the URL, the SDK retries with inputResponses
//
// Protocol with the harness (stdin/stdout, one JSON object per line):
//   out {"type":"authorize","url":...}      the SDK wants the user's browser at url
//   in  {"redirect": "<final URL>"}         where the browser ended: redirect_uri?code&state
//   out {"type":"elicit","url":...,"message":...}   a URL-mode elicitation: open url for the user
//   in  {"action": "accept"|"decline"|"cancel"}     what the user did, the handler's answer
//   out {"type":"summary", ...}             what happened, for the harness to assert on
//   out {"type":"error","message":...}      and exit 1
// No token, code or secret is printed: tokens appear as SHA-256 hex digests.
import { createHash, randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';


const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    'client-id': { type: 'string' },
    'client-name': { type: 'string', default: 'Interop TS Client' },
    'redirect-url': { type: 'string', default: 'http://127.0.0.1:49152/callback' },
    call: { type: 'string', multiple: true },
    stepup: { type: 'string' },
    refresh: { type: 'boolean', default: false },
    'sdk-stepup': { type: 'boolean', default: false },
    'first-scope': { type: 'string' },
    sdk: { type: 'string', default: '1' },
    negotiate: { type: 'string', default: 'legacy' },
    'client-metadata-url': { type: 'string' },
    offline: { type: 'string' },
    listen: { type: 'boolean', default: false },
    timeout: { type: 'string', default: '60000' },
  },
});
if (!args.url) {
  console.error('client: --url is required');
  process.exit(2);
}
const sdk2 = args.sdk === '2';
const { Client, StreamableHTTPClientTransport, UnauthorizedError } = sdk2
  ? await import('@modelcontextprotocol/client')
  : {
      ...(await import('@modelcontextprotocol/sdk/client/index.js')),
      ...(await import('@modelcontextprotocol/sdk/client/streamableHttp.js')),
      ...(await import('@modelcontextprotocol/sdk/client/auth.js')),
    };

const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const sha256 = (s) => createHash('sha256').update(s).digest('hex');
const fail = (err) => {
  out({ type: 'error', message: String(err?.stack ?? err), summary });
  process.exit(1);
};
setTimeout(() => fail(new Error(`client: gave up after ${args.timeout} ms`)), Number(args.timeout)).unref();

const summary = {
  type: 'summary',
  requests: [], // every HTTP request the SDK made: method, URL without query, status
  tokenGrants: [], // grant_type of each token endpoint request, with its status
  authorizations: [], // parameters of each authorization URL (no state, no challenge)
  registeredClientId: undefined,
  serverInfo: undefined,
  tools: [],
  calls: [],
  refresh: undefined,
  stepUp: undefined,
  accessTokens: [], // SHA-256 of every access token the client held
  clientId: undefined, // the client_id the SDK used last (a metadata document's URL with CIMD)
  protocolVersion: undefined, // the revision the connection negotiated
  elicitations: [], // URL-mode elicitations the client was asked to open: message, URL origin and path, the user's action, and how it came (input_required: the SDK's handler for a 2026-07-28 InputRequiredResult; url_elicitation_error: the 2025-era -32042 error, handled here)
  offline: undefined,
  listen: undefined, // {honored, notifications, closed}
};

// Lines from the harness: redirect results and elicitation answers, in order.
const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function nextLine(what) {
  const { value, done } = await stdinLines.next();
  if (done) throw new Error(`client: stdin closed while waiting for ${what}`);
  return JSON.parse(value);
}
async function nextRedirect() {
  return new URL((await nextLine('the redirect')).redirect);
}

// The OAuth client provider: all in memory.
class HeadlessProvider {
  constructor() {
    this._client = args['client-id'] ? { client_id: args['client-id'] } : undefined;
    this._tokens = undefined;
    this._verifier = undefined;
    this._state = undefined;
    this.stepUpPending = false;
  }

  get redirectUrl() { return args['redirect-url']; }

  get clientMetadataUrl() { return args['client-metadata-url']; }

  get clientMetadata() {
    return {
      client_name: args['client-name'],
      redirect_uris: [args['redirect-url']],
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'none',
    };
  }

  state() {
    this._state = randomBytes(16).toString('base64url');
    return this._state;
  }

  clientInformation() { return this._client; }

  saveClientInformation(info) {
    this._client = info;
    summary.clientId = info.client_id;
    if (!args['client-id'] && info.client_id !== args['client-metadata-url']) summary.registeredClientId = info.client_id;
  }

  tokens() {
    // Step-up needs a new authorization: the SDK would otherwise refresh (same scope) first.
    if (this._tokens && this.stepUpPending && !args['sdk-stepup']) {
      const { refresh_token: _, ...rest } = this._tokens;
      return rest;
    }
    return this._tokens;
  }

  saveTokens(tokens) {
    this._tokens = tokens;
    this.stepUpPending = false;
    summary.accessTokens.push(sha256(tokens.access_token));
  }

  redirectToAuthorization(url) {
    const q = url.searchParams;
    if (q.get('state') !== this._state) throw new Error('client: authorization URL lost its state');
    summary.authorizations.push({
      endpoint: `${url.origin}${url.pathname}`,
      client_id: q.get('client_id'),
      scope: q.get('scope'),
      resource: q.get('resource'),
      redirect_uri: q.get('redirect_uri'),
      code_challenge_method: q.get('code_challenge_method'),
    });
    out({ type: 'authorize', url: url.href });
  }

  saveCodeVerifier(v) { this._verifier = v; }

  codeVerifier() { return this._verifier; }

  invalidateCredentials(scope) {
    if (scope === 'all' || scope === 'tokens') this._tokens = undefined;
    if (scope === 'all' || scope === 'client') this._client = args['client-id'] ? { client_id: args['client-id'] } : undefined;
  }

  // Test hook: the server will refuse this access token with 401.
  spoilAccessToken() {
    this._tokens = { ...this._tokens, access_token: `spoiled-${randomBytes(8).toString('hex')}` };
  }
}
const provider = new HeadlessProvider();

// Records every request the SDK makes, without secrets.
async function recordingFetch(input, init) {
  const url = new URL(input instanceof Request ? input.url : String(input));
  const method = init?.method ?? (input instanceof Request ? input.method : 'GET');
  let grantType;
  const body = init?.body;
  if (body instanceof URLSearchParams) grantType = body.get('grant_type');
  else if (typeof body === 'string' && body.includes('grant_type=')) grantType = new URLSearchParams(body).get('grant_type');
  let res = await fetch(input, init);
  if (res.status === 401 && args['first-scope'] && !summary.requests.some((r) => r.status === 401)) {
    const headers = new Headers(res.headers);
    headers.set('www-authenticate', (headers.get('www-authenticate') ?? 'Bearer').replace(/,?\s*scope="[^"]*"/, '') + `, scope="${args['first-scope']}"`);
    res = new Response(res.body, { status: res.status, statusText: res.statusText, headers });
  }
  const entry = { method, url: `${url.origin}${url.pathname}`, status: res.status };
  // The 2026-07-28 transport headers the SDK sent, on requests to the MCP endpoint.
  const sent = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
  for (const [key, name] of [['protocolVersion', 'mcp-protocol-version'], ['mcpMethod', 'mcp-method'], ['mcpName', 'mcp-name']]) {
    if (sent.get(name)) entry[key] = sent.get(name);
  }
  if (typeof body === 'string' && body.startsWith('{')) {
    try { entry.rpcMethod = JSON.parse(body).method; } catch { /* not JSON-RPC */ }
  }
  const www = res.headers.get('www-authenticate');
  if (www) entry.wwwAuthenticate = www;
  if (res.headers.get('mcp-session-id')) entry.session = true;
  summary.requests.push(entry);
  if (grantType) summary.tokenGrants.push({ grant_type: grantType, status: res.status });
  if (res.status === 403 && www?.includes('insufficient_scope')) provider.stepUpPending = true;
  return res;
}

const newTransport = () => new StreamableHTTPClientTransport(new URL(args.url), { authProvider: provider, fetch: recordingFetch });
let transport = newTransport();
const client = sdk2
  ? new Client({ name: 'interop-ts-client', version: '1.0.0' }, {
      versionNegotiation: { mode: args.negotiate },
      // URL-mode elicitation only: this client opens links for its user, it renders no forms.
      capabilities: args.offline ? { elicitation: { url: {} } } : {},
    })
  : new Client({ name: 'interop-ts-client', version: '1.0.0' }, { capabilities: args.offline ? { elicitation: { url: {} } } : {} });
// openURL has the harness open a URL-mode elicitation's URL for the user; it returns what
// the user did.
async function openURL(p, via) {
  out({ type: 'elicit', url: p.url, message: p.message });
  const { action } = await nextLine('the elicitation answer');
  const u = new URL(p.url);
  summary.elicitations.push({ message: p.message, url: `${u.origin}${u.pathname}`, action, via });
  return action;
}
if (sdk2 && args.offline) {
  // The SDK fulfils a 2026-07-28 InputRequiredResult through this handler and retries the
  // call with the answers (inputResponses) and the server's requestState. What an
  // application does with a URL elicitation is its own: here the harness opens the URL
  // in the user's browser and reports what the user did.
  client.setRequestHandler('elicitation/create', async (request) => {
    const p = request.params;
    if (p.mode !== 'url') return { action: 'decline' };
    return { action: await openURL(p, 'input_required') };
  });
}

// withAuth runs fn; when the SDK sends the user to authorize, it waits for the harness to
// bring back the redirect, finishes the authorization, and runs fn again.
async function withAuth(what, fn) {
  for (let attempt = 0; attempt < 3; attempt += 1) {
    try {
      return await fn();
    } catch (err) {
      if (!(err instanceof UnauthorizedError)) throw err;
      const redirect = await nextRedirect();
      const error = redirect.searchParams.get('error');
      if (error) throw new Error(`${what}: authorization answered error=${error}`);
      if (redirect.searchParams.get('state') !== provider._state) throw new Error(`${what}: state mismatch on the redirect`);
      await transport.finishAuth(sdk2 ? redirect.searchParams : redirect.searchParams.get('code'));
    }
  }
  throw new Error(`${what}: still unauthorized after 3 authorizations`);
}

function callResult(name, res) {
  const text = (res.content ?? []).filter((c) => c.type === 'text').map((c) => c.text).join('\n');
  return { name, isError: !!res.isError, text: text.slice(0, 2000) };
}

try {
  // connect() sends initialize: 401 → PRM → AS metadata → DCR → authorize → token.
  // A failed connect closes its transport: each attempt gets a fresh one.
  let first = true;
  await withAuth('connect', () => {
    if (!first) transport = newTransport();
    first = false;
    return client.connect(transport);
  });
  summary.serverInfo = client.getServerVersion();
  summary.protocolVersion = sdk2 ? client.getNegotiatedProtocolVersion() : transport.protocolVersion;
  summary.sessionId = transport.sessionId ? true : undefined;

  const tools = await withAuth('tools/list', () => client.listTools());
  summary.tools = tools.tools.map((t) => t.name);

  let subscription;
  let toolsChanged = 0;
  if (args.listen) {
    client.setNotificationHandler('notifications/tools/list_changed', () => { toolsChanged += 1; });
    subscription = await withAuth('listen', () => client.listen({ toolsListChanged: true }));
    summary.listen = { honored: subscription.honoredFilter, notifications: 0 };
  }

  for (const raw of args.call ?? []) {
    const call = JSON.parse(raw);
    summary.calls.push(callResult(call.name, await withAuth('tools/call', () => client.callTool(call))));
  }

  if (args.refresh) {
    const before = summary.tokenGrants.filter((g) => g.grant_type === 'refresh_token').length;
    const held = provider._tokens;
    if (!held?.refresh_token) {
      summary.refresh = { attempted: false, reason: 'no refresh token was issued' };
    } else {
      provider.spoilAccessToken();
      const res = await withAuth('refresh', () => client.listTools());
      const grants = summary.tokenGrants.filter((g) => g.grant_type === 'refresh_token');
      summary.refresh = {
        attempted: true,
        refreshGrants: grants.length - before,
        ok: grants.length > before && grants.at(-1).status === 200 && res.tools.length > 0,
        rotated: !!provider._tokens.refresh_token && provider._tokens.refresh_token !== held.refresh_token,
        newAccessToken: provider._tokens.access_token !== held.access_token,
      };
    }
  }

  if (args.stepup) {
    const call = JSON.parse(args.stepup);
    const authsBefore = summary.authorizations.length;
    try {
      const res = await withAuth('step-up', () => client.callTool(call));
      summary.calls.push(callResult(call.name, res));
      summary.stepUp = { ok: !res.isError, authorizations: summary.authorizations.length - authsBefore, scope: summary.authorizations.at(-1)?.scope };
    } catch (err) {
      summary.stepUp = { ok: false, error: String(err?.message ?? err), authorizations: summary.authorizations.length - authsBefore };
    }
  }

  if (subscription) {
    // A change the server published reaches the client while the stream stays open.
    for (let i = 0; i < 50 && toolsChanged === 0; i += 1) await new Promise((r) => setTimeout(r, 100));
    summary.listen.notifications = toolsChanged;
    await subscription.close();
    summary.listen.closed = await subscription.closed;
  }

  if (args.offline) {
    const call = JSON.parse(args.offline);
    const before = summary.elicitations.length;
    // On a 2025-era connection the server's answer is the URL elicitation error (-32042),
    // which neither SDK acts on by itself: like an application, open its URL for the user,
    // then call again once.
    const callOnce = async () => {
      try {
        return await client.callTool(call);
      } catch (err) {
        const elicitation = err?.code === -32042 ? err.data?.elicitations?.[0] : undefined;
        if (!elicitation?.url) throw err;
        if (await openURL(elicitation, 'url_elicitation_error') !== 'accept') throw err;
        return client.callTool(call);
      }
    };
    try {
      const res = await withAuth('offline', callOnce);
      summary.calls.push(callResult(call.name, res));
      summary.offline = { ok: !res.isError, elicitations: summary.elicitations.length - before, text: callResult(call.name, res).text };
    } catch (err) {
      summary.offline = { ok: false, error: String(err?.message ?? err), elicitations: summary.elicitations.length - before };
    }
  }

  await transport.terminateSession().catch(() => {});
  await client.close();
  out(summary);
  process.exit(0);
} catch (err) {
  fail(err);
}
