// Bramble dashboard: no framework, no build step. Reads GET /v1/stream (Server-Sent
// Events) with fetch() so the token goes in the Authorization header, never in a URL.
'use strict';

const $ = (s) => document.querySelector(s);
const TOKEN = 'bramble.token';
const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ESC[c]);
const S = { role: null, nodes: [], hist: {}, tasks: [], workloads: [], cronjobs: [], events: [], seq: 0, controllers: [], endpoints: [], volumes: [] };
const FINISHED = ['Succeeded', 'Failed', 'Stopped', 'Lost'];
const RUNS = ['Job', 'CronJob'];
let ctl = null;
let backoff = 1000;

const token = () => sessionStorage.getItem(TOKEN);
const admin = () => S.role === 'admin';
const mib = (b) => b == null ? 'unavailable' : b >= 2 ** 30 ? (b / 2 ** 30).toFixed(1) + ' GiB' : b >= 2 ** 20 ? Math.round(b / 2 ** 20) + ' MiB' : Math.round(b / 1024) + ' KiB';
const pct = (x) => x == null ? 'unavailable' : (x < 10 ? x.toFixed(1) : Math.round(x)) + '%';

function ago(ts) {
  if (!ts) return '—';
  const s = Math.round((Date.now() - Date.parse(ts)) / 1000);
  const a = Math.abs(s);
  const t = a < 60 ? a + 's' : a < 3600 ? Math.round(a / 60) + 'm' : a < 86400 ? Math.round(a / 3600) + 'h' : Math.round(a / 86400) + 'd';
  return s >= 0 ? t + ' ago' : 'in ' + t;
}

function setLive(state) {
  const el = $('#live');
  el.textContent = state;
  el.className = 'live ' + (state === 'live' ? 'on' : 'off');
}

function toast(msg, bad) {
  const t = $('#toast');
  t.textContent = msg;
  t.className = bad ? 'bad' : '';
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
}

// ---- the stream ----

async function connect() {
  const t = token();
  if (!t) return showSignin();
  ctl = new AbortController();
  const mine = ctl;
  setLive('connecting');
  let r;
  try {
    r = await fetch('/v1/stream', { headers: { Authorization: 'Bearer ' + t }, signal: mine.signal, cache: 'no-store' });
  } catch (e) {
    return mine.signal.aborted ? undefined : retry();
  }
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN);
    return showSignin('That token was not accepted.');
  }
  if (!r.ok || !r.body) return retry();
  const rd = r.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await rd.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        onBlock(buf.slice(0, i));
        buf = buf.slice(i + 2);
      }
    }
  } catch (e) { /* the connection broke */ }
  if (!mine.signal.aborted) retry();
}

function retry() {
  setLive('reconnecting');
  setTimeout(connect, backoff);
  backoff = Math.min(backoff * 2, 15000);
}

function onBlock(block) {
  let ev = 'message';
  let data = '';
  for (const l of block.split('\n')) {
    if (l.startsWith('event: ')) ev = l.slice(7);
    else if (l.startsWith('data: ')) data += l.slice(6);
  }
  if (!data || !on[ev]) return;
  let d;
  try { d = JSON.parse(data); } catch (e) { return; }
  on[ev](d);
}

