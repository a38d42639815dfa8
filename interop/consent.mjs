#!/usr/bin/env node
// A real browser on mcp_oauth's consent page: Debian's chromium driven by playwright-core.
//
// Usage: node consent.mjs --config JSON
// JSON: {
//   "chromium": "/usr/bin/chromium",
//   "login": "alice",                       the IdP login (devInteractions) after approve
//   "runs": [{
//     "name": "approve",
//     "url": "<broker authorize URL>",      the browser starts here, is sent to the consent page
//     "action": "approve" | "deny",
//     "redirectPrefix": "http://127.0.0.1:P/callback",  the client's redirect URI (a live
//                                           server: playwright cannot intercept redirects)
//     "expect": {"clientName": "...", "redirectHost": "...", "scopes": ["..."]},
//     "screenshot": "/path/consent.png",    optional: the consent page, full page
//     "forgeOrigins": ["http://localhost:P"] optional: before deciding, each origin serves
//                                           /forge, which auto-posts the page's own ticket
//                                           and CSRF value to /oauth/consent (approve)
//     "handoff": true                       optional (approve): stop at the redirect to the
//                                           IdP and open that URL in a second browser
//                                           context (its own cookies), log in there; then
//                                           finish the login in the first context
//   }]
// }
// Prints one JSON line: {"runs": [{name, consentStatus, text, checks, screenshot, forged,
// handoff, redirect}]}; redirect is the URL the client's redirect URI received (with ?code or
// ?error); handoff is {url, status, text} of the broker page the second context ended on.
// Only loopback URLs are ever opened.
import { parseArgs } from 'node:util';
import { statSync } from 'node:fs';

import { chromium } from 'playwright-core';

const { values: args } = parseArgs({ options: { config: { type: 'string' } } });
const cfg = JSON.parse(args.config);

const loopback = (u) => ['127.0.0.1', 'localhost', '[::1]'].includes(new URL(u).hostname);
for (const run of cfg.runs) {
  for (const u of [run.url, run.redirectPrefix, ...(run.forgeOrigins ?? [])]) {
    if (!loopback(u)) throw new Error(`consent: refusing a non-loopback URL ${u}`);
  }
}

const browser = await chromium.launch({
  executablePath: cfg.chromium ?? '/usr/bin/chromium',
  headless: true,
  timeout: 30000,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});

// idpLogin plays the IdP's devInteractions (login, then its consent prompt) in page until
// arrived() says the browser is back where it should be.
async function idpLogin(page, arrived) {
  for (let step = 0; step < 10 && !arrived(); step += 1) {
    await page.waitForLoadState();
    if (arrived()) break;
    if (await page.locator('input[name=login]').count()) {
      await page.fill('input[name=login]', cfg.login ?? 'alice');
      await page.fill('input[name=password]', 'any');
      await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
    } else if (await page.locator('input[name=prompt][value=consent]').count()) {
      await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
    } else {
      await page.waitForTimeout(200);
      if (!arrived() && step > 3) throw new Error(`stuck at ${page.url()}: ${(await page.innerText('body')).slice(0, 300)}`);
    }
  }
}

// handoff approves on page but stops at the redirect to the IdP, opens that URL in a
// second context (another browser, as far as cookies go) and logs in there. It returns
// the broker page the second context ends on, and the IdP URL.
async function handoff(page, run) {
  const broker = new URL(run.url).origin;
  let stop = true;
  await page.route((u) => stop && u.origin !== broker, (route) => route.abort());
  const leaving = page.waitForRequest((req) => new URL(req.url()).origin !== broker);
  await page.click(`button[name=decision][value=${run.action}]`);
  const idpURL = (await leaving).url();
  stop = false;

  const other = await browser.newContext();
  other.setDefaultTimeout(15000);
  await other.route((u) => !loopback(u.href), (route) => route.abort());
  try {
    const page2 = await other.newPage();
    const callback = page2.waitForResponse((r) => r.url().startsWith(`${broker}/oauth/callback?`));
    await page2.goto(idpURL);
    await idpLogin(page2, () => page2.url().startsWith(`${broker}/oauth/callback?`));
    const resp = await callback;
    await page2.waitForLoadState();
    return { idpURL, result: { url: page2.url(), status: resp.status(), text: (await page2.innerText('body')).slice(0, 1000) } };
  } finally {
    await other.close();
  }
}

async function doRun(run) {
  const result = { name: run.name, forged: [] };
  const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
  context.setDefaultTimeout(15000);
  // Nothing may leave loopback.
  await context.route((u) => !loopback(u.href), (route) => route.abort());
  const page = await context.newPage();
  try {
    const resp = await page.goto(run.url);
    const consentURL = page.url();
    result.consentStatus = resp?.status();
    result.consentPath = new URL(consentURL).pathname;
    result.text = await page.innerText('body');
    const expect = run.expect ?? {};
    result.checks = {
      clientName: expect.clientName ? result.text.includes(expect.clientName) : undefined,
      redirectHost: expect.redirectHost ? result.text.includes(expect.redirectHost) : undefined,
      scopes: Object.fromEntries((expect.scopes ?? []).map((s) => [s, result.text.includes(s)])),
    };
    if (run.screenshot) {
      await page.screenshot({ path: run.screenshot, fullPage: true });
      result.screenshot = { path: run.screenshot, bytes: statSync(run.screenshot).size };
    }

    // Forged posts: another origin's page auto-submits this page's own ticket and CSRF
    // value (as if both had leaked) with decision=approve.
    if (run.forgeOrigins?.length) {
      const ticket = await page.inputValue('input[name=ticket]');
      const csrf = await page.inputValue('input[name=csrf]');
      const action = new URL(await page.getAttribute('form', 'action'), consentURL).href;
      for (const origin of run.forgeOrigins) {
        const forge = new URL('/forge', origin);
        forge.search = new URLSearchParams({ action, ticket, csrf }).toString();
        const posted = page.waitForResponse((r) => r.url() === action && r.request().method() === 'POST');
        await page.goto(forge.href);
        const answer = await posted;
        await page.waitForLoadState();
        result.forged.push({
          origin,
          status: answer.status(),
          location: answer.headers().location ?? '',
          text: (await page.innerText('body')).slice(0, 500),
        });
      }
      await page.goto(consentURL);
      result.consentStatusAfterForgery = (await page.waitForLoadState(), page.url() === consentURL) ? 'shown' : page.url();
    }

    const arrived = () => page.url().startsWith(run.redirectPrefix);
    if (run.handoff) {
      const { idpURL, result: h } = await handoff(page, run);
      result.handoff = h;
      // The first context, which approved, now logs in with the same IdP URL.
      await page.goto(idpURL);
    } else {
      const decided = page.url();
      await Promise.all([
        page.waitForURL((u) => u.href !== decided, { waitUntil: 'load' }),
        page.click(`button[name=decision][value=${run.action}]`),
      ]);
    }
    // Approve goes on to the IdP: its devInteractions login, then its consent prompt.
    await idpLogin(page, arrived);
    if (arrived()) result.redirect = page.url();
    else throw new Error(`never reached the client's redirect URI; at ${page.url()}`);
  } catch (err) {
    result.error = String(err?.message ?? err);
  } finally {
    await context.close();
  }
  return result;
}

const runs = [];
try {
  for (const run of cfg.runs) runs.push(await doRun(run));
} finally {
  await browser.close();
}
process.stdout.write(`${JSON.stringify({ runs })}\n`);
