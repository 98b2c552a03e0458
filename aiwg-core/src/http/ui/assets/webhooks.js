// Outbound webhooks: subscriptions (create, showing the secret once; edit; disable; rotate;
// delete) and each one's deliveries with every attempt, and a retry button.

import { call } from './api.js';
import { h, fill, badge, time, duration, json, table, notice, field, fieldError } from './dom.js';

/** The event filters a subscription may name (the server's list). */
const FILTERS = ['*', 'job.*', 'job.queued', 'job.started', 'job.step.completed', 'job.completed',
  'job.failed', 'job.cancelled', 'job.timed_out'];

function eventBoxes(prefix, chosen) {
  const boxes = FILTERS.map((f) => {
    const id = `${prefix}-${f.replace(/[^a-z*]/g, '-').replace('*', 'all')}`;
    return h('label', { class: 'check', for: id },
      h('input', { type: 'checkbox', id, name: 'events', value: f, checked: chosen.includes(f) }), ' ', f);
  });
  const set = h('fieldset', { class: 'events' }, h('legend', {}, 'Events'), h('div', { class: 'checks' }, boxes),
    h('div', { class: 'field-error', role: 'alert', hidden: true }));
  return {
    el: set,
    values: () => [...set.querySelectorAll('input:checked')].map((i) => i.value),
    error: (msg) => {
      const e = set.querySelector('.field-error');
      e.textContent = msg || '';
      e.hidden = !msg;
    },
  };
}

/** The secret, shown once, with a button that copies it. */
function secretPanel(title, secret, note) {
  const code = h('code', { class: 'secret', 'data-testid': 'webhook-secret' }, secret);
  const copy = h('button', { type: 'button', class: 'quiet' }, 'Copy');
  copy.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(secret);
      copy.textContent = 'Copied';
    } catch {
      const range = document.createRange();
      range.selectNodeContents(code);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      copy.textContent = 'Selected: press Ctrl+C';
    }
  });
  return notice('ok', h('strong', {}, title), h('p', {}, 'Copy it now: it is not shown again.', note ? ` ${note}` : ''),
    h('div', { class: 'secret-row' }, code, copy));
}

function stateBadge(sub) {
  return sub.enabled ? badge('enabled') : badge('disabled', { title: sub.disabled_reason || 'disabled' });
}

export function renderWebhooks(ctx) {
  const { main } = ctx;
  const url = h('input', { type: 'url', name: 'url', required: true, placeholder: 'https://example.com/hooks/aiwg', spellcheck: 'false' });
  const description = h('input', { type: 'text', name: 'description' });
  const events = eventBoxes('new', ['job.*']);
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Create subscription');
  const status = h('div', { class: 'form-status' });
  const form = h('form', { class: 'card', novalidate: true, 'aria-labelledby': 'h-new-hook' },
    h('h2', { id: 'h-new-hook' }, 'New subscription'),
    field('URL', url, 'Where deliveries are POSTed (http or https, a host name).'),
    events.el,
    field('Description', description),
    h('div', { class: 'form-actions' }, submit),
    status);
  const listBox = h('div', {});
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Webhooks')), listBox, form);

  let alive = true;
  async function load() {
    try {
      const list = await call('GET', 'webhooks');
      if (!alive) return;
      if (!list.webhooks.length) {
        fill(listBox, notice('info', 'No subscriptions yet.'), table('subscriptions-table', ['URL', 'Events', 'State', 'Failures', 'Created'], [], 'Subscriptions'));
        return;
      }
      fill(listBox, table('subscriptions-table', ['URL', 'Events', 'State', h('th', { scope: 'col', class: 'num wide-only' }, 'Failures'), h('th', { scope: 'col', class: 'wide-only' }, 'Created')],
        list.webhooks.map((s) => h('tr', { 'data-webhook-id': s.id },
          h('td', { class: 'url-cell' },
            h('a', { href: `#/webhooks/${encodeURIComponent(s.id)}`, class: 'mono' }, s.url),
            s.description ? h('div', { class: 'muted' }, s.description) : null),
          h('td', {}, s.events.join(', ')),
          h('td', {}, stateBadge(s), s.disabled_reason ? h('div', { class: 'muted' }, s.disabled_reason) : null),
          h('td', { class: 'num wide-only' }, String(s.consecutive_failures)),
          h('td', { class: 'wide-only' }, time(s.created_at)))),
        'Subscriptions'));
    } catch (e) {
      if (alive) fill(listBox, notice('error', `The subscriptions could not be loaded: ${e.message}`));
    }
  }

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    status.replaceChildren();
    fieldError(url, null);
    events.error(null);
    const chosen = events.values();
    let bad = false;
    if (!url.value.trim()) {
      fieldError(url, 'Required.');
      bad = true;
    }
    if (!chosen.length) {
      events.error('Choose at least one.');
      bad = true;
    }
    if (bad) return;
    const body = { url: url.value.trim(), events: chosen };
    if (description.value.trim()) body.description = description.value.trim();
    submit.disabled = true;
    try {
      const created = await call('POST', 'webhooks', body);
      fill(status, secretPanel('Subscription created. Its signing secret:', created.secret));
      url.value = '';
      description.value = '';
      load();
    } catch (err) {
      const detail = err.problem.detail || err.message;
      if (/url/i.test(detail)) fieldError(url, detail);
      else if (/event/i.test(detail)) events.error(detail);
      else status.append(notice('error', `Not created: ${detail}`));
    } finally {
      submit.disabled = false;
    }
  });

  load();
  return () => { alive = false; };
}

