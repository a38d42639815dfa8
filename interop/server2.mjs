#!/usr/bin/env node
// A 2026-07-28 MCP server: @modelcontextprotocol/server 2.x's createMcpHandler (stateless
// streamable HTTP, one server instance per request; 2025-era requests served by its
// stateless fallback), on a loopback port. Prints {"url": "http://127.0.0.1:PORT/mcp"} once
// it listens, then one {"type":"request",...} line per HTTP request it gets, so that a test
// can check what reached the upstream behind mcp_oauth:
//   the MCP transport headers (MCP-Protocol-Version, Mcp-Method, Mcp-Name, Mcp-Param-*), the SHA-256 of
//   the bearer token (never the token), the body's JSON-RPC method, tool name and protocol
//   version (params._meta), and whether the body carried a requestState or inputResponses.
//
// Tools (the test's Caddyfile gives them their scopes and marks the offline one):
//   notes_read              {}            a read
//   notes_write             {text}        a write; text is mirrored into Mcp-Param-Text
//                                         (x-mcp-header), which the SDK checks against the body;
//                                         publishes notifications/tools/list_changed to
//                                         subscriptions/listen streams
//   notes_schedule_digest   {}            a background job: needs the user's offline access
//
// Usage: node server2.mjs [--port N]   (0, the default, picks a free port)
import { createHash } from 'node:crypto';
import http from 'node:http';
import { parseArgs } from 'node:util';

import { McpServer, createMcpHandler, fromJsonSchema } from '@modelcontextprotocol/server';

const { values: args } = parseArgs({ options: { port: { type: 'string', default: '0' } } });
const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const sha256 = (s) => createHash('sha256').update(s).digest('hex');
const text = (t) => ({ content: [{ type: 'text', text: t }] });

const notes = [];
const factory = () => {
  const server = new McpServer({ name: 'interop-server2', version: '1.0.0' });
  server.registerTool('notes_read', { description: 'Read the notes', inputSchema: fromJsonSchema({ type: 'object', properties: {} }) },
    async () => text(`notes: ${notes.length}`));
  server.registerTool('notes_write', {
    description: 'Write a note',
    inputSchema: fromJsonSchema({ type: 'object', properties: { text: { type: 'string', 'x-mcp-header': 'Text' } }, required: ['text'] }),
  }, async ({ text: note }) => {
    notes.push(note);
    // Tell open subscriptions (subscriptions/listen) that the tools changed: a stream
    // that must reach the client through the broker while the call's own answer does.
    handler.notify.toolsChanged();
    return text(`saved note ${notes.length}`);
  });
  server.registerTool('notes_schedule_digest', { description: 'Schedule a nightly digest of the notes (runs in the background)', inputSchema: fromJsonSchema({ type: 'object', properties: {} }) },
    async () => text('digest scheduled'));
  return server;
};
const handler = createMcpHandler(factory, { responseMode: 'json', onerror: (err) => process.stderr.write(`server2: ${err?.message ?? err}\n`) });

// The request as the test may see it; the body is read here and handed on whole.
function record(req, body) {
  const entry = {
    type: 'request',
    method: req.method,
    protocolVersion: req.headers['mcp-protocol-version'],
    mcpMethod: req.headers['mcp-method'],
    mcpName: req.headers['mcp-name'],
    sessionId: req.headers['mcp-session-id'],
    params: Object.fromEntries(Object.entries(req.headers).filter(([k]) => k.startsWith('mcp-param-'))),
  };
  const bearer = /^Bearer (.+)$/.exec(req.headers.authorization ?? '');
  if (bearer) entry.tokenSHA256 = sha256(bearer[1]);
  try {
    const msg = JSON.parse(body);
    entry.rpcMethod = msg.method;
    entry.tool = msg.params?.name;
    entry.metaProtocolVersion = msg.params?._meta?.['io.modelcontextprotocol/protocolVersion'];
    entry.requestState = msg.params?.requestState !== undefined;
    entry.inputResponses = Object.keys(msg.params?.inputResponses ?? {});
  } catch {
    // not JSON: the SDK answers it
  }
  out(entry);
}

const srv = http.createServer(async (req, res) => {
  try {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const body = Buffer.concat(chunks).toString('utf8');
    record(req, body);
    const request = new Request(`http://${req.headers.host}${req.url}`, {
      method: req.method,
      headers: Object.entries(req.headers).flatMap(([k, v]) => (Array.isArray(v) ? v.map((x) => [k, x]) : [[k, v]])),
      body: req.method === 'GET' || req.method === 'HEAD' ? undefined : body,
    });
    const response = await handler.fetch(request);
    res.writeHead(response.status, Object.fromEntries(response.headers));
    if (response.body) {
      for await (const chunk of response.body) res.write(chunk);
    }
    res.end();
  } catch (err) {
    process.stderr.write(`server2: ${err?.stack ?? err}\n`);
    if (!res.headersSent) res.writeHead(500);
    res.end();
  }
});
srv.listen(Number(args.port), '127.0.0.1', () => out({ url: `http://127.0.0.1:${srv.address().port}/mcp` }));
