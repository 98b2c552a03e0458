// The API client: the operator's key (kept in this tab's sessionStorage only), JSON calls, and
// server-sent event streams read with fetch(), so the key travels in the Authorization header
// and never in a URL. Streams reconnect after a lost connection with Last-Event-ID.

const KEY = 'aiwg.key';

/** The API's root: the page lives at `<mount>/ui/`, the API at `<mount>/`. */
export const apiBase = new URL('../', document.baseURI);

/** An error answer of the API (a problem document), or a network failure (status 0). */
export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

let unauthorizedHandler = () => {};

/** Called when the API refuses the key (401): a wrong or revoked key. */
export function onUnauthorized(fn) {
  unauthorizedHandler = fn;
}

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY);
}

/** What the key may do: `admin` implies every scope. */
export class Session {
  constructor(info) {
    this.name = info.name;
    this.scopes = new Set(info.scopes || []);
  }

  can(scope) {
    return this.scopes.has('admin') || this.scopes.has(scope);
  }
}

function url(path) {
  return new URL(path.replace(/^\//, ''), apiBase);
}

async function problemOf(res) {
  try {
    const ct = res.headers.get('content-type') || '';
    if (ct.includes('json')) return await res.json();
    return { detail: await res.text() };
  } catch {
    return {};
  }
}

/**
 * Calls the API: `call('GET', 'jobs?limit=20')`, `call('POST', 'workflows/trigger', body)`.
 * Resolves to the JSON answer (null for an empty one); rejects with an ApiError.
 */
export async function call(method, path, body, { key = getKey(), signal } = {}) {
  const headers = { Accept: 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers, cache: 'no-store', signal, credentials: 'omit' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(url(path), init);
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    throw new ApiError(0, { title: 'Network error', detail: 'The server cannot be reached.' });
  }
  if (!res.ok) {
    const problem = await problemOf(res);
    const err = new ApiError(res.status, problem);
    if (res.status === 401 && key === getKey()) unauthorizedHandler(err);
    throw err;
  }
  if (res.status === 204) return null;
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

/** Checks a key (`GET /whoami`) without storing it. */
export async function whoami(key) {
  return new Session(await call('GET', 'whoami', undefined, { key }));
}

/**
 * Follows a server-sent event stream until `stop()` (or, with `endOn`, until an event for
 * which it returns true has been handled and the server closes the stream).
 *
 * - `onEvent({id, event, data})` for each event (data parsed as JSON when it is JSON);
 * - `onState('live' | 'reconnecting' | 'closed')` as the connection comes and goes;
 * - `lastEventId`: where to start.
 *
 * A lost connection (or a stream that ends before `endOn` was met) is opened again after the
 * server's `retry:` delay (growing up to 30 s while it keeps failing), with `Last-Event-ID`
 * set to the last id received, so nothing is missed and nothing is repeated.
 */
export function follow(path, { onEvent, onState = () => {}, lastEventId = null, endOn = null }) {
  const controller = new AbortController();
  let lastId = lastEventId;
  let retry = 2000;
  let failures = 0;
  let finished = false;
  let wake = null;

  const stop = () => {
    finished = true;
    controller.abort();
    if (wake) wake();
    onState('closed');
  };

  const pause = (ms) => new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    wake = () => { clearTimeout(t); resolve(); };
  });

  async function once() {
    const headers = { Accept: 'text/event-stream', Authorization: `Bearer ${getKey()}` };
    if (lastId) headers['Last-Event-ID'] = lastId;
    const res = await fetch(url(path), {
      headers, cache: 'no-store', credentials: 'omit', signal: controller.signal,
    });
    if (!res.ok) {
      const err = new ApiError(res.status, await problemOf(res));
      if (res.status === 401) {
        unauthorizedHandler(err);
        finished = true;
      }
      throw err;
    }
    // 204: nothing follows `Last-Event-ID` and nothing will (the job has ended).
    if (res.status === 204) return true;
    onState('live');
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    let ev = { id: null, event: 'message', data: [] };
    let done = false;
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        // Cut off after the last event arrived: there is nothing to resume.
        if (done) return true;
        throw err;
      }
      if (chunk.done) break;
      buf += decoder.decode(chunk.value, { stream: true });
      let nl;
      // Lines end with \n, \r\n or \r.
      while ((nl = buf.search(/\r\n|\r|\n/)) !== -1) {
        if (buf[nl] === '\r' && nl === buf.length - 1) break; // \r\n may be split
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf.startsWith('\r\n', nl) ? 2 : 1));
        if (line === '') {
          if (ev.id !== null) lastId = ev.id;
          if (ev.data.length) {
            // An event arrived: the next pause starts short again (a stream that opens and
            // closes without one keeps backing off).
            failures = 0;
            const text = ev.data.join('\n');
            let data = text;
            try { data = JSON.parse(text); } catch { /* keep the text */ }
            const item = { id: lastId, event: ev.event, data };
            try {
              onEvent(item);
            } catch (err) {
              // A bug of the page, not of the connection: say so, and go on.
              console.error('aiwg: an event could not be shown', err);
            }
            if (endOn && endOn(item)) done = true;
          }
          ev = { id: null, event: 'message', data: [] };
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const name = colon === -1 ? line : line.slice(0, colon);
        let value = colon === -1 ? '' : line.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (name === 'data') ev.data.push(value);
        else if (name === 'event') ev.event = value;
        else if (name === 'id' && !value.includes('\0')) ev.id = value;
        else if (name === 'retry' && /^\d+$/.test(value)) retry = Number(value);
      }
    }
    return done;
  }

  (async () => {
    while (!finished) {
      try {
        if (await once()) {
          finished = true;
          onState('closed');
          return;
        }
      } catch (e) {
        if (finished || (e && e.name === 'AbortError')) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500 && e.status !== 429) {
          // Refused (bad id, no such job, scope): trying again would not help.
          finished = true;
          onState('closed');
          return;
        }
      }
      if (finished) return;
      onState('reconnecting');
      failures += 1;
      await pause(Math.min(30000, retry * Math.min(failures, 15)));
    }
  })();

  return { stop, get lastEventId() { return lastId; } };
}
