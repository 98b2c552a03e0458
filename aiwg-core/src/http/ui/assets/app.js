// The dashboard's shell: the key, the sections, and a router over the URL's fragment
// (#/jobs, #/jobs/<id>, #/workflows, #/workflows/<name>, #/webhooks, #/webhooks/<id>, #/status).

import { getKey, clearKey, whoami, onUnauthorized } from './api.js';
import { fill, h, notice } from './dom.js';
import { renderLogin } from './login.js';
import { renderJobs } from './jobs.js';
import { renderJob } from './job.js';
import { renderWorkflows } from './workflows.js';
import { renderWebhooks, renderWebhook } from './webhooks.js';
import { renderStatus } from './status.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const sessionBox = document.getElementById('session');
const live = document.getElementById('live');
const who = document.getElementById('who');

let session = null;
let cleanup = null;

function setLive(state) {
  live.dataset.state = state;
  live.textContent = { live: 'live', reconnecting: 'reconnecting…', closed: 'idle', idle: 'idle' }[state] || state;
}

function signOut(message) {
  if (cleanup) cleanup();
  cleanup = null;
  session = null;
  clearKey();
  nav.hidden = true;
  sessionBox.hidden = true;
  setLive('idle');
  document.title = 'aiwg — sign in';
  renderLogin(main, {
    message,
    done: (s) => {
      session = s;
      if (!location.hash || location.hash === '#/' || location.hash === '#') {
        history.replaceState(null, '', defaultRoute());
      }
      route();
    },
  });
}

function defaultRoute() {
  return session && session.can('read') ? '#/jobs' : '#/workflows';
}

/** The fragment as a path and a query: `#/jobs?status=failed` → ['jobs'], {status}. */
function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query] = raw.split('?');
  let parts;
  try {
    parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  } catch {
    parts = null; // a malformed escape (`%E0%A4%A`)
  }
  return { parts, query: new URLSearchParams(query || '') };
}

const views = {
  jobs: { scope: 'read', title: 'Jobs', render: (ctx) => (ctx.parts[1] ? renderJob(ctx, ctx.parts[1]) : renderJobs(ctx)) },
  workflows: { scope: 'read', title: 'Workflows', render: (ctx) => renderWorkflows(ctx, ctx.parts[1]) },
  webhooks: { scope: 'admin', title: 'Webhooks', render: (ctx) => (ctx.parts[1] ? renderWebhook(ctx, ctx.parts[1]) : renderWebhooks(ctx)) },
  status: { scope: 'read', title: 'Status', render: (ctx) => renderStatus(ctx) },
};

function route() {
  if (!session) return;
  if (cleanup) cleanup();
  cleanup = null;
  setLive('idle');
  const { parts, query } = parseHash();
  if (!parts) {
    nav.hidden = false;
    sessionBox.hidden = false;
    fill(main, notice('error', 'This address is malformed (a broken %-escape). Pick a section above.'));
    return;
  }
  const section = parts[0] || '';
  const view = views[section];
  if (!view) {
    location.replace(defaultRoute());
    return;
  }
  nav.hidden = false;
  sessionBox.hidden = false;
  who.textContent = `${session.name} (${[...session.scopes].join(', ')})`;
  for (const a of nav.querySelectorAll('a')) {
    a.hidden = !session.can(a.dataset.scope);
    if (a.dataset.section === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.title = `aiwg — ${view.title}`;
  if (!session.can(view.scope)) {
    fill(main, notice('info', `This key (${session.name}) lacks the “${view.scope}” scope this section needs.`));
    return;
  }
  const ctx = {
    session, parts, query, setLive,
    main,
    navigate: (hash) => { location.hash = hash; },
  };
  main.replaceChildren();
  try {
    cleanup = view.render(ctx) || null;
  } catch (e) {
    fill(main, notice('error', `This page failed: ${e.message}`));
  }
}

onUnauthorized(() => {
  signOut('Your key is no longer accepted: it is wrong or has been revoked. Enter a key again.');
});

document.getElementById('logout').addEventListener('click', () => signOut());
// The skip link moves the focus to the content; followed as a link it would change the
// fragment, which is the router's, and leave the page.
document.querySelector('a.skip').addEventListener('click', (e) => {
  e.preventDefault();
  main.focus();
});
window.addEventListener('hashchange', route);

async function start() {
  const key = getKey();
  if (!key) {
    signOut();
    return;
  }
  try {
    session = await whoami(key);
  } catch (e) {
    if (e.status === 401) {
      signOut('Your key is no longer accepted: it is wrong or has been revoked. Enter a key again.');
      return;
    }
    // The server is restarting, busy or cannot check keys just now: the key may be right, so
    // it is kept for another try.
    const again = h('button', { type: 'button', 'data-testid': 'retry-whoami' }, 'Try again');
    again.addEventListener('click', () => start());
    const other = h('button', { type: 'button', class: 'quiet' }, 'Use another key');
    other.addEventListener('click', () => signOut());
    fill(main, notice('error', `The server could not check the key: ${e.message}`), h('p', {}, again, ' ', other));
    return;
  }
  if (!location.hash || location.hash === '#/' || location.hash === '#') {
    history.replaceState(null, '', defaultRoute());
  }
  route();
}

start();
