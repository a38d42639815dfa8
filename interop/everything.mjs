#!/usr/bin/env node
// Runs @modelcontextprotocol/server-everything in its Streamable HTTP mode, on a loopback
// port only, and prints one JSON line {"url": "http://127.0.0.1:PORT/mcp"} once it listens.
//
// Usage: node everything.mjs [--port N]   (0, the default, picks a free port)
//
// The package listens with express's app.listen(PORT) on every interface; this launcher
// pins that listen to 127.0.0.1 and reports the port. Its gzip tool may fetch only from
// loopback (GZIP_ALLOWED_DOMAINS), so a test can hand it a large file to return.
import http from 'node:http';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({ options: { port: { type: 'string', default: '0' } } });

process.env.PORT = args.port;
process.env.GZIP_ALLOWED_DOMAINS ??= '127.0.0.1';

const listen = http.Server.prototype.listen;
http.Server.prototype.listen = function listenOnLoopback(port, ...rest) {
  const callback = rest.find((a) => typeof a === 'function');
  this.once('listening', () => {
    process.stdout.write(`${JSON.stringify({ url: `http://127.0.0.1:${this.address().port}/mcp` })}\n`);
  });
  return listen.call(this, Number(port), '127.0.0.1', callback);
};

await import('@modelcontextprotocol/server-everything/dist/transports/streamableHttp.js');