const on = {
  snapshot(d) {
    backoff = 1000;
    S.role = d.role;
    S.nodes = d.nodes;
    S.tasks = d.tasks;
    S.workloads = d.workloads;
    S.cronjobs = d.cronjobs;
    S.hist = {};
    for (const [n, h] of Object.entries(d.history)) {
      S.hist[n] = { t: h.cpu.length ? h.start + (h.cpu.length - 1) * h.step : null, cpu: h.cpu, mem: h.mem, temp: h.temp };
    }
    S.events = [];
    S.seq = 0;
    $('#events').innerHTML = '';
    on.events(d.events);
    $('#role').textContent = d.role === 'admin' ? 'admin' : 'viewer · read-only';
    $('#signout').hidden = false;
    $('#signin').hidden = true;
    $('#app').hidden = false;
    setLive('live');
    $('#nodes').innerHTML = '';
    render();
    pollControllers();
    pollEndpoints();
    pollVolumes();
  },
  nodes(d) {
    S.nodes = d;
    addPoints(d);
    renderNodes();
    renderCron();
    renderSummary();
  },
  // Per node, only the fields that changed; null: the field is gone.
  nodedelta(d) {
    for (const delta of d) {
      const n = S.nodes.find((x) => x.name === delta.name);
      if (!n) continue;
      for (const [k, v] of Object.entries(delta)) {
        if (v === null) delete n[k]; else n[k] = v;
      }
    }
    addPoints(d);
    renderNodes();
    renderCron();
    renderSummary();
  },
  tasks(d) { S.tasks = d; renderNodes(); renderSummary(); },
  workloads(d) { S.workloads = d; renderWorkloads(); renderSummary(); },
  cronjobs(d) { S.cronjobs = d; renderCron(); },
  events(d) {
    const fresh = d.filter((e) => e.seq > S.seq);
    if (!fresh.length) return;
    S.seq = fresh[fresh.length - 1].seq;
    const ol = $('#events');
    for (const e of fresh) {
      // The same event again (a crash loop's every restart, "restart 7", "restart 8")
      // folds into its row among the recent ones, which moves to the top with a count
      // and the newest message, as kubectl counts events.
      const key = `${e.severity}|${e.reason}|${e.object}|${String(e.message).replace(/\d+/g, '#')}`;
      const time = `<time title="${esc(e.at)}">${esc(new Date(e.at).toLocaleTimeString())}</time>`;
      const same = [...ol.children].slice(0, 50).find((li) => li.dataset.key === key);
      if (same) {
        const n = Number(same.dataset.count) + 1;
        same.dataset.count = n;
        same.querySelector('time').outerHTML = time;
        same.querySelector('.count').textContent = '×' + n;
        const msg = same.querySelector('.msg');
        msg.textContent = e.message;
        msg.title = e.message;
        ol.prepend(same);
        continue;
      }
      const li = document.createElement('li');
      li.className = e.severity === 'Warning' ? 'warning' : '';
      li.dataset.key = key;
      li.dataset.count = 1;
      li.innerHTML = `${time}<b>${esc(e.reason)}<span class="count"></span></b><span class="obj">${esc(e.object)}</span><span class="msg" title="${esc(e.message)}">${esc(e.message)}</span>`;
      filterEvent(li);
      ol.prepend(li);
    }
    while (ol.children.length > 500) ol.lastChild.remove();
  },
};

// ---- rendering ----

function render() { renderNodes(); renderWorkloads(); renderCron(); renderSummary(); }

// The event feed's filter: words that must all appear, and warnings only.
function filterEvent(li) {
  const words = $('#event-filter').value.toLowerCase().split(/\s+/).filter(Boolean);
  const text = li.textContent.toLowerCase();
  const warnOnly = $('#event-warnings').checked;
  li.hidden = (warnOnly && !li.classList.contains('warning')) || !words.every((w) => text.includes(w));
}
function filterEvents() { for (const li of $('#events').children) filterEvent(li); }
$('#event-filter').addEventListener('input', filterEvents);
$('#event-warnings').addEventListener('change', filterEvents);

// Everything that needs an operator, in words: the Warnings chip counts it and opens it.
function warnings() {
  const out = [];
  for (const n of S.nodes) for (const w of n.warnings || []) out.push({ level: 'failing', what: 'node/' + n.name, text: w });
  for (const t of S.tasks) {
    if (t.level !== 'failing' && t.level !== 'warning') continue;
    if (RUNS.includes(t.kind) && FINISHED.includes(t.phase) && t.phase !== 'Failed') continue;
    out.push({ level: t.level, what: 'task/' + t.id, text: `${t.status}${t.message ? ': ' + t.message : ''}${t.retryAt ? ' (next try ' + ago(t.retryAt) + ')' : ''}`, task: t.id });
  }
  for (const w of S.workloads) if (w.running < w.desired) out.push({ level: 'warning', what: `${w.kind.toLowerCase()}/${w.name}`, text: `${w.running} of ${w.desired} running` });
  for (const v of S.volumes) {
    const bad = volumeTrouble(v);
    if (bad) out.push({ level: 'failing', what: 'volume/' + v.name, text: bad + (v.lastSync && v.lastSync.error ? ': ' + v.lastSync.error : '') });
  }
  return out;
}

