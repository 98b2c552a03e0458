// The dashboard, end to end, in headless Chromium driven by Playwright (playwright-core).
// Started by examples/tests/dashboard.rs against a running example server:
//
//   AIWG_E2E_BASE=http://127.0.0.1:PORT AIWG_E2E_ADMIN_KEY=... AIWG_E2E_READ_KEY=...
//   AIWG_E2E_SUITE=full|smoke AIWG_E2E_SCREENSHOTS=target/ui-screenshots
//   AIWG_TEST_PLAYWRIGHT=.peers/node_modules/playwright-core AIWG_TEST_CHROMIUM=/usr/bin/chromium
//   node examples/tests/ui/e2e.mjs
//
// The browser reaches the server through a small TCP proxy in this script, so that a test can
// cut every connection (a lost stream) and see which requests carried Last-Event-ID. Every
// wait is on a condition, with a timeout; nothing sleeps. Any console error fails the run,
// except the network messages a step provokes on purpose (a wrong key's 401, a cut
// connection), which that step declares.

import { createRequire } from 'node:module';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const BASE = env('AIWG_E2E_BASE');
const ADMIN = env('AIWG_E2E_ADMIN_KEY');
const VIEWER = env('AIWG_E2E_READ_KEY');
const SUITE = process.env.AIWG_E2E_SUITE || 'full';
const SHOTS = env('AIWG_E2E_SCREENSHOTS');
const { chromium } = createRequire(import.meta.url)(env('AIWG_TEST_PLAYWRIGHT'));
const WAIT = 20000;

const log = (...a) => console.log(`[e2e ${SUITE}]`, ...a);
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  log(`ok: ${what}`);
}

// ---------------------------------------------------------------------------------------------
// The proxy between the browser and the server.

const upstream = new URL(BASE);
// The smoke run puts the dashboard under /aiwg, as a host (or a reverse proxy) mounting the
// router there would: the page must reach its files and the API by relative URLs.
const PREFIX = SUITE === 'full' ? '' : '/aiwg';
const sockets = new Set();
const requests = []; // {method, path, lastEventId}
const proxy = net.createServer((client) => {
  const server = net.connect(Number(upstream.port), upstream.hostname);
  sockets.add(client);
  sockets.add(server);
  // Requests are forwarded head by head (the path rewritten below PREFIX), bodies as they are.
  let buf = Buffer.alloc(0);
  let body = 0;
  client.on('data', (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    for (;;) {
      if (body > 0) {
        const n = Math.min(body, buf.length);
        if (n === 0) return;
        server.write(buf.subarray(0, n));
        buf = buf.subarray(n);
        body -= n;
        continue;
      }
      const end = buf.indexOf('\r\n\r\n');
      if (end === -1) return;
      let head = buf.subarray(0, end + 4).toString('latin1');
      buf = buf.subarray(end + 4);
      const m = /^([A-Z]+) (\S+) (HTTP\/1\.[01])\r\n/.exec(head);
      if (m) {
        let target = m[2];
        if (PREFIX) {
          target = target === PREFIX || target.startsWith(`${PREFIX}/`) ? target.slice(PREFIX.length) || '/' : '/outside-the-mount';
          head = `${m[1]} ${target} ${m[3]}\r\n${head.slice(m[0].length)}`;
        }
        const lei = /\r\nlast-event-id: *([^\r\n]*)/i.exec(head);
        requests.push({ method: m[1], path: target, lastEventId: lei ? lei[1] : null });
      }
      const len = /\r\ncontent-length: *(\d+)/i.exec(head);
      body = len ? Number(len[1]) : 0;
      server.write(Buffer.from(head, 'latin1'));
    }
  });
  server.pipe(client);
  const close = () => {
    client.destroy();
    server.destroy();
    sockets.delete(client);
    sockets.delete(server);
  };
  client.on('error', close);
  server.on('error', close);
  client.on('close', close);
  server.on('close', close);
});
/** Cuts every connection between the browser and the server, as a network failure would. */
function cutConnections() {
  const n = sockets.size;
  for (const s of sockets) s.destroy();
  sockets.clear();
  return n;
}

// ---------------------------------------------------------------------------------------------
// A webhook receiver: the first delivery fails (500), the rest succeed.

