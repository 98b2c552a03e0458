// The jobs list: newest first, filtered by status and workflow, a page at a time, and kept up
// to date by GET /events (every job's status changes) without reloading.

import { call, follow } from './api.js';
import { h, fill, badge, time, between, shortId, table, notice, STATUSES, TERMINAL } from './dom.js';

const PAGE = 25;
/** Cursors of the pages before the current one (module scope: kept across re-renders). */
let pageStack = [];
let stackFilters = '';

function filtersKey(q) {
  return `${q.get('status') || ''}|${q.get('workflow') || ''}`;
}

function hashFor(status, workflow, cursor) {
  const q = new URLSearchParams();
  if (status) q.set('status', status);
  if (workflow) q.set('workflow', workflow);
  if (cursor) q.set('cursor', cursor);
  const s = q.toString();
  return s ? `#/jobs?${s}` : '#/jobs';
}

function triggerText(t) {
  if (!t) return '';
  const bits = [t.source];
  if (t.actor) bits.push(t.actor);
  if (t.repo) bits.push(t.pr ? `${t.repo}#${t.pr}` : t.repo);
  return bits.join(' · ');
}

function row(job) {
  const running = job.started_at && !job.finished_at;
  return h('tr', {
    'data-testid': 'job-row', 'data-job-id': job.job_id, 'data-status': job.status,
    'data-started': running ? job.started_at : null,
  },
    h('td', {}, h('a', { href: `#/jobs/${encodeURIComponent(job.job_id)}`, class: 'mono', title: job.job_id }, shortId(job.job_id))),
    h('td', {}, job.workflow),
    h('td', {}, badge(job.status, { 'data-testid': 'job-status' })),
    h('td', { class: 'wide-only' }, triggerText(job.trigger)),
    h('td', { class: 'wide-only' }, time(job.created_at)),
    h('td', { class: 'num dur wide-only' }, job.started_at ? between(job.started_at, job.finished_at) : '—'),
    h('td', { class: 'num wide-only' }, `${job.attempt}/${job.max_attempts}`));
}