function renderWarnings() {
  const list = warnings();
  patch($('#warnlist-items'), list.length ? list.map((w) =>
    `<li class="lv-${esc(w.level)}"><code>${esc(w.what)}</code><span>${esc(w.text)}</span>${w.task ? `<button data-act="logs" data-task="${esc(w.task)}" class="link">logs</button>` : ''}</li>`).join('')
    : '<li class="none">Nothing needs attention.</li>');
  return list.length;
}

function running(t) { return !t.desired && !(RUNS.includes(t.kind) && FINISHED.includes(t.phase)); }

function renderSummary() {
  const ready = S.nodes.filter((n) => n.status === 'Ready').length;
  const live = S.tasks.filter(running);
  const up = live.filter((t) => t.phase === 'Running').length;
  const warns = renderWarnings();
  const chip = (label, v, bad, act) => `<span class="chip ${bad ? 'bad' : 'ok'}"${act ? ` role="button" tabindex="0" data-open="${act}" title="show the list"` : ''}><small>${label}</small>${v}</span>`;
  const lead = S.controllers.find((c) => c.leader);
  const many = S.controllers.length > 1;
  const ctls = !S.controllers.length ? '' : chip(many ? 'Controllers' : 'Controller',
    lead ? `${many ? S.controllers.length + ' · ' : ''}${esc(lead.name)} leads` : 'no leader', !lead);
  $('#summary').innerHTML = chip('Nodes ready', `${ready}/${S.nodes.length}`, ready < S.nodes.length) +
    chip('Tasks running', `${up}/${live.length}`, up < live.length) +
    chip('Warnings', warns, warns > 0, 'warnlist') + ctls;
  const c = $('#summary .chip:last-child');
  if (ctls && c) {
    c.title = S.controllers.map((m) => `${m.name}${m.url ? ' ' + m.url : ''}: ${m.leader ? 'leader since ' + new Date(m.leaderSince).toLocaleString() : 'follower'}, up since ${new Date(m.started).toLocaleString()}${m.answering ? ' (this one)' : ''}`).join('\n');
  }
}

// What the stream does not carry, polled: who leads and since when (several controllers
// share the cluster on etcd, any of them serves this page), and each workload's stable
// address with its Ready instances (the names containers call each other by).
function poller(path, key, then) {
  const poll = async () => {
    if (!token() || $('#app').hidden) return;
    try {
      S[key] = await (await call('GET', path)).json();
    } catch (e) {
      S[key] = [];
    }
    then();
  };
  setInterval(poll, 5000);
  return poll;
}
const pollControllers = poller('/v1/controllers', 'controllers', () => renderSummary());
const pollEndpoints = poller('/v1/endpoints', 'endpoints', () => renderWorkloads());
const pollVolumes = poller('/v1/volumes', 'volumes', () => { renderWorkloads(); renderSummary(); });

// A workload's managed volumes: where each is, its last sync, its copies; red when it
// started empty, its sync fails, or it has no copy to fail over to.
function volumeTrouble(v) {
  if (v.origin && v.origin.from === 'empty' && v.copies.length + v.setAside.length > 0) return 'started empty';
  if (v.lastSync && v.lastSync.error) return 'sync failed';
  if (v.sync && v.node && !v.copies.some((c) => !c.stale)) return 'no copy';
  return '';
}

function volumes(w) {
  const vs = S.volumes.filter((v) => v.workload === w.name);
  if (!vs.length) return '<span class="none">-</span>';
  return vs.map((v) => {
    const bad = volumeTrouble(v);
    const copies = v.copies.map((c) => `${c.node}${c.stale ? ' (older placement)' : ''}, ${ago(c.at)}`).join('\n');
    const synced = v.lastSync && !v.lastSync.error ? ` <small>synced ${esc(ago(v.lastSync.at))}</small>` : '';
    const title = `${v.node ? 'on ' + v.node + ', ' + mib(v.bytes) : 'not in use'}${copies ? '\ncopies:\n' + copies : ''}${v.lastSync && v.lastSync.error ? '\n' + v.lastSync.error : ''}`;
    return `<code title="${esc(title)}">${esc(v.name)}</code>${synced}${bad ? ` <span class="pill Failed">${esc(bad)}</span>` : ''}`;
  }).join('<br>');
}

