// The key form: the key is checked with GET /whoami, then kept in this tab's sessionStorage.

import { whoami, setKey } from './api.js';
import { h, field, notice } from './dom.js';

/** Renders the form into `main`; `done(session)` once a key is accepted. */
export function renderLogin(main, { message, done }) {
  const input = h('input', {
    type: 'password', name: 'key', autocomplete: 'off', spellcheck: 'false', required: true,
    'data-testid': 'login-key',
  });
  const submit = h('button', { type: 'submit', class: 'primary', 'data-testid': 'login-submit' }, 'Sign in');
  const status = h('div', { class: 'login-status' });
  if (message) status.append(notice('error', message));
  const form = h('form', { class: 'login card', novalidate: true },
    h('h1', {}, 'Sign in to aiwg'),
    h('p', { class: 'muted' },
      'Enter an API key, or a bearer token (JWT) from your identity provider. It is kept in this browser tab only, and forgotten when the tab closes.'),
    field('API key', input),
    submit,
    status);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    status.replaceChildren();
    if (!key) {
      status.append(notice('error', 'Enter a key.'));
      input.focus();
      return;
    }
    submit.disabled = true;
    try {
      const session = await whoami(key);
      setKey(key);
      done(session);
    } catch (err) {
      const text = err.status === 401
        ? 'This key was not accepted: it is wrong or has been revoked.'
        : err.status === 429
          ? 'Too many attempts; wait a minute and try again.'
          : `The server could not check the key: ${err.message}`;
      status.append(notice('error', text));
      input.select();
      input.focus();
    } finally {
      submit.disabled = false;
    }
  });
  main.replaceChildren(h('section', { class: 'login-wrap' }, form));
  input.focus();
}