export function renderJobs(ctx) {
  const { main, query, session, setLive } = ctx;
  const status = query.get('status') || '';
  const workflow = query.get('workflow') || '';
  const cursor = query.get('cursor') || '';
  if (filtersKey(query) !== stackFilters || !cursor) {
    stackFilters = filtersKey(query);
    if (!cursor) pageStack = [];
  }

  const statusSelect = h('select', { name: 'status', id: 'filter-status' },
    h('option', { value: '' }, 'any status'),
    STATUSES.map((s) => h('option', { value: s, selected: s === status }, s)));
  const workflowSelect = h('select', { name: 'workflow', id: 'filter-workflow' },
    h('option', { value: '' }, 'any workflow'));
  if (workflow) workflowSelect.append(h('option', { value: workflow, selected: true }, workflow));
  const applyFilters = () => {
    pageStack = [];
    ctx.navigate(hashFor(statusSelect.value, workflowSelect.value, ''));
  };
  statusSelect.addEventListener('change', applyFilters);
  workflowSelect.addEventListener('change', applyFilters);

  const tbody = h('tbody', {});
  const tableEl = table('jobs-table',
    ['Job', 'Workflow', 'Status',
      h('th', { scope: 'col', class: 'wide-only' }, 'Trigger'),
      h('th', { scope: 'col', class: 'wide-only' }, 'Created'),
      h('th', { scope: 'col', class: 'num wide-only' }, 'Duration'),
      h('th', { scope: 'col', class: 'num wide-only' }, 'Attempt')],
    [], 'Jobs, newest first');
  tableEl.querySelector('tbody').replaceWith(tbody);
  const message = h('div', { class: 'list-message' });
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });

  fill(main,
    h('div', { class: 'page-head' },
      h('h1', {}, 'Jobs'),
      session.can('trigger') ? h('a', { class: 'button primary', href: '#/workflows' }, 'Run a workflow') : null),
    h('form', { class: 'filters', role: 'search', onsubmit: (e) => e.preventDefault() },
      h('div', { class: 'field inline' }, h('label', { for: 'filter-status' }, 'Status'), statusSelect),
      h('div', { class: 'field inline' }, h('label', { for: 'filter-workflow' }, 'Workflow'), workflowSelect)),
    message, tableEl, pager);

  call('GET', 'workflows/available').then((list) => {
    for (const w of list.workflows) {
      if (w.name !== workflow) workflowSelect.append(h('option', { value: w.name }, w.name));
    }
  }).catch(() => {});

  const rows = new Map(); // job id -> {el, json}
  let loaded = false;
  let generation = 0;
  let lastLoad = 0;
  let reloadTimer = null;

  /** Puts the page's jobs in the table, touching only rows that changed. */
  function show(jobs) {
    const keep = new Set(jobs.map((j) => j.job_id));
    for (const [id, r] of rows) {
      if (!keep.has(id)) {
        r.el.remove();
        rows.delete(id);
      }
    }
    jobs.forEach((job, i) => {
      const text = JSON.stringify(job);
      let r = rows.get(job.job_id);
      if (!r || r.json !== text) {
        const el = row(job);
        if (r) r.el.replaceWith(el);
        r = { el, json: text };
        rows.set(job.job_id, r);
      }
      if (tbody.children[i] !== r.el) tbody.insertBefore(r.el, tbody.children[i] || null);
    });
  }

  async function load() {
    const mine = ++generation;
    lastLoad = Date.now();
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (status) q.set('status', status);
    if (workflow) q.set('workflow', workflow);
    if (cursor) q.set('cursor', cursor);
    try {
      const page = await call('GET', `jobs?${q}`);
      if (mine !== generation) return;
      show(page.jobs);
      message.replaceChildren();
      if (!page.jobs.length) {
        message.append(notice('info', status || workflow ? 'No jobs match these filters.' : 'No jobs yet.'));
      }
      fill(pager,
        cursor ? h('button', {
          type: 'button', class: 'quiet',
          onclick: () => ctx.navigate(hashFor(status, workflow, pageStack.pop() || '')),
        }, '← Newer') : null,
        page.next_cursor ? h('button', {
          type: 'button', class: 'quiet',
          onclick: () => { pageStack.push(cursor); ctx.navigate(hashFor(status, workflow, page.next_cursor)); },
        }, 'Older →') : null);
      loaded = true;
    } catch (e) {
      if (mine !== generation) return;
      fill(message, notice('error', `The jobs could not be loaded: ${e.message}`));
    }
  }

  /** Reads the page again soon: at most once a second, however many jobs change. */
  function reloadSoon() {
    if (reloadTimer) return;
    const wait = Math.max(0, 1000 - (Date.now() - lastLoad));
    reloadTimer = setTimeout(() => {
      reloadTimer = null;
      load();
    }, wait);
  }

  function apply(ev) {
    if (ev.event === 'reset') {
      // Events may have been missed: what the page shows is read again.
      load();
      return;
    }
    if (ev.event !== 'status' || !ev.data || !ev.data.job_id) return;
    // The row's badge at once; the rest (new jobs, times, filters) with the next read.
    const r = rows.get(ev.data.job_id);
    if (r && loaded) {
      r.el.dataset.status = ev.data.to;
      const b = r.el.querySelector('[data-testid="job-status"]');
      if (b) b.replaceWith(badge(ev.data.to, { 'data-testid': 'job-status' }));
    }
    // Read the page again only when the event can change it: a job shown on it, or one that
    // may join the newest page (a new job, or one that now has the status filtered for). A
    // busy server's every other event would cost a read a second, and the key's rate limit.
    const mayJoin = !cursor && (status ? ev.data.to === status : !ev.data.from);
    if (r || mayJoin) reloadSoon();
  }

  // The stream first, the list once it is open: whatever changes in between comes through
  // the stream, so nothing is missed. If the stream cannot open, the list shows anyway, and
  // is read again once the stream is there.
  let streaming = false;
  let shown = false;
  const stream = follow('events?kinds=status', {
    onEvent: apply,
    onState: (s) => {
      setLive(s);
      if (s === 'live' && !streaming) {
        streaming = true;
        shown = true;
        load();
      } else if (s === 'reconnecting' && !shown) {
        shown = true;
        load();
      }
    },
  });
  // Durations of running jobs move on.
  const ticker = setInterval(() => {
    for (const tr of tbody.children) {
      if (tr.dataset.started && !TERMINAL.has(tr.dataset.status)) {
        const cell = tr.querySelector('.dur');
        if (cell) cell.textContent = between(tr.dataset.started, null);
      }
    }
  }, 1000);
  return () => {
    generation += 1;
    clearInterval(ticker);
    clearTimeout(reloadTimer);
    stream.stop();
  };
}