function address(w) {
  const e = S.endpoints.find((x) => x.kind === w.kind && x.name === w.name);
  if (!e) return '<span class="none">-</span>';
  const b = e.backends || [];
  const ready = b.filter((x) => x.ready);
  const ports = (e.ports || []).join(',');
  const where = b.map((x) => `${x.task} on ${x.node}${x.ready ? '' : ' (not ready)'}`).join('\n');
  const none = ports && !ready.length ? ' <span class="pill Failed">no Ready endpoint</span>' : '';
  return `<code title="${esc(where)}">${esc(e.address)}${ports ? ':' + esc(ports) : ''}</code>${ports ? ` <small>${ready.length} ready</small>` : ''}${none}`;
}

function spark(values, lo, hi, cls, mark) {
  const n = values.length;
  if (!n || values.every((v) => v == null)) return '<svg class="spark" viewBox="0 0 120 28"></svg>';
  const x = (i) => (n === 1 ? 120 : (i * 120) / (n - 1)).toFixed(1);
  const y = (v) => (27 - (Math.min(Math.max(v, lo), hi) - lo) / (hi - lo || 1) * 25).toFixed(1);
  let d = '';
  let pen = false;
  values.forEach((v, i) => {
    if (v == null) { pen = false; return; }
    d += (pen ? 'L' : 'M') + x(i) + ' ' + y(v);
    pen = true;
  });
  const line = mark == null ? '' : `<line x1="0" x2="120" y1="${y(mark)}" y2="${y(mark)}" class="mark"/>`;
  return `<svg class="spark ${cls}" viewBox="0 0 120 28" preserveAspectRatio="none">${line}<path d="${d}"/></svg>`;
}

function disk(label, d) {
  if (!d) return `<span>${label} <i>unavailable</i></span>`;
  const free = d.totalBytes ? Math.round(d.freeBytes * 100 / d.totalBytes) : 0;
  return `<span title="${esc(d.path)}">${label} <b>${mib(d.freeBytes)}</b> free (${free}%)</span>`;
}

// Appends each card's newest history point to its node's sparklines.
function addPoints(list) {
  for (const n of list) {
    if (!n.point) continue;
    const [t, cpu, mem, temp] = n.point;
    const h = S.hist[n.name] || (S.hist[n.name] = { t: null, cpu: [], mem: [], temp: [] });
    if (h.t != null && t <= h.t) continue;
    // Empty 10-second slots (no heartbeats) stay gaps in the lines.
    const gap = h.t == null ? 0 : Math.min((t - h.t) / 10 - 1, 360);
    for (let i = 0; i < gap; i++) { h.cpu.push(null); h.mem.push(null); h.temp.push(null); }
    h.cpu.push(cpu); h.mem.push(mem); h.temp.push(temp);
    for (const k of ['cpu', 'mem', 'temp']) if (h[k].length > 360) h[k].splice(0, h[k].length - 360);
    h.t = t;
  }
}

function nodeHead(n) {
  const act = admin() && n.status !== 'Dead'
    ? `<button data-act="${n.cordoned ? 'uncordon' : 'cordon'}" data-node="${esc(n.name)}" class="ghost">${n.cordoned ? 'Uncordon' : 'Cordon'}</button>` : '';
  return `<div class="title"><h3>${esc(n.name)}</h3><span class="pill ${esc(n.status)}">${esc(n.status)}</span>${n.cordoned ? '<span class="pill cordoned">cordoned</span>' : ''}${act}</div>` +
    `<div class="sub">${esc(n.arch)} · ${n.cores} cores · ${n.status === 'Ready' ? 'heard now' : 'seen ' + esc(ago(n.lastSeen))}</div>`;
}