const received = [];
const receiver = http.createServer((req, res) => {
  let body = '';
  req.on('data', (c) => { body += c; });
  req.on('end', () => {
    received.push({ headers: req.headers, body });
    if (received.length === 1) {
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end('receiver failed <b>once</b>');
    } else {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('ok');
    }
  });
});

const listen = (srv) => new Promise((resolve) => srv.listen(0, '127.0.0.1', () => resolve(srv.address().port)));

// ---------------------------------------------------------------------------------------------
// The API, straight to the server (not through the browser).

async function api(method, p, body, key = ADMIN) {
  const res = await fetch(new URL(p, `${BASE}/`), {
    method,
    headers: { Authorization: `Bearer ${key}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${p}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}
const trigger = (workflow, extra = {}) => api('POST', 'workflows/trigger', { workflow, ...extra }).then((r) => r.job_id);

// ---------------------------------------------------------------------------------------------
// The browser.

const consoleErrors = [];
let allowed = []; // regexps of console errors the current step provokes on purpose
const foreign = [];
let origin = '';

function watch(page, label) {
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const text = msg.text();
    if (allowed.some((re) => re.test(text))) {
      log(`(expected console message on ${label}: ${text})`);
      return;
    }
    consoleErrors.push(`${label}: ${text}`);
  });
  page.on('pageerror', (err) => consoleErrors.push(`${label}: uncaught ${err.message}`));
  page.on('request', (req) => {
    if (!req.url().startsWith(origin) && !req.url().startsWith('data:')) foreign.push(req.url());
  });
}

async function expecting(patterns, fn) {
  allowed = patterns;
  try {
    return await fn();
  } finally {
    allowed = [];
  }
}

const text = (page, sel) => page.locator(sel).first().textContent();

async function waitText(page, sel, needle, timeout = WAIT) {
  await page.waitForFunction(([s, n]) => {
    const el = document.querySelector(s);
    return el && el.textContent.includes(n);
  }, [sel, needle], { timeout });
}

async function waitStatus(page, status, timeout = WAIT) {
  await page.waitForFunction((st) => {
    const el = document.querySelector('[data-testid="job-status"]');
    return el && el.textContent === st;
  }, status, { timeout });
}

async function login(page, key) {
  await page.goto(`${origin}/ui/`);
  await page.locator('[data-testid="login-key"]').waitFor();
  // Keyboard only: the key field has the focus; Enter submits.
  await page.waitForFunction(() => document.activeElement && document.activeElement.dataset.testid === 'login-key');
  await page.keyboard.type(key);
  await page.keyboard.press('Enter');
  await page.locator('#nav').waitFor();
}

async function shoot(page, name, widths = [1280, 390]) {
  if (SUITE !== 'full') return; // the full run's pictures are the ones kept
  for (const w of widths) {
    await page.setViewportSize({ width: w, height: w > 500 ? 860 : 844 });
    // Let the layout settle on the new width before the picture (a frame, not a delay).
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    await page.screenshot({ path: path.join(SHOTS, `${name}-${w}.png`) });
  }
  await page.setViewportSize({ width: 1280, height: 860 });
}

async function main() {
  const proxyPort = await listen(proxy);
  const receiverPort = await listen(receiver);
  origin = `http://127.0.0.1:${proxyPort}${PREFIX}`;
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'aiwg-e2e-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: env('AIWG_TEST_CHROMIUM'),
    headless: true,
    viewport: { width: 1280, height: 860 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  context.setDefaultTimeout(WAIT);
  try {
    const page = context.pages()[0] || await context.newPage();
    watch(page, 'admin');

    // The page and its security headers.
    const res = await page.goto(`${origin}/ui/`);
    const csp = res.headers()['content-security-policy'] || '';
    check(res.status() === 200 && csp.includes("default-src 'none'") && csp.includes("script-src 'self'"),
      'the page is served with a strict Content-Security-Policy');
    await page.locator('[data-testid="login-key"]').waitFor();
    await shoot(page, 'login');
    // Without the slash: redirected to ui/, under the mount point.
    await page.goto(`${origin}/ui`);
    await page.locator('[data-testid="login-key"]').waitFor();
    check(page.url() === `${origin}/ui/`, `ui redirects to ui/ (${page.url()})`);

    // A wrong key: a clear message, and the form again.
    await expecting([/status of 401/], async () => {
      await page.fill('[data-testid="login-key"]', 'wrong-key-wrong-key-wrong');
      await page.click('[data-testid="login-submit"]');
      await waitText(page, '.login-status', 'not accepted');
    });
    check(await page.locator('[data-testid="login-key"]').isVisible(), 'a wrong key gets a message and the form again');

    await page.fill('[data-testid="login-key"]', '');
    await login(page, ADMIN);
    await page.locator('[data-testid="jobs-table"]').waitFor();
    check((await text(page, '#who')).includes('ops'), 'signed in with the admin key');

    // Keyboard: Tab reaches the Workflows link, Enter follows it.
    await page.evaluate(() => document.activeElement && document.activeElement.blur());
    let reached = false;
    for (let i = 0; i < 15 && !reached; i += 1) {
      await page.keyboard.press('Tab');
      reached = await page.evaluate(() => document.activeElement && document.activeElement.dataset.section === 'workflows');
    }
    check(reached, 'the sections are reachable with the keyboard');
    await page.keyboard.press('Enter');
    await page.locator('[data-testid="trigger-form"]').waitFor();

    // Trigger from the form: inline validation first, then the job's log streams to completed.
    const form = page.locator('[data-testid="trigger-form"]');
    await form.locator('[name="workflow"]').selectOption('greet');
    await page.waitForFunction(() => location.hash === '#/workflows/greet');
    await form.locator('[name="who"]').waitFor();
    const unlabelled = await page.evaluate(() => [...document.querySelectorAll('[data-testid="trigger-form"] input, [data-testid="trigger-form"] select, [data-testid="trigger-form"] textarea')]
      .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')).map((el) => el.name));
    check(unlabelled.length === 0, `every control of the trigger form has a label (${unlabelled})`);
    for (const name of ['workflow', 'who', 'mood', 'guidance', 'project_path']) {
      check(await form.locator(`[name="${name}"]`).count() === 1, `the trigger form has an input named ${name}`);
    }
    await form.locator('[name="who"]').fill('Not Valid!');
    await form.locator('[name="who"]').blur();
    await waitText(page, '[data-testid="trigger-form"] .field-error:not([hidden])', 'Must match');
    await page.click('[data-testid="trigger-submit"]');
    check(await page.evaluate(() => location.hash) === '#/workflows/greet', 'an invalid parameter keeps the form (shown inline)');
    await form.locator('[name="who"]').fill('world');
    await form.locator('[name="mood"]').selectOption('happy');
    await form.locator('[name="guidance"]').fill('be <b>brief</b>');
    await shoot(page, 'workflows');
    await page.click('[data-testid="trigger-submit"]');
    await page.waitForFunction(() => /^#\/jobs\/[0-9a-f-]{36}$/.test(location.hash));
    const formJob = (await page.evaluate(() => location.hash)).split('/').pop();
    await waitStatus(page, 'completed');
    await waitText(page, '[data-testid="job-log"]', 'goodbye world');
    const logText = await text(page, '[data-testid="job-log"]');
    check(['hello world (happy) line 1', 'hello world (happy) line 3', 'goodbye world'].every((l) => logText.includes(l)),
      'the form\'s job streamed its log to completed');
    check(await page.locator('.checklist .step-done').count() === 2, 'both steps are checked off');
    check((await text(page, '[data-testid="job-result"]')).includes('goodbye world'), 'the result is shown');
    check(await page.locator('[data-testid="cancel-job"]').count() === 0, 'a finished job has no cancel button');
    await shoot(page, 'job');

    if (SUITE === 'full') {
      // Run again: the same parameters, a new job.
      await page.click('[data-testid="run-again"]');
      await page.waitForFunction((old) => /^#\/jobs\//.test(location.hash) && !location.hash.endsWith(old), formJob);
      const againId = (await page.evaluate(() => location.hash)).split('/').pop();
      await waitStatus(page, 'completed');
      const again = await api('GET', `workflows/${againId}/status`);
      check(again.params.who === 'world' && again.params.mood === 'happy' && again.guidance === 'be <b>brief</b>',
        'run again keeps the parameters and the guidance');
    }

    // A job triggered through the API appears in the list, and reaches completed, without a reload.
    await page.goto(`${origin}/ui/#/jobs`);
    await page.locator('[data-testid="job-row"]').first().waitFor();
    await page.waitForFunction(() => document.getElementById('live').dataset.state === 'live');
    await page.evaluate(() => { window.__sameDocument = true; });
    const apiJob = await trigger('greet', { params: { who: 'api' } });
    const row = page.locator(`[data-testid="job-row"][data-job-id="${apiJob}"]`);
    await row.waitFor();
    await page.waitForFunction((id) => {
      const r = document.querySelector(`[data-testid="job-row"][data-job-id="${id}"] [data-testid="job-status"]`);
      return r && r.textContent === 'completed';
    }, apiJob);
    check(await page.evaluate(() => window.__sameDocument === true), 'a job triggered through the API appeared in the list without a reload');
    check(await page.locator('[data-testid="job-row"]').first().getAttribute('data-job-id') === apiJob, 'newest first');

    if (SUITE === 'full') {
      // Filters.
      await page.selectOption('#filter-workflow', 'greet');
      await page.waitForFunction(() => location.hash.includes('workflow=greet'));
      await page.locator(`[data-testid="job-row"][data-job-id="${apiJob}"]`).waitFor();
      await page.selectOption('#filter-status', 'failed');
      await page.waitForFunction(() => location.hash.includes('status=failed'));
      await waitText(page, '.list-message', 'No jobs match');
      check(await page.locator('[data-testid="job-row"]').count() === 0, 'the status filter applies');

      // The list is read again only for events that can change it: of the jobs it does not
      // show, only one that now has the status filtered for.
      await page.goto(`${origin}/ui/#/jobs?status=failed`);
      await page.waitForFunction(() => document.getElementById('live').dataset.state === 'live');
      await waitText(page, '.list-message', 'No jobs match');
      const listReads = () => requests.filter((r) => r.method === 'GET' && r.path.startsWith('/jobs?')).length;
      const readsBefore = listReads();
      // Six seconds of another job (its start and its end more than the list's one read a
      // second apart), then a job that fails.
      await api('POST', 'workflows/trigger', { workflow: 'ticker', async: false });
      const failing = (await api('POST', 'workflows/trigger', { workflow: 'broken', async: false })).job_id;
      await page.locator(`[data-testid="job-row"][data-job-id="${failing}"]`).waitFor();
      check(listReads() - readsBefore === 1,
        `the filtered list was read once, for the job that failed, not for the other's events (${listReads() - readsBefore})`);
      await page.goto(`${origin}/ui/#/jobs`);
      await page.locator('[data-testid="job-row"]').first().waitFor();

      // A lost stream of the list: reconnects with Last-Event-ID and misses nothing.
      await page.waitForFunction(() => document.getElementById('live').dataset.state === 'live');
      await expecting([/net::ERR_|Failed to load resource/], async () => {
        const before = requests.length;
        check(cutConnections() > 0, 'connections cut');
        const missed = await trigger('greet', { params: { who: 'gap' } });
        await page.locator(`[data-testid="job-row"][data-job-id="${missed}"]`).waitFor();
        const resumed = requests.slice(before).find((r) => r.path.startsWith('/events') && r.lastEventId);
        check(resumed, `the jobs stream resumed with Last-Event-ID (${resumed && resumed.lastEventId})`);
        await page.waitForFunction(() => document.getElementById('live').dataset.state === 'live');
      });
      await page.locator(`[data-testid="job-row"]`).first().waitFor();
    }

    // Cancel a running job.
    const slow = await trigger('slow');
    await page.goto(`${origin}/ui/#/jobs/${slow}`);
    await waitText(page, '[data-testid="job-log"]', 'started');
    await waitStatus(page, 'running');
    await page.click('[data-testid="cancel-job"]');
    await waitStatus(page, 'cancelled');
    await page.locator('[data-testid="cancel-job"]').waitFor({ state: 'detached' });
    check((await api('GET', `workflows/${slow}/status`)).status === 'cancelled', 'a running job was cancelled from its page');

    // A gated step: the job waits, its page says for which step and until when; approved there.
    const gated = await trigger('gated');
    await page.goto(`${origin}/ui/#/jobs/${gated}`);
    await waitStatus(page, 'awaiting_approval');
    const waiting = await text(page, '[data-testid="approval-step"]');
    const expires = (await api('GET', `workflows/${gated}/status`)).approval.expires_at;
    const shown = await page.locator('[data-testid="approval-step"] time').getAttribute('datetime');
    check(waiting.includes('step “ship”') && !waiting.includes('[object') && new Date(shown).getTime() === new Date(expires).getTime(),
      `the approval names its step and its deadline as a time (${waiting})`);
    // The first read of the job after the approval fails (a server restarting): the page and
    // its log stay, and the next status event reads the job again.
    let failures = 0;
    await page.route('**/workflows/*/status', (route) => {
      if (failures++ > 0) return route.continue();
      return route.fulfill({
        status: 503, contentType: 'application/problem+json',
        body: JSON.stringify({ type: 'about:blank', title: 'Service Unavailable', status: 503, detail: 'restarting' }),
      });
    });
    await expecting([/Failed to load resource/], async () => {
      await page.click('[data-testid="approve-job"]');
      await waitStatus(page, 'completed');
      await waitText(page, '[data-testid="job-log"]', 'shipped');
    });
    await page.waitForFunction(() => !document.querySelector('.action-message .notice'), null, { timeout: WAIT });
    await page.unroute('**/workflows/*/status');
    // A stream with nothing left to resume (204, the server's answer to a finished job's
    // Last-Event-ID) ends the log; it is not asked again.
    let asked = 0;
    await page.route('**/workflows/*/events', (route) => { asked += 1; return route.fulfill({ status: 204 }); });
    await page.goto(`${origin}/ui/#/jobs`);
    await page.goto(`${origin}/ui/#/jobs/${gated}`);
    await waitText(page, '#h-log + .muted', 'ended');
    await page.unroute('**/workflows/*/events');
    check(asked === 1, `a 204 ends the job's stream without another request (${asked})`);
    check(failures > 1,
      `a failed read of the job kept its page and its log, and the next read cleared the notice (${failures} reads)`);
    check((await api('GET', `workflows/${gated}/status`)).approvals[0].decision.via === 'api', 'a waiting job was approved from its page');

    // Markup in output, guidance and descriptions is text, and runs nothing.
    const marked = await trigger('markup', { guidance: '<img src=x onerror="window.__pwned=2"><b>bold</b>' });
    await page.goto(`${origin}/ui/#/jobs/${marked}`);
    await waitStatus(page, 'completed');
    await waitText(page, '[data-testid="job-log"]', '<script>window.__pwned=1</script>');
    const xss = await page.evaluate(() => ({
      pwned: window.__pwned,
      log: document.querySelector('[data-testid="job-log"]').textContent,
      scripts: document.querySelectorAll('main script').length,
      images: [...document.querySelectorAll('main img')].length,
      bold: document.querySelectorAll('main b').length,
    }));
    check(xss.log.includes('<img src=x onerror="window.__pwned=1">'), 'the <img onerror> of the output is shown as text');
    check(xss.scripts === 0 && xss.images === 0 && xss.bold === 0, 'no element was made from output or guidance');
    await page.goto(`${origin}/ui/#/workflows/markup`);
    await waitText(page, '.wf-card.selected', '<i>markup</i>');
    check(await page.locator('main i, main script').count() === 0, 'a workflow description with markup is shown as text');
    check(await page.evaluate(() => window.__pwned) === undefined, 'window.__pwned is undefined: nothing ran');

    if (SUITE === 'full') {
      // The same for a log that lost its connection: resumed with Last-Event-ID, each line once.
      const ticker = await trigger('ticker');
      await page.goto(`${origin}/ui/#/jobs/${ticker}`);
      await waitText(page, '[data-testid="job-log"]', 'tick 2');
      await expecting([/net::ERR_|Failed to load resource/], async () => {
        const before = requests.length;
        check(cutConnections() > 0, 'connections cut');
        await waitStatus(page, 'completed', 30000);
        const resumed = requests.slice(before).find((r) => r.path.includes(`/workflows/${ticker}/events`) && r.lastEventId);
        check(resumed, `the job's stream resumed with Last-Event-ID ${resumed && resumed.lastEventId}`);
      });
      const ticks = await page.evaluate(() => [...document.querySelectorAll('[data-testid="job-log"] .log-body')]
        .map((e) => e.textContent.trim()).filter((t) => /^tick \d+$/.test(t)));
      check(JSON.stringify(ticks) === JSON.stringify(Array.from({ length: 12 }, (_, i) => `tick ${i + 1}`)),
        `every tick once, in order, across the lost connection (${ticks.length})`);

      // Outbound webhooks: create (secret shown once), a delivery with its attempts, retry.
      await page.goto(`${origin}/ui/#/webhooks`);
      await page.locator('[data-testid="subscriptions-table"]').waitFor();
      await page.fill('input[name="url"]', `http://127.0.0.1:${receiverPort}/hook`);
      await page.fill('input[name="description"]', 'receiver <img src=x onerror="window.__pwned=4">');
      await page.click('button:has-text("Create subscription")');
      await page.locator('[data-testid="webhook-secret"]').waitFor();
      check((await text(page, '[data-testid="webhook-secret"]')).startsWith('whsec_'), 'the new secret is shown once');
      const subRow = page.locator('[data-testid="subscriptions-table"] tbody tr').first();
      await subRow.waitFor();
      check((await subRow.textContent()).includes('receiver <img src=x'), 'the description is shown as text');
      await shoot(page, 'webhooks');
      await subRow.locator('a').click();
      await page.locator('[data-testid="deliveries-table"]').waitFor();
      const deliveredJob = await trigger('greet', { params: { who: 'hooked' } });
      await page.waitForFunction(() => [...document.querySelectorAll('[data-testid="deliveries-table"] tbody tr')].some((tr) =>
        tr.dataset.state === 'succeeded' && tr.querySelectorAll('[data-testid="delivery-attempt"]').length === 2), null, { timeout: 30000 });
      const twice = page.locator('[data-testid="deliveries-table"] tbody tr', { has: page.locator('[data-testid="delivery-attempt"] >> nth=1') }).first();
      const attemptsText = await twice.textContent();
      check(attemptsText.includes('500') && attemptsText.includes('200'), 'a delivery shows both attempts: 500, then 200');
      await twice.locator('summary:has-text("Response body")').first().click();
      await waitText(page, '[data-testid="deliveries-table"]', 'receiver failed <b>once</b>');
      check(received.some((r) => (r.headers['webhook-signature'] || '').startsWith('v1,') && r.body.includes(deliveredJob)),
        'the receiver got signed deliveries of the job');
      const deliveryId = await twice.getAttribute('data-delivery-id');
      await twice.locator('[data-testid="retry-delivery"]').click();
      await page.waitForFunction((id) => {
        const tr = document.querySelector(`[data-testid="deliveries-table"] tr[data-delivery-id="${id}"]`);
        return tr && tr.querySelectorAll('[data-testid="delivery-attempt"]').length === 3 && tr.textContent.includes('(manual)');
      }, deliveryId, { timeout: 30000 });
      check(true, 'a retried delivery shows its third, manual attempt');
      // Edit the events, disable, rotate.
      await page.uncheck('fieldset.events input[value="job.*"]');
      await page.check('fieldset.events input[value="job.completed"]');
      await page.click('button:has-text("Save")');
      await waitText(page, 'main', 'Saved.');
      await page.click('button:has-text("Disable")');
      await page.locator('.page-head .badge:has-text("disabled")').waitFor();
      await page.click('button:has-text("Rotate secret")');
      await page.locator('[data-testid="webhook-secret"]').waitFor();
      const sub = (await api('GET', 'webhooks')).webhooks[0];
      check(!sub.enabled && JSON.stringify(sub.events) === '["job.completed"]', 'events edited and the subscription disabled');
      await page.locator('[data-testid="webhook-secret"]').evaluate((el) => el.closest('.notice').remove());
      await shoot(page, 'webhook');
      // A second subscription, deleted.
      const doomed = await api('POST', 'webhooks', { url: `http://127.0.0.1:${receiverPort}/other`, events: ['*'] });
      await page.goto(`${origin}/ui/#/webhooks/${doomed.id}`);
      await page.click('button:has-text("Delete")');
      await page.click('button:has-text("Really delete?")');
      await page.waitForFunction(() => location.hash === '#/webhooks');
      check((await api('GET', 'webhooks')).webhooks.every((w) => w.id !== doomed.id), 'a subscription was deleted');

      // Status.
      await page.goto(`${origin}/ui/#/status`);
      await page.locator('[data-testid="agents-table"]').waitFor();
      check((await text(page, '[data-testid="agents-table"]')).includes('sh'), 'the status page lists the agents');
      check(/\d/.test(await text(page, '[data-testid="status-version"]')), 'the status page shows the version');
      await shoot(page, 'status');

      // A failed job's page: the failed step, the error, standard error.
      const broken = await trigger('broken');
      const busy = await trigger('slow');
      await page.goto(`${origin}/ui/#/jobs`);
      await page.waitForFunction(([b, r]) => {
        const st = (id) => {
          const e = document.querySelector(`[data-job-id="${id}"] [data-testid="job-status"]`);
          return e && e.textContent;
        };
        return st(b) === 'failed' && st(r) === 'running';
      }, [broken, busy]);
      await shoot(page, 'jobs');
      await api('POST', `workflows/${busy}/cancel`);
      await page.goto(`${origin}/ui/#/jobs/${broken}`);
      await waitStatus(page, 'failed');
      await page.locator('.checklist .step-failed').waitFor();
      await page.locator('.card .notice.error').waitFor();
      check((await text(page, '[data-testid="job-log"] .log-stderr')).includes('no such thing'),
        'a failed job shows its failed step, its error and its standard error');

      // Dark mode follows the system.
      const light = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
      await page.emulateMedia({ colorScheme: 'dark' });
      const dark = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
      check(light !== dark, `dark mode follows the system setting (${light} → ${dark})`);
      await page.goto(`${origin}/ui/#/jobs/${formJob}`);
      await waitStatus(page, 'completed');
      await shoot(page, 'job-dark', [1280]);
      await page.emulateMedia({ colorScheme: 'light' });

      // A read-only key: no cancel button, no trigger form, no webhooks.
      const viewer = await context.newPage();
      watch(viewer, 'viewer');
      await login(viewer, VIEWER);
      await viewer.locator('[data-testid="jobs-table"]').waitFor();
      check(!(await viewer.locator('#nav a[data-section="webhooks"]').isVisible()), 'a read-only key sees no Webhooks section');
      const running = await trigger('slow');
      await viewer.goto(`${origin}/ui/#/jobs/${running}`);
      await waitText(viewer, '[data-testid="job-log"]', 'started');
      await waitStatus(viewer, 'running');
      check(await viewer.locator('[data-testid="cancel-job"]').count() === 0, 'a read-only key sees no cancel button');
      check(await viewer.locator('[data-testid="run-again"]').count() === 0, 'a read-only key sees no run-again button');
      await api('POST', `workflows/${running}/cancel`);
      await waitStatus(viewer, 'cancelled');
      await viewer.goto(`${origin}/ui/#/workflows`);
      await viewer.locator('.wf-card').first().waitFor();
      check(await viewer.locator('[data-testid="trigger-form"]').count() === 0, 'a read-only key gets no trigger form');
      // A key that stops working: a clear message and the form again.
      await expecting([/status of 401/], async () => {
        await viewer.evaluate(() => sessionStorage.setItem('aiwg.key', 'revoked-key-revoked-key-0000'));
        await viewer.reload();
        await viewer.locator('[data-testid="login-key"]').waitFor();
        await waitText(viewer, '.login-status', 'no longer accepted');
      });
      check(true, 'a revoked key gets a clear message and the sign-in form');
      await viewer.close();
    }

    check(foreign.length === 0, `nothing was fetched from anywhere but the server (${foreign.join(', ')})`);
    check(consoleErrors.length === 0, `no console errors (${consoleErrors.join(' | ')})`);
  } catch (err) {
    // What the pages showed when it failed.
    let n = 0;
    for (const p of context.pages()) {
      n += 1;
      await p.screenshot({ path: path.join(SHOTS, `failure-${SUITE}-${n}.png`), fullPage: true }).catch(() => {});
      log(`page ${n} at ${p.url()}: see failure-${SUITE}-${n}.png`);
    }
    throw err;
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
    proxy.close();
    receiver.close();
    cutConnections();
  }
  console.log(`e2e ${SUITE}: all checks passed`);
}

const deadline = setTimeout(() => {
  console.error(`e2e ${SUITE}: timed out`);
  process.exit(2);
}, Number(process.env.AIWG_E2E_TIMEOUT_MS || 240000));
main().then(() => {
  clearTimeout(deadline);
  process.exit(0);
}, (err) => {
  console.error(`e2e ${SUITE}: FAILED: ${err && err.stack ? err.stack : err}`);
  if (consoleErrors.length) console.error(`console errors: ${consoleErrors.join(' | ')}`);
  process.exit(1);
});
