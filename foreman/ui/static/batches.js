// The live page's Batches panel: OpenAI-style batches (GET /v1/batches) with their progress.
// Its own file, beside app.js: it reads the token app.js keeps, and shows the panel once the
// page is live and a batch exists.
'use strict';

(() => {
  const TOKEN_KEY = 'foreman.token';
  const ENDED = new Set(['completed', 'failed', 'cancelled', 'expired']);
  const EVERY_MS = 2000;
  const $ = (id) => document.getElementById(id);

  function cell(text, cls) {
    const td = document.createElement('td');
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function when(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleTimeString() : '';
  }

  function row(batch) {
    const counts = batch.request_counts || { total: 0, completed: 0, failed: 0 };
    const tr = document.createElement('tr');
    tr.dataset.batch = batch.id;
    const status = cell('');
    const badge = document.createElement('span');
    badge.className = 'badge ' + batch.status;
    badge.textContent = batch.status;
    status.append(badge);
    const progress = cell('');
    const bar = document.createElement('progress');
    bar.max = Math.max(counts.total, 1);
    bar.value = counts.completed + counts.failed;
    bar.setAttribute('aria-label', 'Progress of ' + batch.id);
    const text = document.createElement('span');
    text.className = 'progress-text';
    text.textContent = ' ' + counts.completed + ' done' + (counts.failed ? ', ' + counts.failed + ' failed' : '') + ' of ' + counts.total;
    progress.append(bar, text);
    tr.append(cell(batch.id), status, cell(batch.endpoint), progress, cell(when(batch.created_at)));
    return tr;
  }

  async function refresh() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const response = await fetch('/v1/batches?limit=20', {
      cache: 'no-store',
      headers: token ? { Authorization: 'Bearer ' + token } : {},
    });
    if (!response.ok) return false;
    const page = await response.json();
    const batches = page.data || [];
    $('batches-panel').hidden = !batches.length;
    $('batches').tBodies[0].replaceChildren(...batches.map(row));
    return batches.some((b) => !ENDED.has(b.status));
  }

  async function loop() {
    if (!$('live').hidden) {
      try {
        await refresh();
      } catch (error) {
        // The page's own panels say when foreman does not answer.
      }
    }
    setTimeout(loop, EVERY_MS);
  }

  loop();
})();