function nodeBody(n) {
  const h = S.hist[n.name] || { cpu: [], mem: [], temp: [] };
  const warn = (n.warnings || []).map((w) => `<li>${esc(w)}</li>`).join('');
  const notes = (n.throttle || []).filter((t) => !t.now).map((t) => `<li>${esc(t.text)}</li>`).join('');
  const memMiB = n.memTotal / 2 ** 20;
  const temp = n.temp == null ? '<i>unavailable</i>' : n.temp.toFixed(1) + ' °C';
  const load = n.load && n.load.length ? n.load.map((l) => l.toFixed(2)).join(' ') : '<i>unavailable</i>';
  const cores = (n.perCore || []).map((c, i) => `<rect x="${i * 9}" y="${(20 - c / 5).toFixed(1)}" width="7" height="${(c / 5).toFixed(1)}"/>`).join('');
  const throttle = n.throttle == null ? '<span>Pi firmware <i>unavailable</i></span>' : n.throttle.length ? '' : '<span>no throttling</span>';
  return (warn ? `<ul class="warns">${warn}</ul>` : '') + (notes ? `<ul class="notes">${notes}</ul>` : '') +
    `<div class="metric"><span class="k">CPU</span><span class="v">${pct(n.cpu)}` +
    (cores ? `<svg class="cores" viewBox="0 0 ${n.perCore.length * 9} 20"><title>per core</title>${cores}</svg>` : '') +
    `</span>${spark(h.cpu, 0, 100, 'cpu')}</div>` +
    `<div class="metric"><span class="k">RAM</span><span class="v">${n.memUsed == null ? '<i>unavailable</i>' : mib(n.memUsed) + ' <small>/ ' + mib(n.memTotal) + '</small>'}</span>${spark(h.mem, 0, memMiB, 'mem')}</div>` +
    `<div class="metric"><span class="k">Temp</span><span class="v">${temp}</span>${spark(h.temp, 20, 90, 'temp', 75)}</div>` +
    `<div class="facts"><span>load <b>${load}</b></span>${disk('data', n.dataDisk)}${disk('docker', n.dockerDisk)}${throttle}</div>`;
}

function nodeTasks(n) {
  const ts = S.tasks.filter((t) => t.node === n.name && !(RUNS.includes(t.kind) && FINISHED.includes(t.phase)));
  if (!ts.length) return '<p class="none">no tasks</p>';
  return '<ul class="tasks">' + ts.map((t) => {
    const u = (n.usage || {})[t.id];
    const use = u ? `<span class="use">${u[0] == null ? '…' : pct(u[0])} · ${u[1] == null ? 'mem unavailable' : mib(u[1])}</span>` : '';
    return `<li class="task" data-task="${esc(t.id)}" data-phase="${esc(t.phase)}" data-status="${esc(t.status)}">${statusPill(t)}` +
      `<b>${esc(t.workload)}</b><code>${esc(t.id)}</code>${t.restarts ? `<span class="restarts">↻${t.restarts}</span>` : ''}${use}` +
      `<button data-act="logs" data-task="${esc(t.id)}" class="link">logs</button>${why(t)}</li>`;
  }).join('') + '</ul>';
}

// A task's state by name, coloured by how bad it is.
function statusPill(t) {
  return `<span class="pill lv-${esc(t.level)}">${esc(t.status)}</span>`;
}

// Why a task is not as wanted, and when it is tried again: under the task, in red for
// failing; the whole message on hover.
function why(t) {
  if (t.level !== 'failing' && t.level !== 'warning') return '';
  const next = t.retryAt ? ` · next try <span data-until="${esc(t.retryAt)}">${esc(ago(t.retryAt))}</span>` : '';
  return t.message || next ? `<div class="why lv-${esc(t.level)}" title="${esc(t.message)}">${esc(t.message)}${next}</div>` : '';
}

// Cards are kept per node and each part is rewritten only when its text changed, so a
// button under the pointer is not replaced every second.
function patch(el, html) { if (el.dataset.html !== html) { el.innerHTML = html; el.dataset.html = html; } }

