// Workflows: each with its description, steps and parameters, and a form that triggers one
// (parameters checked as they are typed, with the server's word as the last one).

import { call } from './api.js';
import { h, fill, notice, field, fieldError } from './dom.js';

const DEFAULT_MAX_LENGTH = 1024;
const encoder = new TextEncoder();

/** What is wrong with a parameter's value (as the server will judge it), or null. */
function checkParam(p, value) {
  if (value === '') return p.required && (p.default === null || p.default === undefined) ? 'Required.' : null;
  const max = p.max_length || DEFAULT_MAX_LENGTH;
  if (encoder.encode(value).length > max) return `At most ${max} bytes.`;
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u0008\u000b-\u001f\u007f]/.test(value)) return 'No control characters.';
  if (p.choices && p.choices.length && !p.choices.includes(value)) return `One of: ${p.choices.join(', ')}.`;
  if (p.pattern) {
    let re = null;
    try {
      re = new RegExp(`^(?:${p.pattern})$`, 'u');
    } catch {
      re = null; // A pattern JavaScript cannot read: the server decides.
    }
    if (re && !re.test(value)) return `Must match ${p.pattern}.`;
  } else if (value.startsWith('-')) {
    return 'May not start with “-”.';
  }
  return null;
}

function card(w, selected) {
  return h('article', { class: `card wf-card${selected ? ' selected' : ''}`, 'aria-current': selected ? 'true' : null },
    h('h2', {}, h('a', { href: `#/workflows/${encodeURIComponent(w.name)}` }, w.name)),
    w.description ? h('p', {}, w.description) : null,
    h('div', { class: 'wf-meta' },
      h('span', { class: 'muted' }, 'Steps: '),
      h('ol', { class: 'inline-list' }, w.steps.map((s) => h('li', {}, s)))),
    w.parameters.length ? h('div', { class: 'wf-meta' },
      h('span', { class: 'muted' }, 'Parameters: '),
      h('ul', { class: 'inline-list' }, w.parameters.map((p) => h('li', { class: 'mono', title: p.description || '' },
        p.name, p.required && (p.default === null || p.default === undefined) ? '*' : ''))))
      : null);
}

function triggerForm(ctx, workflows, w) {
  const workflowSelect = h('select', { name: 'workflow' },
    workflows.map((x) => h('option', { value: x.name, selected: x.name === w.name }, x.name)));
  workflowSelect.addEventListener('change', () => ctx.navigate(`#/workflows/${encodeURIComponent(workflowSelect.value)}`));
  const inputs = new Map();
  const paramFields = w.parameters.map((p) => {
    let control;
    if (p.choices && p.choices.length) {
      control = h('select', { name: p.name },
        p.required && !p.default ? h('option', { value: '' }, '— choose —') : null,
        !p.required && !p.default ? h('option', { value: '' }, '(none)') : null,
        p.choices.map((c) => h('option', { value: c, selected: c === p.default }, c)));
    } else {
      control = h('input', {
        type: 'text', name: p.name, autocomplete: 'off', spellcheck: 'false',
        placeholder: p.default !== null && p.default !== undefined ? p.default : '',
        maxlength: String(p.max_length || DEFAULT_MAX_LENGTH),
        required: p.required && (p.default === null || p.default === undefined),
      });
    }
    inputs.set(p.name, { p, control });
    const check = () => fieldError(control, checkParam(p, control.value));
    control.addEventListener('input', check);
    control.addEventListener('blur', check);
    const hints = [p.description,
      p.default !== null && p.default !== undefined ? `Default: ${p.default}` : null,
      p.pattern ? `Pattern: ${p.pattern}` : null].filter(Boolean).join(' · ');
    return field(p.required && (p.default === null || p.default === undefined) ? `${p.name} (required)` : p.name, control, hints || null);
  });
  const guidance = h('textarea', { name: 'guidance', rows: '4', spellcheck: 'true' });
  const project = h('input', { type: 'text', name: 'project_path', autocomplete: 'off', spellcheck: 'false' });
  const submit = h('button', { type: 'submit', class: 'primary', 'data-testid': 'trigger-submit' }, `Run ${w.name}`);
  const status = h('div', { class: 'form-status' });
  const form = h('form', { class: 'card trigger-form', 'data-testid': 'trigger-form', novalidate: true, 'aria-labelledby': 'h-trigger' },
    h('h2', { id: 'h-trigger' }, 'Run a workflow'),
    field('Workflow', workflowSelect, w.description || null),
    paramFields,
    field('Guidance', guidance, 'Free text for the agent (the template’s {{guidance}}).'),
    field('Project', project, 'A folder inside the project root (absolute, or relative to it); empty for the default.'),
    h('div', { class: 'form-actions' }, submit),
    status);

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    status.replaceChildren();
    let first = null;
    const params = {};
    for (const { p, control } of inputs.values()) {
      const err = checkParam(p, control.value);
      fieldError(control, err);
      if (err && !first) first = control;
      if (control.value !== '') params[p.name] = control.value;
    }
    if (first) {
      first.focus();
      return;
    }
    const body = { workflow: w.name, params };
    if (guidance.value.trim()) body.guidance = guidance.value;
    if (project.value.trim()) body.project_path = project.value.trim();
    submit.disabled = true;
    try {
      const accepted = await call('POST', 'workflows/trigger', body);
      ctx.navigate(`#/jobs/${encodeURIComponent(accepted.job_id)}`);
    } catch (err) {
      submit.disabled = false;
      const detail = err.problem.detail || err.message;
      const slug = String(err.problem.type || '').split(':').pop();
      const named = /`([^`]+)`/.exec(detail);
      if (slug === 'invalid-params' && named && inputs.has(named[1])) {
        const { control } = inputs.get(named[1]);
        fieldError(control, detail);
        control.focus();
      } else if (slug === 'invalid-project' || slug === 'project-forbidden') {
        fieldError(project, detail);
        project.focus();
      } else {
        status.append(notice('error', `Not started: ${detail}`));
      }
    }
  });
  return form;
}

export function renderWorkflows(ctx, name) {
  const { main, session } = ctx;
  const message = h('div', {});
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Workflows')), message);
  let alive = true;
  call('GET', 'workflows/available').then((list) => {
    if (!alive) return;
    const workflows = list.workflows;
    if (!workflows.length) {
      fill(message, notice('info', 'No workflows are configured.'));
      return;
    }
    const chosen = workflows.find((w) => w.name === name) || workflows[0];
    if (name && chosen.name !== name) {
      message.append(notice('error', `No workflow “${name}”.`));
    }
    const side = session.can('trigger')
      ? triggerForm(ctx, workflows, chosen)
      : notice('info', 'This key cannot start jobs (it lacks the “trigger” scope).');
    main.append(h('div', { class: 'wf-layout' },
      h('div', { class: 'wf-list' }, workflows.map((w) => card(w, w === chosen))),
      h('div', { class: 'wf-form' }, side)));
  }).catch((e) => {
    if (alive) fill(message, notice('error', `The workflows could not be loaded: ${e.message}`));
  });
  return () => { alive = false; };
}
