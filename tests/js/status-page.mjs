#!/usr/bin/env node
// Drives walcast's status page in a real headless Chromium (Debian's `chromium`,
// or $WALCAST_CHROMIUM) through puppeteer-core, for tests/cases/status.rs.
//
// Protocol: as client.mjs — one JSON command per line on stdin, one JSON event
// per line on stdout; every command gets {"ev":"ack","id":…,"result":…} or
// {"ev":"error","id":…,"message":…}. At start: {"ev":"ready","versions":{…}}.
//
// Commands:
//   {"cmd":"open","url":"http://…/status?…","width":1280,"height":900}
//       → loads the page; result {"status": <HTTP status>}
//   {"cmd":"wait","expr":"<JS expression>","timeout_ms":5000}
//       → waits until the expression is truthy in the page; result: its value
//   {"cmd":"eval","expr":"<JS expression>"}  → result: its value
//   {"cmd":"click","selector":"#feed-pause"}
//   {"cmd":"screenshot","path":"/tmp/x.png","full_page":true}
//   {"cmd":"exit"}
// Events from the page:
//   {"ev":"console","type":"error"|"warning"|…,"text":…}
//   {"ev":"pageerror","message":…}
//   {"ev":"requestfailed","url":…,"error":…}
//   {"ev":"response","url":…,"status":…}   (HTTP status >= 400 only)

import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import puppeteer from 'puppeteer-core';

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

const executablePath =
  process.env.WALCAST_CHROMIUM ||
  ['/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome'].find((p) => existsSync(p));
if (!executablePath) {
  emit({ ev: 'fatal', message: 'no Chromium found: install Debian package chromium or set WALCAST_CHROMIUM' });
  process.exit(2);
}

const profile = mkdtempSync(path.join(tmpdir(), 'walcast-chromium-'));
const browser = await puppeteer.launch({
  executablePath,
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
    `--user-data-dir=${profile}`,
  ],
});
const page = await browser.newPage();
page.on('console', (m) => emit({ ev: 'console', type: m.type(), text: m.text() }));
page.on('pageerror', (e) => emit({ ev: 'pageerror', message: String(e && e.message ? e.message : e) }));
page.on('requestfailed', (r) => emit({ ev: 'requestfailed', url: r.url(), error: r.failure()?.errorText ?? '' }));
page.on('response', (r) => {
  if (r.status() >= 400) emit({ ev: 'response', url: r.url(), status: r.status() });
});

async function shutdown(code) {
  try {
    await browser.close();
  } catch {
    /* already gone */
  }
  rmSync(profile, { recursive: true, force: true });
  process.exit(code);
}

async function run(cmd) {
  const id = cmd.id ?? null;
  try {
    let result = null;
    switch (cmd.cmd) {
      case 'open': {
        await page.setViewport({ width: cmd.width ?? 1280, height: cmd.height ?? 900 });
        const r = await page.goto(cmd.url, { waitUntil: 'domcontentloaded', timeout: cmd.timeout_ms ?? 15000 });
        result = { status: r ? r.status() : null };
        break;
      }
      case 'wait': {
        const h = await page.waitForFunction(cmd.expr, { timeout: cmd.timeout_ms ?? 5000, polling: 50 });
        result = await h.jsonValue();
        break;
      }
      case 'eval':
        result = await page.evaluate(cmd.expr);
        break;
      case 'click':
        await page.click(cmd.selector);
        break;
      case 'screenshot':
        await page.screenshot({ path: cmd.path, fullPage: cmd.full_page ?? true });
        break;
      case 'exit':
        emit({ ev: 'ack', id, cmd: cmd.cmd });
        await shutdown(0);
        return;
      default:
        throw new Error(`unknown command ${cmd.cmd}`);
    }
    emit({ ev: 'ack', id, cmd: cmd.cmd, result });
  } catch (e) {
    emit({ ev: 'error', id, cmd: cmd.cmd, message: String(e && e.message ? e.message : e) });
  }
}

emit({
  ev: 'ready',
  versions: { browser: await browser.version(), node: process.versions.node },
});

let queue = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => {
  if (line.trim() === '') return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    emit({ ev: 'error', id: null, message: `bad command line (${e.message})` });
    return;
  }
  queue = queue.then(() => run(cmd));
});
rl.on('close', () => queue.then(() => shutdown(0)));