function renderNodes() {
  const grid = $('#nodes');
  const names = new Set(S.nodes.map((n) => n.name));
  for (const el of [...grid.children]) if (!names.has(el.dataset.node)) el.remove();
  for (const n of S.nodes) {
    let card = grid.querySelector(`article[data-node="${CSS.escape(n.name)}"]`);
    if (!card) {
      card = document.createElement('article');
      card.dataset.node = n.name;
      card.innerHTML = '<div class="head"></div><div class="body"></div><div class="tasklist"></div>';
      grid.append(card);
    }
    const failing = S.tasks.some((t) => t.node === n.name && t.level === 'failing' && !(RUNS.includes(t.kind) && FINISHED.includes(t.phase)));
    card.className = 'card ' + n.status + (n.warnings && n.warnings.length ? ' warned' : '') + (failing ? ' failing' : '');
    patch(card.children[0], nodeHead(n));
    patch(card.children[1], nodeBody(n));
    patch(card.children[2], nodeTasks(n));
  }
  if (!S.nodes.length) grid.innerHTML = '<p class="none">No nodes yet: start an agent with the join token.</p>';
  const pending = S.tasks.filter((t) => !t.node && !t.desired && !FINISHED.includes(t.phase));
  patch($('#unplaced'), pending.length ? '<h3>Waiting for a node</h3><ul class="tasks">' + pending.map((t) =>
    `<li class="task" data-task="${esc(t.id)}" data-status="${esc(t.status)}">${statusPill(t)}<b>${esc(t.workload)}</b><code>${esc(t.id)}</code>${why(t) || `<span class="msg">${esc(t.message)}</span>`}</li>`).join('') + '</ul>' : '');
}

function renderWorkloads() {
  const rows = S.workloads.map((w) => {
    const key = `${w.kind}/${w.name}`;
    const btn = admin() && !RUNS.includes(w.kind) ? `<button data-act="restart" data-kind="${esc(w.kind.toLowerCase())}" data-name="${esc(w.name)}" class="ghost">Restart</button>` : '';
    return `<tr data-workload="${esc(key)}"><td>${esc(w.kind)}</td><td><b>${esc(w.name)}</b></td><td><code>${esc(w.image)}</code></td>` +
      `<td class="${w.running < w.desired ? 'short' : 'full'}">${w.running}/${w.desired}</td><td>${address(w)}</td><td>${volumes(w)}</td><td>${btn}</td></tr>`;
  });
  patch($('#workloads tbody'), rows.join('') || '<tr><td colspan="7" class="none">No workloads: <code>bramblectl apply -f manifests/</code></td></tr>');
}

const openCron = new Set();
const secs = (ms) => ms == null ? '—' : ms < 1000 ? ms + ' ms' : (ms / 1000).toFixed(ms < 10000 ? 1 : 0) + ' s';

// A cron job's last runs: when, how it went, its exit code, how long, how late, logs.
function cronRuns(c) {
  if (!c.runs.length) return '<p class="none">No runs yet.</p>';
  return '<table class="runs"><thead><tr><th>Slot</th><th>Result</th><th>Exit</th><th>Took</th><th>Started late</th><th></th></tr></thead><tbody>' +
    c.runs.map((r) => {
      const result = r.phase || r.outcome;
      return `<tr><td title="${esc(r.slot)}">${esc(new Date(r.slot).toLocaleString())}</td><td><span class="pill ${esc(result)}">${esc(result)}</span></td>` +
        `<td>${r.exitCode == null ? '—' : r.exitCode}</td><td>${secs(r.millis)}</td><td>${secs(r.lateMillis)}</td>` +
        `<td>${r.task ? `<button data-act="logs" data-task="${esc(r.task)}" class="link">logs</button>` : ''}</td></tr>`;
    }).join('') + '</tbody></table>';
}

