// One job: its steps as a checklist, the live log of what the agent does (replayed from the
// start, then followed until the job ends), result, cost and usage, error, trigger, status
// history and attempts; cancel and run again.

import { call, follow } from './api.js';
import {
  h, fill, append, badge, time, duration, between, shortId, json, table, notice, outLink, TERMINAL,
} from './dom.js';

const CANCELLABLE = new Set(['queued', 'running', 'awaiting_approval']);

function dl(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== '')
    .map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

/** A web page for what triggered the job: the comment, else the pull request or repository. */
function triggerLink(t) {
  const extra = t.extra || {};
  for (const k of ['comment_url', 'html_url', 'url']) {
    if (extra[k] && outLink(extra[k]) instanceof Node) return outLink(extra[k], 'open');
  }
  const clone = extra.clone_url;
  if (!clone || !/^https?:\/\//.test(clone)) return null;
  const repo = clone.replace(/\.git$/, '');
  if (!t.pr) return outLink(repo, 'open');
  const path = { gitlab: `/-/merge_requests/${t.pr}`, bitbucket: `/pull-requests/${t.pr}` }[t.source] || `/pull/${t.pr}`;
  return outLink(repo + path, 'open');
}

function usageText(u) {
  if (!u) return null;
  const bits = [`${u.input_tokens || 0} in`, `${u.output_tokens || 0} out`];
  if (u.cache_read_input_tokens) bits.push(`${u.cache_read_input_tokens} cache read`);
  if (u.cache_creation_input_tokens) bits.push(`${u.cache_creation_input_tokens} cache write`);
  return `${bits.join(', ')} tokens`;
}

function cost(c) {
  return typeof c === 'number' ? `$${c.toFixed(4)}` : null;
}

/** One log entry for one job event (agent output, steps, statuses, engine lines). */
function logEntry(ev) {
  const d = ev.data;
  const at = d.at ? new Date(d.at) : null;
  const stamp = h('span', { class: 'log-time' }, at ? at.toLocaleTimeString() : '');
  const entry = (kind, label, ...body) => h('li', { class: `log-entry log-${kind}`, 'data-seq': d.seq },
    stamp, h('span', { class: 'log-kind' }, label), h('div', { class: 'log-body' }, ...body));
  switch (d.kind) {
    case 'status':
      return entry('status', 'status', `${d.from || 'new'} → `, badge(d.to),
        d.attempt ? ` (attempt ${d.attempt})` : '', d.reason ? ` — ${d.reason}` : '',
        d.error ? ` — ${d.error.kind}: ${d.error.message}` : '');
    case 'step_started':
      return entry('step', 'step', `${d.step} started on ${d.agent}`);
    case 'step_finished':
      return entry(d.ok ? 'step' : 'error', 'step',
        `${d.step} ${d.ok ? 'finished' : 'failed'} after ${duration(d.duration_ms)}`,
        d.error ? ` — ${d.error.kind}: ${d.error.message}` : '');
    case 'output_truncated':
      return entry('warn', 'output', `output beyond ${d.limit_bytes} bytes was dropped (step ${d.step})`);
    case 'log':
      return entry(d.level === 'error' ? 'error' : 'engine', d.level || 'log', d.message);
    case 'agent': {
      const a = d.event || {};
      switch (a.type) {
        case 'text':
          return entry('text', 'text', h('pre', {}, a.text));
        case 'tool_use':
          return entry('tool', 'tool use', h('span', { class: 'mono' }, a.name),
            h('pre', {}, json(a.input)));
        case 'tool_result':
          return entry(a.is_error ? 'error' : 'tool', a.is_error ? 'tool error' : 'tool result',
            h('pre', {}, json(a.content)));
        case 'log':
          return entry(a.stream === 'stderr' ? 'stderr' : 'stdout', a.stream || 'out', h('pre', {}, a.line));
        case 'usage':
          return entry('usage', 'usage', [cost(a.cost_usd), usageText(a.usage)].filter(Boolean).join(' · '));
        case 'init':
          return entry('engine', 'session',
            ['started', a.session_id ? `session ${a.session_id}` : null, a.model ? `model ${a.model}` : null]
              .filter(Boolean).join(', '));
        default:
          return entry('engine', a.type || 'agent', h('pre', {}, json(a.value !== undefined ? a.value : a)));
      }
    }
    default:
      return entry('engine', d.kind || ev.event, h('pre', {}, json(d)));
  }
}

export function renderJob(ctx, id) {
  const { main, session, setLive } = ctx;
  let job = null;
  let stopped = false;
  let stream = null;
  const steps = new Map(); // name -> {state, ms}
  const history = [];

  const statusBadge = h('span', { class: 'status-slot' });
  const actions = h('div', { class: 'actions' });
  const actionMessage = h('div', { class: 'action-message' });
  const facts = h('div', {});
  const checklist = h('ol', { class: 'checklist', 'aria-label': 'Steps' });
  const resultBox = h('div', {});
  const triggerBox = h('div', {});
  const paramsBox = h('div', {});
  const historyBox = h('div', {});
  const log = h('ol', { class: 'log', 'data-testid': 'job-log', role: 'log', 'aria-label': 'Live log', tabindex: '0' });
  const logState = h('span', { class: 'muted' }, 'connecting…');
  const follow_ = h('input', { type: 'checkbox', id: 'log-follow', checked: true });

  fill(main,
    h('p', { class: 'crumbs' }, h('a', { href: '#/jobs' }, '← Jobs')),
    h('div', { class: 'page-head' },
      h('h1', {}, h('span', { class: 'wf-name' }, '…'), ' ', h('span', { class: 'mono muted', title: id }, shortId(id))),
      statusBadge, actions),
    actionMessage,
    h('div', { class: 'job-grid' },
      h('section', { class: 'card', 'aria-labelledby': 'h-overview' }, h('h2', { id: 'h-overview' }, 'Overview'), facts),
      h('section', { class: 'card', 'aria-labelledby': 'h-steps' }, h('h2', { id: 'h-steps' }, 'Steps'), checklist)),
    h('section', { class: 'card', 'aria-labelledby': 'h-log' },
      h('div', { class: 'section-head' }, h('h2', { id: 'h-log' }, 'Log'), logState,
        h('label', { class: 'follow' }, follow_, ' follow')),
      log),
    h('section', { class: 'card', 'aria-labelledby': 'h-result' }, h('h2', { id: 'h-result' }, 'Result'), resultBox),
    h('div', { class: 'job-grid' },
      h('section', { class: 'card', 'aria-labelledby': 'h-trigger' }, h('h2', { id: 'h-trigger' }, 'Trigger'), triggerBox),
      h('section', { class: 'card', 'aria-labelledby': 'h-params' }, h('h2', { id: 'h-params' }, 'Parameters'), paramsBox)),
    h('section', { class: 'card', 'aria-labelledby': 'h-history' }, h('h2', { id: 'h-history' }, 'Status history'), historyBox));

  function renderSteps() {
    const names = job ? [...job.progress.completed, ...job.progress.in_progress, ...job.progress.pending] : [];
    for (const n of steps.keys()) if (!names.includes(n)) names.push(n);
    fill(checklist, names.map((n) => {
      let state = 'pending';
      if (job && job.progress.completed.includes(n)) state = 'done';
      if (job && job.progress.in_progress.includes(n)) state = 'running';
      const s = steps.get(n);
      if (s) state = s.state;
      if (state === 'running' && job && TERMINAL.has(job.status)) state = 'stopped';
      const label = { done: 'done', running: 'running', pending: 'pending', failed: 'failed', stopped: 'stopped' }[state];
      return h('li', { class: `step step-${state}`, 'data-step': n },
        h('span', { class: 'step-mark', 'aria-hidden': 'true' }),
        h('span', { class: 'step-name' }, n),
        h('span', { class: 'sr-only' }, ` (${label})`),
        s && s.ms !== undefined ? h('span', { class: 'muted' }, ` ${duration(s.ms)}`) : null);
    }));
  }

  function renderHistory() {
    if (!history.length) {
      fill(historyBox, h('p', { class: 'muted' }, 'No changes yet.'));
      return;
    }
    fill(historyBox, table('status-history', ['When', 'Change', 'Attempt', 'Why'],
      history.map((d) => h('tr', {},
        h('td', {}, time(d.at)),
        h('td', {}, d.from ? [badge(d.from), ' → '] : 'created → ', badge(d.to)),
        h('td', { class: 'num' }, String(d.attempt)),
        h('td', {}, [d.reason, d.error ? `${d.error.kind}: ${d.error.message}` : null].filter(Boolean).join(' — ')))),
      'Status history'));
  }

  function renderActions() {
    actions.replaceChildren();
    if (!job) return;
    if (session.can('cancel') && CANCELLABLE.has(job.status)) {
      const b = h('button', { type: 'button', class: 'danger', 'data-testid': 'cancel-job' }, 'Cancel');
      b.addEventListener('click', async () => {
        b.disabled = true;
        b.textContent = 'Cancelling…';
        actionMessage.replaceChildren();
        try {
          const answer = await call('POST', `workflows/${encodeURIComponent(id)}/cancel`);
          job.status = answer.status;
          statusBadge.replaceChildren(badge(answer.status, { 'data-testid': 'job-status' }));
          refresh();
        } catch (e) {
          fill(actionMessage, notice('error', `Not cancelled: ${e.message}`));
          refresh();
        }
      });
      actions.append(b);
    }
    if (session.can('approve') && job.status === 'awaiting_approval' && job.approval) {
      // The time is an element: a child of its own, never inside a template string.
      actions.append(h('span', { class: 'muted', 'data-testid': 'approval-step' },
        `Waiting for approval of step “${job.approval.step}” `,
        job.approval.expires_at ? ['until ', time(job.approval.expires_at)] : 'without a deadline'));
      for (const [verb, label, cls] of [['approve', 'Approve', ''], ['reject', 'Reject', 'danger']]) {
        const b = h('button', { type: 'button', class: cls, 'data-testid': `${verb}-job` }, label);
        b.addEventListener('click', async () => {
          b.disabled = true;
          actionMessage.replaceChildren();
          try {
            const answer = await call('POST', `workflows/${encodeURIComponent(id)}/${verb}`);
            job.status = answer.status;
            statusBadge.replaceChildren(badge(answer.status, { 'data-testid': 'job-status' }));
            refresh();
          } catch (e) {
            fill(actionMessage, notice('error', `Not ${verb}d: ${e.message}`));
            refresh();
          }
        });
        actions.append(b);
      }
    }
    if (session.can('trigger')) {
      const again = h('button', { type: 'button', 'data-testid': 'run-again' }, 'Run again');
      again.addEventListener('click', async () => {
        again.disabled = true;
        actionMessage.replaceChildren();
        const body = { workflow: job.workflow, params: job.params, project_path: job.project_path, priority: job.priority };
        if (job.guidance) body.guidance = job.guidance;
        try {
          const accepted = await call('POST', 'workflows/trigger', body);
          ctx.navigate(`#/jobs/${encodeURIComponent(accepted.job_id)}`);
        } catch (e) {
          again.disabled = false;
          fill(actionMessage, notice('error', `Not started: ${e.message}`));
        }
      });
      actions.append(again);
    }
  }

  function renderJobDoc() {
    main.querySelector('.wf-name').textContent = job.workflow;
    document.title = `aiwg — ${job.workflow} ${shortId(job.job_id)}`;
    statusBadge.replaceChildren(badge(job.status, { 'data-testid': 'job-status' }));
    renderActions();
    fill(facts, dl([
      ['Status', job.status],
      ['Attempt', `${job.attempt} of ${job.max_attempts}${job.dead_letter ? ' (dead letter)' : ''}`],
      ['Created', time(job.created_at)],
      ['Started', job.started_at ? time(job.started_at) : null],
      ['Finished', job.finished_at ? time(job.finished_at) : null],
      ['Duration', job.started_at ? between(job.started_at, job.finished_at) : null],
      ['Project', h('span', { class: 'mono' }, job.project_path)],
      ['Priority', String(job.priority)],
      ['Job id', h('span', { class: 'mono' }, job.job_id)],
    ]));
    renderSteps();
    const r = job.result;
    const parts = [];
    if (job.error) {
      parts.push(notice('error', h('strong', {}, job.error.kind), ': ', job.error.message));
    }
    if (r) {
      parts.push(dl([
        ['Cost', cost(r.cost_usd)],
        ['Usage', usageText(r.usage)],
        ['Session', r.session_id ? h('span', { class: 'mono' }, r.session_id) : null],
      ]));
      parts.push(h('h3', {}, 'Summary'), h('pre', { class: 'output', 'data-testid': 'job-result' }, r.summary || ''));
      if (r.steps && r.steps.length > 1) {
        parts.push(h('h3', {}, 'Steps'), table('step-results', ['Step', 'Agent', 'Exit', 'Duration', 'Cost'],
          r.steps.map((s) => h('tr', {},
            h('td', {}, s.name), h('td', {}, s.agent),
            h('td', { class: 'num' }, s.exit_code === null || s.exit_code === undefined ? '—' : String(s.exit_code)),
            h('td', { class: 'num' }, duration(s.duration_ms)), h('td', { class: 'num' }, cost(s.cost_usd) || '—'))),
          'Step results'));
      }
    }
    if (!parts.length) parts.push(h('p', { class: 'muted' }, TERMINAL.has(job.status) ? 'No result.' : 'Not finished yet.'));
    fill(resultBox, parts);
    const t = job.trigger || {};
    const extra = Object.entries(t.extra || {});
    fill(triggerBox, dl([
      ['Source', t.source],
      ['Actor', t.actor],
      ['Repository', t.repo],
      ['Pull request', t.pr !== undefined && t.pr !== null ? `#${t.pr}` : null],
      ['Issue', t.issue !== undefined && t.issue !== null ? `#${t.issue}` : null],
      ['Delivery', t.delivery_id ? h('span', { class: 'mono' }, t.delivery_id) : null],
      ['Link', triggerLink(t)],
    ]), extra.length ? h('details', {}, h('summary', {}, 'More'), dl(extra.map(([k, v]) => [k, v]))) : null);
    const params = Object.entries(job.params || {});
    fill(paramsBox,
      params.length ? dl(params.map(([k, v]) => [k, h('span', { class: 'mono' }, v)])) : h('p', { class: 'muted' }, 'No parameters.'),
      job.guidance ? [h('h3', {}, 'Guidance'), h('pre', { class: 'output' }, job.guidance)] : null);
  }

  let readFailed = false; // the last read failed and said so in actionMessage
  let refreshing = null;
  let again = false;
  async function refresh() {
    if (refreshing) {
      again = true;
      return refreshing;
    }
    refreshing = (async () => {
      do {
        again = false;
        try {
          job = await call('GET', `workflows/${encodeURIComponent(id)}/status`);
          if (readFailed) {
            readFailed = false;
            actionMessage.replaceChildren();
          }
          if (!stopped) renderJobDoc();
        } catch (e) {
          if (stopped) return;
          if (e.status === 404) {
            fill(main, h('p', { class: 'crumbs' }, h('a', { href: '#/jobs' }, '← Jobs')),
              notice('error', 'No such job (it may have been purged).'));
            stopped = true;
            if (stream) stream.stop();
            return;
          }
          // Busy (429), restarting, a lost connection: the log goes on, and the next status
          // event (or the button) reads the job again.
          const retry = h('button', { type: 'button', class: 'quiet', 'data-testid': 'reload-job' }, 'Try again');
          retry.addEventListener('click', () => { actionMessage.replaceChildren(); refresh(); });
          fill(actionMessage, notice('error', `The job could not be read just now: ${e.message}`), retry);
          readFailed = true;
          // An event that came meanwhile (`again`) reads it once more.
        }
      } while (again && !stopped);
    })();
    try {
      await refreshing;
    } finally {
      refreshing = null;
    }
  }

  function onEvent(ev) {
    const d = ev.data;
    if (!d || typeof d !== 'object') return;
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    append(log, logEntry(ev));
    if (follow_.checked && atBottom) log.scrollTop = log.scrollHeight;
    if (d.kind === 'step_started') steps.set(d.step, { state: 'running' });
    if (d.kind === 'step_finished') steps.set(d.step, { state: d.ok ? 'done' : 'failed', ms: d.duration_ms });
    if (d.kind === 'status') {
      if (d.to === 'queued' && d.from) {
        // A retry starts the steps again.
        steps.clear();
      }
      history.push(d);
      renderHistory();
      if (job) {
        job.status = d.to;
        statusBadge.replaceChildren(badge(d.to, { 'data-testid': 'job-status' }));
        renderActions();
      }
      refresh();
    }
    if (job) renderSteps();
  }

  renderHistory();
  refresh();
  stream = follow(`workflows/${encodeURIComponent(id)}/events`, {
    onEvent,
    onState: (s) => {
      setLive(s);
      logState.textContent = { live: 'live', reconnecting: 'reconnecting…', closed: 'ended' }[s] || s;
    },
    endOn: (ev) => ev.event === 'status' && ev.data && TERMINAL.has(ev.data.to),
  });
  return () => {
    stopped = true;
    stream.stop();
  };
}
