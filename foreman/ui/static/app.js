// foreman's live page. Everything it shows comes from foreman's API: /status and
// Ollama's /api/ps (through foreman) for the state, /events for the queue's
// transitions as they happen, /jobs for the list and a job's detail. The only
// thing it changes is a job's life, with DELETE /jobs/{id} (cancel).
'use strict';

(() => {
  const TOKEN_KEY = 'foreman.token';
  const TERMINAL = new Set(['done', 'failed', 'cancelled']);
  const KEEP_MS = 15 * 60 * 1000; // as long as foreman keeps the history it sends
  const FOREVER_MS = 100 * 365 * 24 * 3600 * 1000; // Ollama's "forever" keep_alive is ~292 years out
  // Ten categorical colours (d3's category10, one blue among them), ordered so that
  // neighbouring entries differ in hue as well as in name.
  const PALETTE = ['#1f77b4', '#d62728', '#9467bd', '#bcbd22', '#ff7f0e',
                   '#2ca02c', '#e377c2', '#17becf', '#8c564b', '#7f7f7f'];
  const SVG = 'http://www.w3.org/2000/svg';
  const TICKS = [5, 10, 15, 30, 60, 120, 180, 300].map((s) => s * 1000);

  const $ = (id) => document.getElementById(id);

  let live = false;
  let skewMs = 0; // foreman's clock minus this browser's
  let status = null;
  let ps = null;
  const seen = new Set(); // the models the timeline's legend lists
  const timeline = { runs: [], open: new Map(), loads: [], pending: null, swaps: [] };
  let following = null; // { id, controller } of the running job whose output is shown
  let jobsNext = null;
  let jobsPaged = false;
  let openJob = null; // { id, controller } of the job in the dialog

  class Unauthorized extends Error {}

  // ------------------------------------------------------------------ talking to foreman

  function headers(extra) {
    const result = Object.assign({}, extra);
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) result.Authorization = 'Bearer ' + token;
    return result;
  }

  function errorText(body, response) {
    const error = body && body.error;
    if (typeof error === 'string') return error;
    if (error && typeof error.message === 'string') return error.message;
    return response.status + ' ' + response.statusText;
  }

  async function api(path, options) {
    const opts = Object.assign({ cache: 'no-store' }, options);
    opts.headers = headers(opts.headers);
    const response = await fetch(path, opts);
    if (response.status === 401) throw new Unauthorized();
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new Error(errorText(body, response));
    return body;
  }

  // Server-Sent Events over fetch, not EventSource: EventSource cannot send the
  // token as a header, and a token must not go in the URL.
  async function follow(path, onEvent, signal) {
    const response = await fetch(path, { headers: headers({ Accept: 'text/event-stream' }), cache: 'no-store', signal });
    if (response.status === 401) throw new Unauthorized();
    if (!response.ok) throw new Error(errorText(await response.json().catch(() => null), response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) name = line.slice(6).trim();
          else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
        }
        if (!data.length) continue; // a keep-alive comment
        let parsed;
        try {
          parsed = JSON.parse(data.join('\n'));
        } catch (e) {
          continue;
        }
        onEvent(name, parsed);
      }
    }
  }

  function lostToken() {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  }

  function failed(error) {
    if (error instanceof Unauthorized) return lostToken();
    if (error && error.name === 'AbortError') return;
    say(error && error.message ? error.message : String(error));
  }

  // ------------------------------------------------------------------ small helpers

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (key.startsWith('data-') || key.startsWith('aria-')) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function now() {
    return Date.now() + skewMs;
  }

  // Ollama writes nanoseconds; keep what every Date parser reads.
  function parseTime(text) {
    if (!text) return null;
    const ms = Date.parse(String(text).replace(/(\.\d{3})\d+/, '$1'));
    return Number.isNaN(ms) ? null : ms;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return '—';
    const s = Math.max(0, seconds);
    if (s < 10) return s.toFixed(1) + ' s';
    if (s < 60) return Math.floor(s) + ' s';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + String(Math.floor(s % 60)).padStart(2, '0') + 's';
    return Math.floor(s / 3600) + 'h ' + String(Math.floor((s % 3600) / 60)).padStart(2, '0') + 'm';
  }

  function clockTime(ms) {
    return ms === null ? '—' : new Date(ms).toLocaleTimeString();
  }

  function dateTime(ms) {
    return ms === null ? '—' : new Date(ms).toLocaleString();
  }

  // A model as foreman keys it: `beta` is `beta:latest` (a tag is what follows the last colon
  // after the last slash, so `host:5000/beta` has none either); options after a space are dropped.
  function modelName(model) {
    const base = String(model).split(' ')[0];
    return base.lastIndexOf(':') > base.lastIndexOf('/') ? base : base + ':latest';
  }

  // A model's colour comes from its name alone (FNV-1a), so it is the same in every tab, after a
  // reload and on every node, whatever order models show up in.
  function colour(model) {
    if (!model) return '#555555';
    const name = modelName(model);
    let hash = 0x811c9dc5;
    for (let i = 0; i < name.length; i++) hash = Math.imul(hash ^ name.charCodeAt(i), 0x01000193) >>> 0;
    seen.add(name);
    return PALETTE[hash % PALETTE.length];
  }

  function swatch(model) {
    const mark = el('span', { class: 'swatch', 'aria-hidden': 'true' });
    mark.style.backgroundColor = colour(model);
    return mark;
  }

  function badge(text, kind) {
    return el('span', { class: 'badge ' + (kind || text), text });
  }

  // Cloud models' jobs run in a lane of their own, never waiting for the GPU.
  function cloudBadge(job) {
    return job.lane === 'cloud' ? badge('cloud', 'lane') : null;
  }

  function say(text) {
    $('message').textContent = text;
  }

  function throttled(fn, ms) {
    let timer = null;
    let last = 0;
    return () => {
      if (timer !== null) return;
      timer = setTimeout(async () => {
        timer = null;
        last = Date.now();
        try {
          await fn();
        } catch (error) {
          failed(error);
        }
      }, Math.max(0, last + ms - Date.now()));
    };
  }

  // Text of one streamed chunk, in any of the shapes Ollama streams.
  function chunkText(chunk) {
    if (!chunk || typeof chunk !== 'object') return '';
    if (chunk.message && typeof chunk.message.content === 'string') return chunk.message.content;
    if (typeof chunk.response === 'string') return chunk.response;
    if (Array.isArray(chunk.choices)) {
      return chunk.choices.map((c) => (c.delta && c.delta.content) || c.text || '').join('');
    }
    return '';
  }

  function resultText(result) {
    if (!result || typeof result !== 'object') return '';
    if (result.message && typeof result.message.content === 'string') return result.message.content;
    if (typeof result.response === 'string') return result.response;
    if (Array.isArray(result.choices)) {
      return result.choices.map((c) => (c.message && c.message.content) || c.text || '').join('');
    }
    if (Array.isArray(result.embeddings)) return '(' + result.embeddings.length + ' embeddings)';
    if (Array.isArray(result.data)) return '(' + result.data.length + ' embeddings)';
    if (Array.isArray(result.embedding)) return '(1 embedding)';
    return '';
  }

  // ------------------------------------------------------------------ the state: /status and /api/ps

  async function refreshStatus() {
    status = await api('/status');
    ps = null;
    if (status.upstream.reachable) {
      try {
        ps = await api('/api/ps');
      } catch (error) {
        if (error instanceof Unauthorized) throw error;
      }
    }
    if (live) renderState();
  }

  const refreshSoon = throttled(refreshStatus, 1000);

  function renderState() {
    renderOverview();
    renderNodes();
    renderResident();
    renderRunning();
    renderQueue();
    const known = new Set([...(status.models || []).map((m) => m.model_key), ...status.queue.map((q) => q.model)]);
    $('models').replaceChildren(...[...known].sort().map((m) => el('option', { value: m })));
  }

  function renderOverview() {
    const counts = status.jobs || {};
    const count = (state) => counts[state] || 0;
    const upstream = status.upstream;
    const items = [
      ['Ollama', el('span', {}, upstream.url + ' ', badge(upstream.reachable ? 'reachable' : 'unreachable'))],
      ['Queued', String(count('queued'))],
      ['Running', String(count('loading') + count('working'))],
      ['Done', String(count('done'))],
      ['Failed', String(count('failed'))],
      ['Cancelled', String(count('cancelled'))],
      ['Swaps since start', String(status.swaps)],
    ];
    if (status.stalls && status.stalls.total) {
      // Requests Ollama accepted and then went silent on (FOREMAN_STALL_TIMEOUT): a wedged Ollama.
      const stalls = status.stalls;
      const last = stalls.last_at ? ', last ' + clockTime(parseTime(stalls.last_at)) : '';
      items.push(['Ollama stalls', String(stalls.total) + ' (' + stalls.in_a_row + ' in a row' + last + ')']);
    }
    if (status.last_error) {
      const at = parseTime(status.last_error.at);
      items.push(['Last error', status.last_error.message + ' (' + clockTime(at) + ')']);
    }
    $('overview').replaceChildren(
      ...items.map(([term, value]) =>
        el('div', { class: 'stat', 'data-stat': term.toLowerCase().split(' ')[0] }, el('dt', { text: term }), el('dd', {}, value)),
      ),
    );
  }

  // Only a shared PostgreSQL queue has nodes; with SQLite the panel stays hidden.
  function renderNodes() {
    const nodes = status.nodes || [];
    $('nodes-panel').hidden = !nodes.length;
    $('nodes').tBodies[0].replaceChildren(
      ...nodes.map((node) =>
        el(
          'tr',
          { 'data-node': node.name },
          el('td', {}, node.name + ' ', badge(node.alive ? 'alive' : 'gone', node.alive ? 'reachable' : 'unreachable')),
          el('td', {}, node.upstream + ' ', badge(node.reachable === false ? 'unreachable' : 'reachable')),
          el('td', { text: (node.resident || []).join(', ') || 'none' }),
          el('td', { text: (node.running || []).join(', ') || 'nothing' }),
          el('td', { text: duration(node.heartbeat_age_s) + ' ago' }),
        ),
      ),
    );
  }

  function renderResident() {
    const stats = new Map((status.models || []).map((m) => [m.model_key, m]));
    // /api/ps may list `beta` where foreman keys `beta:latest`: one model.
    const keysOf = (name) => [...stats.values()].filter((m) => modelName(m.model_key) === modelName(name));
    let rows;
    if (ps && Array.isArray(ps.models)) {
      rows = ps.models.map((m) => ({ name: m.name || m.model, expires: parseTime(m.expires_at), stats: keysOf(m.name || m.model) }));
    } else {
      rows = (status.resident || []).map((key) => ({ name: key, expires: undefined, stats: stats.has(key) ? [stats.get(key)] : [] }));
    }
    const body = $('resident').tBodies[0];
    if (!rows.length) {
      body.replaceChildren(el('tr', {}, el('td', { colSpan: 3, class: 'muted', text: 'Ollama holds no model.' })));
      return;
    }
    body.replaceChildren(
      ...rows.map((row) => {
        const roles = el('td', {});
        for (const s of row.stats) {
          if (s.serving) roles.append(badge('serving'));
          if (s.pinned) roles.append(badge('pinned'));
          if (s.draining) roles.append(badge('max_wait drain', 'draining'));
        }
        if (!roles.childNodes.length) roles.append(el('span', { class: 'muted', text: 'idle' }));
        return el(
          'tr',
          { 'data-model': row.name },
          el('td', {}, swatch(row.name), row.name),
          roles,
          el('td', { class: 'expires', 'data-expires': row.expires === undefined || row.expires === null ? '' : String(row.expires) }),
        );
      }),
    );
    tickResident();
  }

  function tickResident() {
    for (const cell of document.querySelectorAll('#resident td.expires')) {
      const at = cell.dataset.expires ? Number(cell.dataset.expires) : null;
      if (at === null) cell.textContent = '—';
      else if (at - now() > FOREVER_MS) cell.textContent = 'never (kept loaded)';
      else cell.textContent = 'in ' + duration((at - now()) / 1000) + ' (' + clockTime(at) + ')';
    }
  }

  function renderRunning() {
    const jobs = status.in_flight || [];
    const box = $('running');
    if (!jobs.length) {
      box.replaceChildren(el('p', { class: 'muted', text: 'Nothing runs.' }));
    } else {
      box.replaceChildren(
        ...jobs.map((job) =>
          el(
            'div',
            { class: 'running-job', 'data-job': job.id },
            el('button', { type: 'button', class: 'link mono', text: job.id, 'aria-label': 'Job ' + job.id, onclick: () => showJob(job.id) }),
            el('span', {}, swatch(job.model_key), job.model_key, cloudBadge(job)),
            badge(job.state),
            el('span', { class: 'elapsed', 'data-since': String(parseTime(job.started_at)) }),
            el('button', { type: 'button', class: 'danger', text: 'Cancel', 'aria-label': 'Cancel job ' + job.id, onclick: () => cancel(job.id) }),
          ),
        ),
      );
    }
    tickRunning();
    const newest = jobs.length ? jobs[jobs.length - 1].id : null;
    if ((following && following.id) !== newest) followOutput(newest);
  }

  function tickRunning() {
    for (const span of document.querySelectorAll('#running .elapsed')) {
      const since = Number(span.dataset.since);
      span.textContent = Number.isFinite(since) ? 'for ' + duration((now() - since) / 1000) : '';
    }
  }

  function followOutput(id) {
    if (following) following.controller.abort();
    following = null;
    const output = $('output');
    output.textContent = '';
    if (!id) return;
    const controller = new AbortController();
    following = { id, controller };
    follow('/jobs/' + encodeURIComponent(id) + '/events', (name, data) => {
      if (name === 'chunk') output.textContent += chunkText(data);
      else if (name === 'state' && data.state === 'queued' && data.attempt > 0) output.textContent = '';
    }, controller.signal).catch(failed);
  }

  function renderQueue() {
    const rows = new Map(); // model -> counts, in drain order (the first time a model comes up)
    for (const q of status.queue) {
      if (!rows.has(q.model)) rows.set(q.model, { interactive: 0, batch: 0, oldest: null });
      const row = rows.get(q.model);
      row[q.priority] = q.waiting;
      const at = parseTime(q.oldest_at);
      if (at !== null && (row.oldest === null || at < row.oldest)) row.oldest = at;
    }
    const body = $('queue').tBodies[0];
    if (!rows.size) {
      body.replaceChildren(el('tr', {}, el('td', { colSpan: 4, class: 'muted', text: 'Nothing waits.' })));
      return;
    }
    body.replaceChildren(
      ...[...rows].map(([model, row]) =>
        el(
          'tr',
          { 'data-model': model },
          el('th', { scope: 'row' }, swatch(model), model),
          el('td', { class: 'num', text: String(row.interactive) }),
          el('td', { class: 'num', text: String(row.batch) }),
          el('td', { class: 'num oldest', 'data-since': String(row.oldest) }),
        ),
      ),
    );
    tickQueue();
  }

  function tickQueue() {
    for (const cell of document.querySelectorAll('#queue td.oldest')) {
      const since = Number(cell.dataset.since);
      cell.textContent = Number.isFinite(since) && since > 0 ? duration((now() - since) / 1000) : '—';
    }
  }

  // ------------------------------------------------------------------ the queue's transitions: /events

  async function watchQueue() {
    let delay = 1000;
    for (;;) {
      try {
        await follow('/events', onQueueEvent);
        delay = 1000;
      } catch (error) {
        if (error instanceof Unauthorized) return lostToken();
      }
      connection(false);
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 15000);
    }
  }

  function onQueueEvent(name, data) {
    if (name === 'hello') {
      skewMs = parseTime(data.now) - Date.now();
      timeline.runs = [];
      timeline.open.clear();
      timeline.loads = [];
      timeline.pending = null;
      timeline.swaps = [];
      for (const item of data.history) apply(item.event, item.data);
      connection(true);
    } else {
      apply(name, data);
    }
    drawSoon();
    refreshSoon();
    if (name === 'job') {
      if (!jobsPaged) refreshJobsSoon();
      if (openJob && openJob.id === data.id) refreshOpenJob();
    }
  }

  function apply(name, data) {
    const at = parseTime(data.at);
    if (name === 'swap') {
      const load = { model: data.model, start: parseTime(data.started_at), end: at, reason: data.reason, from: data.from, loadS: data.load_s };
      timeline.loads.push(load);
      timeline.swaps.push(load);
      if (timeline.pending && timeline.pending.model === data.model) timeline.pending = null;
      return;
    }
    if (name !== 'job') return;
    if (data.model) colour(data.model);
    const open = timeline.open.get(data.id);
    if (data.state === 'loading') {
      timeline.pending = { model: data.model, start: at, job: data.id };
    } else if (data.state === 'working') {
      if (timeline.pending && timeline.pending.job === data.id) timeline.pending = null;
      if (!open) {
        const run = { id: data.id, model: data.model, start: at, end: null };
        timeline.runs.push(run);
        timeline.open.set(data.id, run);
      }
    } else {
      if (timeline.pending && timeline.pending.job === data.id) timeline.pending = null;
      if (open) {
        open.end = at;
        timeline.open.delete(data.id);
      }
    }
  }

  // A burst of transitions (a batch arriving) redraws once per frame, not once per job.
  let drawPending = false;
  function drawSoon() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      drawTimeline();
      renderSwaps();
    });
  }

  function connection(up) {
    const line = $('connection');
    line.textContent = up ? 'live' : 'reconnecting…';
    line.classList.toggle('down', !up);
  }

  function drawTimeline() {
    const box = $('timeline');
    const width = Math.max(box.clientWidth, 240);
    const end = now();
    const span = windowMs(end);
    const start = end - span;
    const cutoff = end - KEEP_MS;
    timeline.runs = timeline.runs.filter((r) => r.end === null || r.end >= cutoff);
    timeline.loads = timeline.loads.filter((l) => l.end >= cutoff);
    const x = (t) => Math.max(0, Math.min(width, ((t - start) / span) * width));
    const top = 18;
    const lane = 34;
    const height = top + lane + 22;
    const chart = svg('svg', { width: String(width), height: String(height), viewBox: `0 0 ${width} ${height}`, 'aria-hidden': 'true' });
    chart.append(svg('rect', { x: '0', y: String(top), width: String(width), height: String(lane), class: 'lane' }));
    // A run or a load on the lane, at least `minWidth` pixels wide so a short one still shows.
    const bar = (model, from, until, minWidth, kind, data, title) => {
      const rect = svg('rect', {
        x: x(from).toFixed(1),
        y: String(top),
        width: Math.max(minWidth, x(until) - x(from)).toFixed(1),
        height: String(lane),
        fill: colour(model),
        class: kind,
        'data-model': model || '',
        ...data,
      });
      rect.append(svg('title', {}, title));
      chart.append(rect);
    };
    for (const run of timeline.runs) {
      const until = run.end === null ? end : run.end;
      if (until < start) continue;
      bar(run.model, run.start, until, 1, 'run', { 'data-job': run.id },
        `${run.model} · job ${run.id} · ${duration((until - run.start) / 1000)}`);
    }
    const loads = timeline.pending ? [...timeline.loads, { model: timeline.pending.model, start: timeline.pending.start, end: null }] : timeline.loads;
    let lastLabel = -Infinity;
    for (const load of loads) {
      const until = load.end === null ? end : load.end;
      if (until < start) continue;
      bar(load.model, load.start, until, 2, 'load', { 'data-reason': load.reason || 'loading' },
        `load ${load.model}` + (load.reason ? ` (${load.reason}, ${load.loadS} s)` : ' (under way)'));
      const at = x(load.start);
      chart.append(svg('line', { x1: at.toFixed(1), x2: at.toFixed(1), y1: '12', y2: String(top + lane), class: 'swap-mark' }));
      if (load.reason && at - lastLabel > 64) {
        const anchor = at > width - 60 ? 'end' : 'start';
        chart.append(svg('text', { x: at.toFixed(1), y: '10', class: 'swap-label', 'text-anchor': anchor }, load.reason));
        lastLabel = at;
      }
    }
    const step = TICKS.find((t) => span / t <= Math.max(3, Math.floor(width / 110))) || TICKS[TICKS.length - 1];
    for (let t = Math.ceil(start / step) * step; t <= end; t += step) {
      const at = x(t);
      chart.append(svg('line', { x1: at.toFixed(1), x2: at.toFixed(1), y1: String(top + lane), y2: String(top + lane + 5), class: 'tick' }));
      const anchor = at < 30 ? 'start' : at > width - 30 ? 'end' : 'middle';
      chart.append(svg('text', { x: at.toFixed(1), y: String(height - 3), class: 'tick-label', 'text-anchor': anchor }, clockTime(t)));
    }
    box.replaceChildren(chart);
    const models = [...seen].sort();
    $('legend').replaceChildren(
      ...models.map((m) => el('li', {}, swatch(m), m)),
      el('li', { class: 'muted' }, el('span', { class: 'swatch loading-swatch', 'aria-hidden': 'true' }), 'loading (darker)'),
    );
  }

  // The chosen window, or one that fits what happened (half a minute at least, the kept history at most).
  function windowMs(end) {
    const chosen = $('window').value;
    if (chosen !== 'auto') return Number(chosen) * 1000;
    const starts = [...timeline.runs.map((r) => r.start), ...timeline.loads.map((l) => l.start)];
    if (timeline.pending) starts.push(timeline.pending.start);
    const first = starts.length ? Math.min(...starts) : end;
    return Math.min(KEEP_MS, Math.max(30000, (end - first) * 1.1));
  }

  function renderSwaps() {
    const recent = timeline.swaps.slice(-20).reverse();
    const list = $('swaps');
    if (!recent.length) {
      list.replaceChildren(el('li', { class: 'muted', text: 'No swap yet.' }));
      return;
    }
    list.replaceChildren(
      ...recent.map((s) =>
        el(
          'li',
          { 'data-reason': s.reason, 'data-model': s.model },
          el('time', { text: clockTime(s.end) }),
          ' ',
          badge(s.reason, 'reason'),
          ' ',
          swatch(s.model),
          s.model,
          el('span', { class: 'muted', text: ` from ${s.from && s.from.length ? s.from.join(', ') : 'nothing'}, loaded in ${duration(s.loadS)}` }),
        ),
      ),
    );
  }

  // ------------------------------------------------------------------ jobs: the list, a job, cancel

  async function loadJobs(more) {
    const query = new URLSearchParams({ limit: '25' });
    const state = $('filter-state').value;
    const model = $('filter-model').value.trim();
    if (state) query.set('state', state);
    if (model) query.set('model', model);
    if (more && jobsNext) query.set('after', jobsNext);
    const page = await api('/jobs?' + query.toString());
    jobsNext = page.next;
    jobsPaged = Boolean(more);
    const rows = page.jobs.map(jobRow);
    const body = $('jobs').tBodies[0];
    if (more) body.append(...rows);
    else body.replaceChildren(...rows);
    $('jobs-empty').hidden = body.rows.length > 0;
    $('more').hidden = !jobsNext;
  }

  const refreshJobsSoon = throttled(() => loadJobs(false), 2000);

  function jobRow(job) {
    const created = parseTime(job.created_at);
    return el(
      'tr',
      { 'data-job': job.id, 'data-state': job.state },
      el('td', { class: 'job-id' }, el('button', { type: 'button', class: 'link mono', text: job.id, 'aria-label': 'Job ' + job.id, onclick: () => showJob(job.id) })),
      el('td', {}, swatch(job.model_key), job.model_key, cloudBadge(job)),
      el('td', { class: 'state' }, badge(job.state)),
      // data-label names a cell where a phone shows the rows as cards, without the header row.
      el('td', { class: 'created', 'data-label': 'created' }, el('time', { text: dateTime(created) })),
      el('td', { class: 'num wait', 'data-label': 'wait', text: duration(job.queue_wait_s) }),
      el('td', { class: 'num run', 'data-label': 'run', text: duration(job.run_s) }),
      el('td', { class: 'action' }, TERMINAL.has(job.state) ? null : el('button', { type: 'button', class: 'danger', text: 'Cancel', 'aria-label': 'Cancel job ' + job.id, onclick: () => cancel(job.id) })),
    );
  }

  async function cancel(id) {
    try {
      const job = await api('/jobs/' + encodeURIComponent(id), { method: 'DELETE' });
      say(`Job ${id} is ${job.state}.`);
    } catch (error) {
      failed(error);
    }
    refreshSoon();
    if (!jobsPaged) refreshJobsSoon();
    if (openJob && openJob.id === id) refreshOpenJob();
  }

  function field(term, value) {
    return el('div', {}, el('dt', { text: term }), el('dd', { text: value === null || value === undefined || value === '' ? '—' : String(value) }));
  }

  async function renderJobFields(id) {
    const job = await api('/jobs/' + encodeURIComponent(id));
    if (!openJob || openJob.id !== id) return null;
    $('job-title').textContent = 'Job ' + job.id;
    $('job-fields').replaceChildren(
      field('State', job.state),
      field('Model', job.model),
      field('Endpoint', job.endpoint),
      field('Async', job.async ? 'yes' : 'no'),
      field('Attempt', job.attempt),
      field('Position', job.position),
      field('Created', dateTime(parseTime(job.created_at))),
      field('Started', dateTime(parseTime(job.started_at))),
      field('Finished', dateTime(parseTime(job.finished_at))),
      field('Waited', duration(job.queue_wait_s)),
      field('Ran', duration(job.run_s)),
      field('Status', job.status),
      field('Error', job.error),
    );
    $('job-cancel').hidden = TERMINAL.has(job.state);
    return job;
  }

  const refreshOpenJob = throttled(async () => {
    if (openJob) await renderJobFields(openJob.id);
  }, 500);

  async function showJob(id) {
    if (openJob) openJob.controller.abort();
    const controller = new AbortController();
    openJob = { id, controller };
    $('job-title').textContent = 'Job ' + id;
    $('job-fields').replaceChildren();
    const output = $('job-output');
    output.textContent = '';
    $('job-cancel').hidden = true;
    const dialog = $('job');
    if (!dialog.open) dialog.showModal();
    try {
      const job = await renderJobFields(id);
      let streamed = false;
      await follow('/jobs/' + encodeURIComponent(id) + '/events', (name, data) => {
        if (name === 'chunk') {
          streamed = true;
          output.textContent += chunkText(data);
        } else if (name === 'state' && data.state === 'queued' && data.attempt > 0) {
          output.textContent = '';
        }
      }, controller.signal);
      if (openJob && openJob.id === id) {
        const ended = await renderJobFields(id);
        if (!streamed && ended) output.textContent = resultText(ended.result) || (job && job.error) || '';
        if (!output.textContent) output.textContent = '(no output)';
      }
    } catch (error) {
      failed(error);
    }
  }

  function closeJob() {
    if (openJob) openJob.controller.abort();
    openJob = null;
  }

  // ------------------------------------------------------------------ start

  function tick() {
    tickRunning();
    tickQueue();
    tickResident();
    drawTimeline();
  }

  function enterLive() {
    if (live) return;
    live = true;
    $('gate').hidden = true;
    $('live').hidden = false;
    $('connection').textContent = 'connecting…';
    renderState();
    drawTimeline();
    renderSwaps();
    watchQueue();
    loadJobs(false).catch(failed);
    setInterval(tick, 1000);
    // Ollama's side changes without a queue transition (another client, an expiry).
    setInterval(refreshSoon, 10000);
    window.addEventListener('resize', drawTimeline);
  }

  function showGate(message) {
    $('live').hidden = true;
    $('gate').hidden = false;
    $('connection').textContent = 'locked';
    $('token-error').textContent = message || '';
    $('token').focus();
  }

  function bind() {
    $('token-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      const value = $('token').value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      try {
        await refreshStatus();
      } catch (error) {
        if (error instanceof Unauthorized) sessionStorage.removeItem(TOKEN_KEY);
        $('token-error').textContent = error instanceof Unauthorized ? 'foreman refused that token.' : error.message;
        return;
      }
      $('token').value = '';
      enterLive();
    });
    $('filter').addEventListener('submit', (event) => {
      event.preventDefault();
      loadJobs(false).catch(failed);
    });
    $('filter-state').addEventListener('change', () => loadJobs(false).catch(failed));
    $('more').addEventListener('click', () => loadJobs(true).catch(failed));
    $('window').addEventListener('change', drawTimeline);
    $('job-close').addEventListener('click', () => $('job').close());
    $('job').addEventListener('close', closeJob);
    $('job-cancel').addEventListener('click', () => {
      if (openJob) cancel(openJob.id);
    });
  }

  async function boot() {
    try {
      await refreshStatus();
    } catch (error) {
      if (error instanceof Unauthorized) {
        sessionStorage.removeItem(TOKEN_KEY);
        return showGate();
      }
      $('connection').textContent = 'foreman did not answer (' + error.message + '); trying again…';
      setTimeout(boot, 3000);
      return;
    }
    enterLive();
  }

  bind();
  boot();
})();