function renderCron() {
  const rows = S.cronjobs.map((c) => `<tr data-cronjob="${esc(c.name)}"><td><b>${esc(c.name)}</b>${c.suspended ? ' <span class="pill cordoned">suspended</span>' : ''}</td>` +
    `<td><code>${esc(c.schedule)}</code> <small>${esc(c.timezone)}</small></td>` +
    `<td>${esc(ago(c.last))}${c.result ? ` <span class="pill ${esc(c.result)}">${esc(c.result)}</span>` : ''}${c.missed ? ` <span class="pill Failed">${c.missed} missed</span>` : ''}</td>` +
    `<td>${c.suspended ? '—' : esc(ago(c.next))}${c.active ? ` · ${c.active} active` : ''}</td>` +
    `<td><button data-act="history" data-cronjob="${esc(c.name)}" class="link">${openCron.has(c.name) ? 'hide' : 'history'}</button></td></tr>` +
    (openCron.has(c.name) ? `<tr class="history" data-history="${esc(c.name)}"><td colspan="5">${cronRuns(c)}</td></tr>` : ''));
  patch($('#cronjobs tbody'), rows.join('') || '<tr><td colspan="5" class="none">No cron jobs</td></tr>');
}

// ---- actions ----

async function call(method, path) {
  const r = await fetch(path, { method, headers: { Authorization: 'Bearer ' + token() } });
  if (r.ok) return r;
  let msg = r.status + ' ' + r.statusText;
  try { msg = (await r.json()).message || msg; } catch (e) { /* not JSON */ }
  throw new Error(msg);
}

document.addEventListener('click', async (e) => {
  const b = e.target.closest('button[data-act]');
  if (!b) return;
  const d = b.dataset;
  try {
    if (d.act === 'cordon' || d.act === 'uncordon') {
      await call('POST', `/v1/nodes/${encodeURIComponent(d.node)}/${d.act}`);
      toast(`node ${d.node} ${d.act}ed`);
    } else if (d.act === 'restart') {
      // Two clicks: a restart stops every task of the workload at once.
      if (!b.classList.contains('confirm')) {
        b.classList.add('confirm');
        b.textContent = 'Restart now?';
        setTimeout(() => { b.classList.remove('confirm'); b.textContent = 'Restart'; }, 3000);
        return;
      }
      const r = await (await call('POST', `/v1/workloads/${d.kind}/${encodeURIComponent(d.name)}/restart`)).json();
      toast(`${d.name}: ${r.tasksRestarted} tasks restarting`);
    } else if (d.act === 'history') {
      if (openCron.has(d.cronjob)) openCron.delete(d.cronjob); else openCron.add(d.cronjob);
      renderCron();
    } else if (d.act === 'logs') {
      $('#logs-title').textContent = 'Logs of ' + d.task + ' (last 200 lines)';
      $('#logs-text').textContent = 'loading…';
      $('#logs').hidden = false;
      const text = await (await call('GET', `/v1/tasks/${encodeURIComponent(d.task)}/logs?tail=200`)).text();
      $('#logs-text').textContent = text || '(no output)';
    }
  } catch (err) {
    if (d.act === 'logs') $('#logs-text').textContent = 'error: ' + err.message;
    else toast(err.message, true);
  }
});

document.addEventListener('click', (e) => {
  const c = e.target.closest('[data-open]');
  if (c) { renderWarnings(); $('#' + c.dataset.open).hidden = false; }
});
document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape') { $('#logs').hidden = true; $('#warnlist').hidden = true; }
  const c = e.target.closest && e.target.closest('[data-open]');
  if (c && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); $('#' + c.dataset.open).hidden = false; }
});
$('#logs-close').addEventListener('click', () => { $('#logs').hidden = true; });
$('#warnlist-close').addEventListener('click', () => { $('#warnlist').hidden = true; });

// Countdowns ("next try in 8s") tick without waiting for the stream.
setInterval(() => {
  for (const el of document.querySelectorAll('[data-until]')) el.textContent = ago(el.dataset.until);
}, 1000);

// ---- sign-in ----

function showSignin(err) {
  setLive('offline');
  $('#app').hidden = true;
  $('#signout').hidden = true;
  $('#role').textContent = '';
  $('#signin').hidden = false;
  $('#signin-error').textContent = err || '';
  $('#token').focus();
}

$('#signin-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const t = $('#token').value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN, t);
  $('#token').value = '';
  $('#signin').hidden = true;
  connect();
});

$('#signout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN);
  if (ctl) ctl.abort();
  showSignin();
});

connect();