function attemptsList(d) {
  if (!d.attempts.length) return h('p', { class: 'muted' }, d.next_attempt_at ? 'Not attempted yet.' : 'No attempts.');
  return h('ol', { class: 'attempts', 'data-testid': 'delivery-attempts' }, d.attempts.map((a, i) => h('li', { class: 'attempt', 'data-testid': 'delivery-attempt' },
    h('div', { class: 'attempt-head' },
      h('span', { class: 'muted' }, `#${i + 1}`), ' ',
      time(a.at), ' ',
      h('span', { class: `code ${a.status_code >= 200 && a.status_code < 300 ? 'ok' : 'bad'}` }, a.status_code ? String(a.status_code) : 'no response'),
      ' ', h('span', { class: 'muted' }, duration(a.duration_ms)),
      a.trigger === 'manual' ? h('span', { class: 'muted' }, ' (manual)') : null),
    a.error ? h('div', { class: 'attempt-error' }, a.error) : null,
    a.response_body ? h('details', { 'data-key': `${d.id}/${i}` }, h('summary', {}, 'Response body'), h('pre', { class: 'output' }, a.response_body)) : null)));
}

export function renderWebhook(ctx, id) {
  const { main } = ctx;
  const head = h('div', { class: 'page-head' });
  const message = h('div', {});
  const settings = h('div', {});
  const deliveriesBox = h('div', {});
  const pager = h('nav', { class: 'pager', 'aria-label': 'Delivery pages' });
  const actionsBox = h('div', {});
  fill(main, h('p', { class: 'crumbs' }, h('a', { href: '#/webhooks' }, '← Webhooks')), head, message, actionsBox,
    h('section', { class: 'card', 'aria-labelledby': 'h-deliveries' },
      h('div', { class: 'section-head' }, h('h2', { id: 'h-deliveries' }, 'Deliveries'),
        h('button', { type: 'button', class: 'quiet', onclick: () => { shown = ''; loadDeliveries(); } }, 'Refresh')),
      deliveriesBox, pager),
    settings);

  let alive = true;
  let sub = null;
  let cursor = null;
  let shown = '';
  const path = `webhooks/${encodeURIComponent(id)}`;

  function say(kind, ...content) {
    fill(message, notice(kind, ...content));
  }

  function renderSub() {
    fill(head, h('h1', { class: 'mono url-title' }, sub.url), stateBadge(sub));
    const urlInput = h('input', { type: 'url', name: 'url', value: sub.url, spellcheck: 'false' });
    const descInput = h('input', { type: 'text', name: 'description', value: sub.description || '' });
    const events = eventBoxes(`edit-${sub.id}`, sub.events);
    const save = h('button', { type: 'submit', class: 'primary' }, 'Save');
    const form = h('form', { class: 'card', novalidate: true, 'aria-labelledby': 'h-edit' },
      h('h2', { id: 'h-edit' }, 'Settings'),
      field('URL', urlInput),
      events.el,
      field('Description', descInput),
      h('div', { class: 'form-actions' }, save));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      events.error(null);
      fieldError(urlInput, null);
      const chosen = events.values();
      if (!chosen.length) {
        events.error('Choose at least one.');
        return;
      }
      save.disabled = true;
      try {
        sub = await call('PATCH', path, { url: urlInput.value.trim(), events: chosen, description: descInput.value.trim() });
        renderSub();
        say('ok', 'Saved.');
      } catch (err) {
        const detail = err.problem.detail || err.message;
        if (/url/i.test(detail)) fieldError(urlInput, detail);
        else say('error', `Not saved: ${detail}`);
        save.disabled = false;
      }
    });
    const toggle = h('button', { type: 'button' }, sub.enabled ? 'Disable' : 'Enable');
    toggle.addEventListener('click', async () => {
      toggle.disabled = true;
      try {
        sub = await call('PATCH', path, { enabled: !sub.enabled });
        renderSub();
        say('ok', sub.enabled ? 'Enabled.' : 'Disabled: no deliveries are sent until it is enabled again.');
      } catch (err) {
        say('error', err.message);
        toggle.disabled = false;
      }
    });
    const rotate = h('button', { type: 'button' }, 'Rotate secret');
    rotate.addEventListener('click', async () => {
      rotate.disabled = true;
      try {
        const r = await call('POST', `${path}/rotate-secret`);
        fill(message, secretPanel('New signing secret:', r.secret,
          `The previous secret keeps signing alongside it until ${new Date(r.previous_expires_at).toLocaleString()}.`));
      } catch (err) {
        say('error', err.message);
      } finally {
        rotate.disabled = false;
      }
    });
    const del = h('button', { type: 'button', class: 'danger' }, 'Delete');
    let armed = false;
    del.addEventListener('click', async () => {
      if (!armed) {
        armed = true;
        del.textContent = 'Really delete?';
        return;
      }
      del.disabled = true;
      try {
        await call('DELETE', path);
        ctx.navigate('#/webhooks');
      } catch (err) {
        say('error', err.message);
        del.disabled = false;
      }
    });
    fill(actionsBox, h('div', { class: 'actions spaced' }, toggle, rotate, del),
      sub.disabled_reason ? notice('error', `Disabled by the dispatcher: ${sub.disabled_reason}`) : null);
    fill(settings, form);
  }

  async function loadDeliveries() {
    try {
      const q = new URLSearchParams({ limit: '25' });
      if (cursor) q.set('cursor', cursor);
      const page = await call('GET', `${path}/deliveries?${q}`);
      if (!alive) return;
      // Unchanged: leave the table (and what the reader opened in it) alone.
      const seen = JSON.stringify(page);
      if (seen === shown) return;
      shown = seen;
      const open = new Set([...deliveriesBox.querySelectorAll('details[open]')].map((el) => el.dataset.key));
      const rows = page.deliveries.map((d) => h('tr', { 'data-delivery-id': d.id, 'data-state': d.state },
        h('td', {}, d.event_type, h('div', { class: 'mono muted' }, d.id)),
        h('td', {}, badge(d.state, { 'data-testid': 'delivery-state' })),
        h('td', { class: 'wide-only' }, time(d.created_at),
          d.next_attempt_at ? h('div', { class: 'muted' }, 'next: ', time(d.next_attempt_at)) : null),
        h('td', {}, attemptsList(d),
          h('details', { 'data-key': `${d.id}/payload` }, h('summary', {}, 'Payload'), h('pre', { class: 'output' }, json(d.payload)))),
        h('td', {}, retryButton(d))));
      fill(deliveriesBox, rows.length ? null : notice('info', 'No deliveries yet.'),
        table('deliveries-table', ['Event', 'State', h('th', { scope: 'col', class: 'wide-only' }, 'Created'), 'Attempts', ''], rows, 'Deliveries, newest first'));
      for (const el of deliveriesBox.querySelectorAll('details')) {
        if (open.has(el.dataset.key)) el.open = true;
      }
      fill(pager,
        cursor ? h('button', { type: 'button', class: 'quiet', onclick: () => { cursor = null; loadDeliveries(); } }, '← Newest') : null,
        page.next_cursor ? h('button', { type: 'button', class: 'quiet', onclick: () => { cursor = page.next_cursor; loadDeliveries(); } }, 'Older →') : null);
    } catch (e) {
      if (alive) fill(deliveriesBox, notice('error', `The deliveries could not be loaded: ${e.message}`));
    }
  }

  function retryButton(d) {
    const b = h('button', { type: 'button', class: 'quiet', 'data-testid': 'retry-delivery' }, 'Retry');
    b.addEventListener('click', async () => {
      b.disabled = true;
      try {
        await call('POST', `${path}/deliveries/${encodeURIComponent(d.id)}/retry`);
        say('ok', `Delivery ${d.id} is being sent again.`);
        loadDeliveries();
      } catch (err) {
        say('error', `Not retried: ${err.message}`);
        b.disabled = false;
      }
    });
    return b;
  }

  call('GET', path).then((s) => {
    if (!alive) return;
    sub = s;
    renderSub();
    loadDeliveries();
  }).catch((e) => {
    if (alive) fill(message, notice('error', e.status === 404 ? 'No such subscription.' : e.message));
  });
  // Deliveries move on by themselves (attempts, retries): read them again now and then, while
  // the newest page is shown.
  const ticker = setInterval(() => {
    if (sub && !cursor && document.visibilityState === 'visible') loadDeliveries();
  }, 3000);
  return () => {
    alive = false;
    clearInterval(ticker);
  };
}
