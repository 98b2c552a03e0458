// DOM helpers. Every piece of data goes into the page as text (text nodes, textContent,
// attribute values): nothing here parses a string as markup, and the page's Trusted Types
// policy makes the browser refuse it anyway.

/** Builds an element: h('a', {href: '#/x', class: 'c'}, 'text', child, ...). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = String(v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked' || k === 'selected' || k === 'disabled' || k === 'required') el[k] = Boolean(v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

/** Appends children (nested arrays too): nodes as they are, anything else as text. */
export function append(el, ...children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** Replaces an element's content. */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** A URL that may become a link: http or https only (never javascript: or data:). */
export function safeUrl(text) {
  if (typeof text !== 'string') return null;
  try {
    const u = new URL(text);
    return u.protocol === 'https:' || u.protocol === 'http:' ? u.href : null;
  } catch {
    return null;
  }
}

/** A link to an outside page, opened apart and told nothing about this one. */
export function outLink(url, label) {
  const href = safeUrl(url);
  if (!href) return label === undefined ? String(url) : label;
  return h('a', { href, target: '_blank', rel: 'noopener noreferrer' }, label === undefined ? href : label);
}

const STATUS_LABELS = {
  queued: 'queued', running: 'running', awaiting_approval: 'awaiting approval',
  completed: 'completed', failed: 'failed', cancelled: 'cancelled', timed_out: 'timed out',
};
export const STATUSES = Object.keys(STATUS_LABELS);
export const TERMINAL = new Set(['completed', 'failed', 'cancelled', 'timed_out']);

/** A status badge; the text is the status's wire name, so tests and people read the same. */
export function badge(status, attrs) {
  const s = String(status);
  return h('span', { class: `badge s-${s.replace(/[^a-z_]/g, '')}`, title: STATUS_LABELS[s] || s, ...attrs }, s);
}

/** `2024-05-01T10:00:00Z` as local time, with the exact instant as a tooltip. */
export function time(iso) {
  if (!iso) return h('span', { class: 'muted' }, '—');
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return h('time', { datetime: d.toISOString(), title: d.toISOString() }, d.toLocaleString());
}

/** A duration in ms as `1.2 s`, `3 min 4 s`, `2 h 5 min`. */
export function duration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '—';
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  const hrs = Math.floor(m / 60);
  if (hrs < 48) return `${hrs} h ${m - hrs * 60} min`;
  return `${Math.floor(hrs / 24)} d ${hrs % 24} h`;
}

/** Between two instants (the second defaulting to now). */
export function between(from, to) {
  if (!from) return '—';
  const a = new Date(from).getTime();
  const b = to ? new Date(to).getTime() : Date.now();
  return duration(b - a);
}

/** A short form of a job id (the end of a UUID v7 is its random part). */
export function shortId(id) {
  return String(id).slice(-12);
}

/** A value as JSON text, pretty. */
export function json(v) {
  try {
    return typeof v === 'string' ? v : JSON.stringify(v, null, 2);
  } catch {
    return String(v);
  }
}

/** A table with a header row; `rows` are arrays of cells or <tr> elements. */
export function table(testid, headers, rows, caption) {
  return h('div', { class: 'table-wrap' },
    h('table', { 'data-testid': testid },
      caption ? h('caption', { class: 'sr-only' }, caption) : null,
      h('thead', {}, h('tr', {}, headers.map((x) => (x instanceof Node ? x : h('th', { scope: 'col' }, x))))),
      h('tbody', {}, rows)));
}

/** A message in a box: kind is `error`, `info` or `ok`. */
export function notice(kind, ...content) {
  return h('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, ...content);
}

/** A labelled form field. */
export function field(label, control, hint, error) {
  const id = control.id || `f-${Math.random().toString(36).slice(2)}`;
  control.id = id;
  const hintEl = hint ? h('div', { class: 'hint', id: `${id}-hint` }, hint) : null;
  const errEl = h('div', { class: 'field-error', id: `${id}-error`, role: 'alert', hidden: !error }, error || '');
  const described = [hintEl ? `${id}-hint` : null, `${id}-error`].filter(Boolean).join(' ');
  control.setAttribute('aria-describedby', described);
  return h('div', { class: 'field' }, h('label', { for: id }, label), control, hintEl, errEl);
}

/** Shows or clears a field's error (see `field`). */
export function fieldError(control, message) {
  const el = document.getElementById(`${control.id}-error`);
  if (!el) return;
  el.textContent = message || '';
  el.hidden = !message;
  control.setAttribute('aria-invalid', message ? 'true' : 'false');
}
