// The server's state: queue figures, workers busy, agents with health and circuit state,
// pending deliveries, uptime and version; read again every few seconds.

import { call } from './api.js';
import { h, fill, duration, table, notice, badge } from './dom.js';

function figure(label, value, testid) {
  return h('div', { class: 'figure card', 'data-testid': testid },
    h('div', { class: 'figure-value' }, String(value)), h('div', { class: 'figure-label' }, label));
}

export function renderStatus(ctx) {
  const { main } = ctx;
  const box = h('div', {});
  const stamp = h('p', { class: 'muted' });
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Status')), box, stamp);
  let alive = true;
  let reading = false;
  async function load() {
    // A slow answer (each agent's health check) is not asked for again while it is awaited.
    if (reading) return;
    reading = true;
    try {
      const s = await call('GET', 'status');
      if (!alive) return;
      const q = s.queue;
      fill(box,
        h('div', { class: 'figures' },
          figure('queued', q.queued, 'status-queued'),
          figure('running', q.running, 'status-running'),
          figure(`workers busy of ${q.workers}`, q.busy, 'status-busy'),
          figure('pending deliveries', s.pending_deliveries, 'status-deliveries')),
        h('section', { class: 'card', 'aria-labelledby': 'h-agents' },
          h('h2', { id: 'h-agents' }, 'Agents'),
          table('agents-table', ['Agent', 'Kind', 'Health', 'Circuit', 'Detail'],
            s.agents.map((a) => h('tr', { 'data-agent': a.name },
              h('td', {}, a.name),
              h('td', {}, a.kind),
              h('td', {}, badge(a.healthy ? 'healthy' : 'unhealthy')),
              h('td', {}, a.circuit ? badge(a.circuit) : '—',
                a.backends && a.backends.length ? h('ul', { class: 'backends' }, a.backends.map((b) => h('li', {},
                  `${b.name}: `, badge(b.healthy ? 'healthy' : 'unhealthy'), ' ', badge(b.circuit)))) : null),
              h('td', {}, a.detail || ''))),
            'Agents')),
        h('section', { class: 'card', 'aria-labelledby': 'h-server' },
          h('h2', { id: 'h-server' }, 'Server'),
          h('dl', { class: 'facts' },
            h('dt', {}, 'Version'), h('dd', { 'data-testid': 'status-version' }, s.version),
            h('dt', {}, 'Uptime'), h('dd', {}, duration(s.uptime_secs * 1000)))));
      stamp.textContent = `Read at ${new Date().toLocaleTimeString()}; read again every 5 s.`;
    } catch (e) {
      if (alive) fill(box, notice('error', `The status could not be read: ${e.message}`));
    } finally {
      reading = false;
    }
  }
  load();
  const ticker = setInterval(() => {
    if (document.visibilityState === 'visible') load();
  }, 5000);
  return () => {
    alive = false;
    clearInterval(ticker);
  };
}
