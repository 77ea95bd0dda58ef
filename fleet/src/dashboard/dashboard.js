// Ferry fleet dashboard: reads the console's JSON API, listens to its
// server-sent events and re-reads what changed. No libraries, nothing
// fetched from elsewhere (it runs on air-gapped plant networks).
'use strict';

(() => {
  /** Changes arriving together are read once, after this pause. */
  const DEBOUNCE_MS = 300;
  /** Without the event stream, everything is re-read this often. */
  const POLL_MS = 5000;
  /** Even with the stream, the table is re-read this often: rates slide. */
  const REFRESH_MS = 30000;
  /** Minutes the request and error bars cover. */
  const SPARK_MINUTES = 30;
  /** Drift windows per device in the heat map. */
  const HEAT_WINDOWS = 12;
  /** Events in the list. */
  const EVENTS = 50;
  /** Drift statistics that are p-values: drift when *below* the threshold. */
  const P_VALUES = new Set(['ks', 'chi2']);

  const PARTS = ['devices', 'drift', 'events', 'rollouts', 'releases'];
  const $ = (id) => document.getElementById(id);

  // --- tiny DOM helper: never innerHTML, so reported strings stay text ---
  function el(tag, attrs, ...children) {
    const svg = ['svg', 'rect', 'line', 'title'].includes(tag);
    const node = svg
      ? document.createElementNS('http://www.w3.org/2000/svg', tag)
      : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.setAttribute('class', v);
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // --- formatting ---
  function fmtTime(ms) {
    if (!ms) return '–';
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }
  function fmtDateTime(ms) {
    return ms ? new Date(ms).toLocaleString([], { hour12: false }) : '';
  }
  function fmtAgo(seconds) {
    if (seconds === null || seconds === undefined) return 'never';
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }
  function fmtRate(r) {
    return r < 10 ? r.toFixed(1) : Math.round(r).toLocaleString();
  }
  function fmtPercent(x, digits = 1) {
    return `${(x * 100).toFixed(digits)}%`;
  }
  function fmtStat(v) {
    if (v === null || v === undefined) return '–';
    if (v === 0) return '0';
    if (Math.abs(v) < 0.01) return v.toExponential(0).replace('e-', 'e−');
    return Number(v.toPrecision(2)).toString();
  }
  function bundleText(b) {
    return b ? `${b.name} ${b.version}` : 'none';
  }
  function updateText(u) {
    if (!u || u.state === 'idle') return 'idle';
    switch (u.state) {
      case 'downloading': {
        const pct = u.total ? ` ${Math.floor((100 * u.received) / u.total)}%` : '';
        return `downloading ${u.version}${pct}`;
      }
      case 'rejected': return `rejected ${u.version}: ${u.code}`;
      default: return `${u.state} ${u.version || ''}`.trim();
    }
  }

  // --- state ---
  const view = {
    fleet: null, // the last /api/devices answer
    fetchedAt: 0, // Date.now() when it arrived
    drift: [],
    events: [],
    rollouts: null, // null: the console has no /api/rollouts
    releases: null, // null: the console has no release registry
    session: null, // the /api/session answer: name, role, csrf
    reviews: {}, // release id -> its /api/releases/{id} answer
  };
  const ROLES = ['viewer', 'operator', 'approver', 'admin'];

  async function getJson(url) {
    const r = await fetch(url, { cache: 'no-store', headers: { Accept: 'application/json' } });
    // The session ended (expired, logged out elsewhere, token revoked).
    if (r.status === 401) { window.location.assign('/login'); throw new Error('logged out'); }
    if (r.status === 404) return undefined;
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  }

  // --- devices and header ---
  function sparkline(rates, nowMs, errors) {
    const minute = 60000;
    const end = Math.floor(nowMs / minute) * minute;
    const values = new Array(SPARK_MINUTES).fill(0);
    for (const b of rates || []) {
      const i = SPARK_MINUTES - 1 - Math.round((end - Math.floor(b.start_ms / minute) * minute) / minute);
      if (i >= 0 && i < SPARK_MINUTES) values[i] += errors ? b.errors : b.predictions + b.errors;
    }
    const peak = Math.max(...values);
    const w = 2;
    const gap = 1;
    const h = 18;
    const label = errors
      ? `Errors per minute, last ${SPARK_MINUTES} minutes: peak ${peak}`
      : `Requests per minute, last ${SPARK_MINUTES} minutes: peak ${peak}`;
    const svg = el('svg', {
      class: 'spark', width: SPARK_MINUTES * (w + gap), height: h, role: 'img', 'aria-label': label,
      viewBox: `0 0 ${SPARK_MINUTES * (w + gap)} ${h}`,
    }, el('title', { text: label }));
    svg.append(el('line', { class: 'base', x1: 0, x2: SPARK_MINUTES * (w + gap), y1: h - 0.5, y2: h - 0.5 }));
    values.forEach((v, i) => {
      if (!v) return;
      const bh = Math.max(1, Math.round((v / peak) * (h - 2)));
      svg.append(el('rect', { class: errors ? 'bar err' : 'bar', x: i * (w + gap), y: h - bh, width: w, height: bh }));
    });
    return svg;
  }

  function deviceRow(d, nowMs) {
    const dropped = Object.values(d.dropped || {}).reduce((a, b) => a + b, 0);
    const droppedDetail = Object.entries(d.dropped || {}).map(([k, v]) => `${k}: ${v}`).join(', ');
    const drifting = d.drifted_features.length > 0;
    let driftCell;
    if (!d.drift) driftCell = el('span', { class: 'none', text: 'no report yet' });
    else if (!drifting) driftCell = el('span', { class: 'none', text: 'none' });
    else driftCell = d.drifted_features.map((f) => el('span', { class: 'feature drifted', text: f }));
    const rate = d.rate || { requests_per_min: 0, error_rate: 0, requests: 0 };
    return el('tr', { 'data-device': d.device, class: drifting ? 'drifting' : undefined },
      el('th', { scope: 'row' }, d.device, el('span', { class: 'sub', text: d.agent_version ? `agent ${d.agent_version}` : '' })),
      el('td', {}, el('span', { class: `badge ${d.online ? 'online' : 'offline'}`, text: d.online ? 'online' : 'offline' })),
      el('td', { class: 'bundle', title: d.bundle ? `digest ${d.bundle.digest}\nchannel ${d.bundle.channel}` : undefined },
        bundleText(d.bundle), d.bundle ? el('span', { class: 'sub', text: `sequence ${d.bundle.sequence}` }) : null),
      el('td', { class: `update update-${(d.update && d.update.state) || 'idle'}`, title: d.update && d.update.reason }, updateText(d.update)),
      el('td', { class: 'num' }, fmtRate(rate.requests_per_min), sparkline(d.rates, nowMs, false)),
      el('td', { class: `num${rate.error_rate > 0.01 ? ' warn' : ''}` },
        rate.requests ? fmtPercent(rate.error_rate) : '–', sparkline(d.rates, nowMs, true)),
      el('td', { class: 'num' }, (d.backlog || 0).toLocaleString()),
      el('td', { class: `num${dropped ? ' warn' : ''}`, title: droppedDetail || undefined }, dropped.toLocaleString()),
      el('td', { class: 'last-seen', 'data-seconds': d.last_seen_s, title: fmtDateTime(d.last_seen_ms) }, fmtAgo(d.last_seen_s)),
      el('td', { class: 'drift' }, driftCell),
    );
  }

  function renderDevices() {
    const f = view.fleet;
    if (!f) return;
    $('fleet-name').textContent = f.fleets.join(', ');
    document.title = f.fleets.length ? `Ferry fleet ${f.fleets.join(', ')}` : 'Ferry fleet';
    $('count-devices').textContent = f.counts.devices;
    $('count-online').textContent = f.counts.online;
    $('count-drifting').textContent = f.counts.drifting;
    $('count-drifting').parentElement.classList.toggle('nonzero', f.counts.drifting > 0);
    const body = $('devices').tBodies[0];
    if (!f.devices.length) return;
    body.replaceChildren(...f.devices.map((d) => deviceRow(d, f.now_ms)));
  }

  /** Re-ages "last seen" between reads without asking the server. */
  function tickLastSeen() {
    const since = (Date.now() - view.fetchedAt) / 1000;
    for (const td of document.querySelectorAll('#devices td.last-seen[data-seconds]')) {
      td.textContent = fmtAgo(Number(td.dataset.seconds) + since);
    }
  }

  // --- drift heat map ---
  /** How close a value is to its threshold: 1 at the threshold, above 1 beyond it. */
  function severity(f) {
    if (f.value === null || f.value === undefined) return null;
    if (P_VALUES.has(f.method)) return f.threshold / Math.max(f.value, 1e-12);
    return f.threshold > 0 ? f.value / f.threshold : 0;
  }
  function ruleText(f) {
    return `${f.method} ${P_VALUES.has(f.method) ? '<' : '>'} ${f.threshold}`;
  }

  function renderDrift() {
    const table = $('heatmap');
    const byDevice = new Map();
    for (const p of view.drift) {
      if (!byDevice.has(p.device)) byDevice.set(p.device, []);
      byDevice.get(p.device).push(p.record);
    }
    // As many columns as the device with the most windows has.
    const columns = Math.max(1, ...[...byDevice.values()].map((w) => Math.min(w.length, HEAT_WINDOWS)));
    const head = el('tr', {}, el('th', { scope: 'col', text: 'Device' }), el('th', { scope: 'col', text: 'Feature' }),
      el('th', { scope: 'col', text: 'Rule' }));
    for (let i = columns - 1; i >= 0; i--) {
      head.append(el('th', { scope: 'col', class: 'num', title: i ? `${i} windows before the latest` : 'the latest window', text: i ? `−${i}` : 'latest' }));
    }
    table.tHead.replaceChildren(head);
    const rows = [];
    for (const device of [...byDevice.keys()].sort()) {
      const windows = byDevice.get(device).slice(-HEAT_WINDOWS);
      const latest = windows[windows.length - 1];
      const features = latest.features.map((f) => f.name);
      features.forEach((name, fi) => {
        const current = latest.features[fi];
        const tr = el('tr', {
          'data-device': device, 'data-feature': name,
          class: [current.drifted ? 'drifted' : '', fi === 0 ? 'device-start' : ''].join(' ').trim() || undefined,
        });
        if (fi === 0) tr.append(el('th', { scope: 'rowgroup', rowspan: features.length, text: device }));
        tr.append(el('th', { scope: 'row', class: 'feature-name', text: name }));
        tr.append(el('td', { class: 'rule', text: ruleText(current) }));
        for (let pad = windows.length; pad < columns; pad++) tr.append(el('td', { class: 'cell pad' }));
        for (const w of windows) {
          const f = w.features.find((x) => x.name === name);
          tr.append(heatCell(device, w, f));
        }
        rows.push(tr);
      });
    }
    if (!rows.length) {
      rows.push(el('tr', { class: 'empty' }, el('td', { colspan: columns + 3, text: 'No drift window reported yet.' })));
    }
    table.tBodies[0].replaceChildren(...rows);
  }

  function heatCell(device, w, f) {
    if (!f) return el('td', { class: 'cell missing', title: 'not measured in this window', text: '–' });
    const s = severity(f);
    let cls = 'cell';
    if (f.drifted) cls += ' drifted';
    else if (s === null) cls += ' missing';
    else cls += s < 0.5 ? ' level-0' : s < 0.8 ? ' level-1' : ' level-2';
    const title = [
      `${device} · ${f.name}`,
      `${f.method} = ${f.value === null ? 'no usable values' : f.value} (threshold ${f.threshold})${f.drifted ? ' — DRIFTED' : ''}`,
      f.psi !== null && f.psi !== undefined && f.method !== 'psi' ? `psi = ${f.psi}` : null,
      `window from ${fmtDateTime(w.window_start_ms)} to ${fmtDateTime(w.ts_ms)}, ${w.rows} rows, bundle ${w.bundle_version}`,
    ].filter(Boolean).join('\n');
    return el('td', { class: cls, title }, f.drifted ? `▲ ${fmtStat(f.value)}` : fmtStat(f.value));
  }

  // --- events ---
  function describe(r) {
    switch (r.event) {
      case 'started': return ['agent started', `agent ${r.agent_version}, bundle ${bundleText(r.bundle)}`, false];
      case 'update_installed': return ['update installed', `${bundleText(r.bundle)} (sequence ${r.bundle.sequence})${r.previous ? `, was ${r.previous.version}` : ''}`, false];
      case 'update_rejected': return ['update rejected', `${r.version}: ${r.code} (${r.reason})`, true];
      case 'rolled_back': return ['rolled back', `${r.from ? r.from.version : '?'} → ${r.to.version}, ${r.automatic ? 'automatic' : 'by an operator'}: ${r.reason}`, true];
      case 'drift_alert': return ['drift alert', `${r.features.join(', ')} (${fmtPercent(r.share, 0)} of features${r.dataset_drifted ? ', data set drifted' : ''}), bundle ${r.bundle_version}`, true];
      case 'shadow_report': return ['shadow report', `${r.candidate.version} vs ${r.active.version}: ${r.compared} compared, agreement ${r.top1_agreement === null ? '–' : fmtPercent(r.top1_agreement)}, ${r.candidate_errors} candidate errors`, false];
      case 'command_rejected': return ['command refused', `${r.command_id}: ${r.reason}`, true];
      default: return [String(r.event).replace(/_/g, ' '), JSON.stringify(r), false];
    }
  }

  function renderEvents() {
    const list = $('events');
    if (!view.events.length) {
      list.replaceChildren(el('li', { class: 'empty', text: 'No events yet.' }));
      return;
    }
    list.replaceChildren(...view.events.slice().reverse().map((e) => {
      const [what, detail, warn] = describe(e.record);
      return el('li', { class: warn ? 'warn' : undefined, 'data-event': e.record.event },
        el('time', { datetime: new Date(e.record.ts_ms).toISOString(), title: fmtDateTime(e.record.ts_ms), text: fmtTime(e.record.ts_ms) }),
        el('span', { class: 'who', text: e.device }),
        el('span', { class: 'what' }, what, el('span', { class: 'detail' }, ` — ${detail}`)));
    }));
  }

  // --- rollouts (served by the rollout part of the console, when present) ---
  function rolloutFinished(r) {
    const p = r && r.phase && r.phase.phase;
    return p === 'done' || p === 'aborted';
  }

  function renderRollouts() {
    const box = $('rollouts-body');
    const list = view.rollouts;
    if (!Array.isArray(list) || !list.length) {
      box.replaceChildren(el('p', { class: 'empty', text: 'No rollouts.' }));
      return;
    }
    const rows = list.slice().reverse().map((r) => {
      const spec = r.spec || {};
      const targets = Object.values(r.targets || {});
      const running = targets.filter((t) => t.state === 'running').length;
      const phase = (r.phase && r.phase.phase) || '?';
      const p = r.phase || {};
      const detail = (r.paused ? `paused by ${r.paused.by}` : null)
        || p.reason
        || (p.until_ms ? `until ${fmtTime(p.until_ms)}` : null)
        || (typeof p.index === 'number' ? `wave ${p.index + 1} of ${(spec.waves || []).length || '?'}` : null);
      return el('tr', { 'data-rollout': r.id },
        el('th', { scope: 'row' }, el('code', { text: r.id || '?' }), el('span', { class: 'sub', text: fmtDateTime(r.created_ms) })),
        el('td', {}, spec.bundle ? `${bundleText(spec.bundle)} (sequence ${spec.bundle.sequence})` : '?'),
        el('td', {}, el('span', { class: 'phase', text: phase }), detail ? el('span', { class: 'sub', text: detail }) : null),
        el('td', {}, targets.length ? el('progress', { max: targets.length, value: running }) : null,
          targets.length ? `${running}/${targets.length} running` : '–',
          r.canaries ? el('span', { class: 'sub', text: `${r.canaries} canar${r.canaries === 1 ? 'y' : 'ies'}` }) : null),
        el('td', {}, (spec.abort_if || []).map((rule) => el('code', { class: 'sub', text: rule.text || JSON.stringify(rule) }))));
    });
    box.replaceChildren(el('table', {},
      el('thead', {}, el('tr', {}, ...['Rollout', 'Bundle', 'Phase', 'Progress', 'Abort if'].map((h) => el('th', { scope: 'col', text: h })))),
      el('tbody', {}, rows)));
  }

  // --- releases: the registry, and the approval of waiting ones ---
  function fmtBytes(n) {
    if (!n) return '–';
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }
  function short(id) {
    return (id || '').slice(0, 12);
  }
  function valueText(v) {
    return v === null || v === undefined ? '–' : (typeof v === 'string' ? v : JSON.stringify(v));
  }
  function mayApprove() {
    const s = view.session;
    return !!s && ROLES.indexOf(s.role) >= ROLES.indexOf('approver');
  }

  /** POSTs with the session's CSRF token; the answer's JSON, or throws its error. */
  async function post(url, body, contentType) {
    const r = await fetch(url, {
      method: 'POST',
      body,
      headers: { 'Content-Type': contentType, 'X-Ferry-CSRF': (view.session && view.session.csrf) || '' },
    });
    const answer = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(answer.error || `HTTP ${r.status}`);
    return answer;
  }

  function reviewBox(r, detail) {
    const rec = detail.view || detail;
    const review = rec.review || {};
    const parts = [el('h3', { text: `Review ${rec.name} ${rec.version} (sequence ${rec.sequence}, channel ${rec.channel})` })];
    parts.push(el('p', {}, `Submitted by ${rec.uploaded_by}, ${fmtDateTime(rec.first_seen_ms)}; signed by `,
      el('code', { text: (rec.signed_by || []).join(', ') || 'nobody' }), `; ${fmtBytes(rec.size_bytes)}.`));
    parts.push(el('h4', { text: detail.running_release
      ? `Changes from the running release ${short(detail.running_release)}`
      : 'Changes: the channel runs no release this console rolled out' }));
    const diff = detail.diff || [];
    if (detail.running_release) {
      parts.push(diff.length
        ? el('table', { class: 'diff' },
          el('thead', {}, el('tr', {}, ...['What', 'Running', 'This release'].map((h) => el('th', { scope: 'col', text: h })))),
          el('tbody', {}, diff.map((d) => el('tr', {}, el('td', {}, el('code', { text: d.path })),
            el('td', { text: valueText(d.running) }), el('td', { text: valueText(d.candidate) })))))
        : el('p', { text: 'No differences.' }));
    }
    parts.push(el('h4', { text: 'Lineage' }), el('pre', { text: JSON.stringify(rec.lineage, null, 1) }));
    const golden = review.golden || [];
    parts.push(el('h4', { text: `Golden examples (${golden.length}): checked by the packager before the builder signed, and by every device before it activates the release` }));
    if (golden.length) {
      parts.push(el('table', { class: 'golden' },
        el('thead', {}, el('tr', {}, ...['Example', 'Expects', 'Tolerance'].map((h) => el('th', { scope: 'col', text: h })))),
        el('tbody', {}, golden.map((g) => el('tr', {}, el('td', { text: g.name }), el('td', {}, el('code', { text: valueText(g.expected) })), el('td', { text: String(g.tolerance) }))))));
    }
    const baseline = review.baseline || [];
    parts.push(el('h4', { text: `Drift baseline (${baseline.length} features)` }));
    if (baseline.length) {
      parts.push(el('table', { class: 'baseline' },
        el('thead', {}, el('tr', {}, ...['Feature', 'Kind', 'Values', 'Statistics'].map((h) => el('th', { scope: 'col', text: h })))),
        el('tbody', {}, baseline.map((f) => el('tr', {}, el('td', { text: f.name }), el('td', { text: f.kind }), el('td', { text: String(f.n) }),
          el('td', { text: Object.entries(f.stats || {}).map(([k, v]) => `${k} ${fmtStat(v)}`).join(', ') }))))));
    }
    parts.push(el('p', {}, 'Bundle: ', el('a', { href: `/bundles/${rec.digest}.ferry`, download: `${rec.name}-${rec.version}.ferry`, text: `${rec.digest.slice(0, 12)}….ferry` }),
      ' — sign it with ', el('code', { text: `ferry approve ${rec.name}-${rec.version}.ferry --key APPROVER.key` }), '.'));
    if (rec.status === 'awaiting_approval' && mayApprove()) {
      const outcome = el('p', { class: 'outcome', role: 'status' });
      const file = el('input', { type: 'file', name: 'bundle', accept: '.ferry', 'aria-label': 'The bundle you signed' });
      const approve = el('form', { class: 'approve' }, el('label', {}, 'Your signed copy: ', file), el('button', { type: 'submit', text: 'Approve' }));
      approve.addEventListener('submit', async (e) => {
        e.preventDefault();
        if (!file.files.length) { outcome.className = 'outcome bad'; outcome.textContent = 'Choose the bundle you signed with ferry approve.'; return; }
        try {
          const bytes = await file.files[0].arrayBuffer();
          const done = await post(`/api/releases/${rec.release}/approve`, bytes, 'application/octet-stream');
          outcome.className = 'outcome'; outcome.textContent = `Approved by ${done.approved_by}.`;
          refresh('releases');
        } catch (err) { outcome.className = 'outcome bad'; outcome.textContent = `Refused: ${err.message}`; }
      });
      const reason = el('input', { type: 'text', name: 'reason', placeholder: 'Why (the builder reads it)', 'aria-label': 'Reason' });
      const reject = el('form', { class: 'reject' }, reason, el('button', { type: 'submit', text: 'Reject' }));
      reject.addEventListener('submit', async (e) => {
        e.preventDefault();
        try {
          await post(`/api/releases/${rec.release}/reject`, JSON.stringify({ reason: reason.value }), 'application/json');
          outcome.className = 'outcome'; outcome.textContent = 'Rejected.';
          refresh('releases');
        } catch (err) { outcome.className = 'outcome bad'; outcome.textContent = `Refused: ${err.message}`; }
      });
      parts.push(approve, reject, outcome);
    } else if (rec.status === 'awaiting_approval') {
      parts.push(el('p', { class: 'hint', text: 'An approver credential is needed to approve or reject it.' }));
    }
    return el('div', { class: 'review', 'data-review': rec.release }, parts);
  }

  let releasesShown = null;
  function renderReleases() {
    const box = $('releases-body');
    const list = view.releases;
    $('releases').hidden = list === null;
    // Unchanged: keep the page as it is (a file being chosen stays chosen).
    const shown = JSON.stringify([list, view.reviews]);
    if (shown === releasesShown) return;
    releasesShown = shown;
    if (!Array.isArray(list) || !list.length) {
      box.replaceChildren(el('p', { class: 'empty', text: 'No releases.' }));
      return;
    }
    const rows = list.map((v) => {
      const r = v.record || v;
      const last = (v.rollouts || []).slice(-1)[0];
      const people = r.approved_by ? `approved by ${r.approved_by}` : (r.rejection ? `rejected by ${r.rejection.by}: ${r.rejection.reason}` : '');
      return el('tr', { 'data-release': r.release, 'data-status': r.status },
        el('th', { scope: 'row' }, el('code', { text: short(r.release) }), el('span', { class: 'sub', text: fmtDateTime(r.first_seen_ms) })),
        el('td', {}, `${r.name} ${r.version}`, el('span', { class: 'sub', text: `sequence ${r.sequence}, ${r.channel}` })),
        el('td', {}, el('span', { class: 'status', text: (r.status || 'approved').replace('_', ' ') }), people ? el('span', { class: 'sub', text: people }) : null),
        el('td', { text: r.uploaded_by }),
        el('td', { class: 'num', text: String((v.running_on || []).length) }),
        el('td', { text: last ? `${last.id} ${last.phase}` : '–' }));
    });
    const waiting = list.filter((v) => (v.record || v).status === 'awaiting_approval');
    box.replaceChildren(
      el('table', {},
        el('thead', {}, el('tr', {}, ...['Release', 'Model', 'Status', 'Submitted by', 'Running on', 'Last rollout'].map((h) => el('th', { scope: 'col', text: h })))),
        el('tbody', {}, rows)),
      ...waiting.map((v) => {
        const id = (v.record || v).release;
        const detail = view.reviews[id];
        return detail ? reviewBox(v, detail) : el('p', { class: 'hint', text: `Loading the review of ${short(id)}…` });
      }));
  }

  // --- reading ---
  const loaders = {
    async devices() {
      const f = await getJson('/api/devices');
      if (!f) return;
      view.fleet = f;
      view.fetchedAt = Date.now();
      renderDevices();
    },
    async drift() {
      view.drift = (await getJson(`/api/drift?limit=${HEAT_WINDOWS}`)) || [];
      renderDrift();
    },
    async events() {
      view.events = (await getJson(`/api/events?limit=${EVENTS}`)) || [];
      renderEvents();
    },
    async rollouts() {
      const list = await getJson('/api/rollouts');
      view.rollouts = Array.isArray(list) ? list : null;
      $('rollouts').dataset.available = String(list !== undefined);
      renderRollouts();
    },
    async releases() {
      const list = await getJson('/api/releases');
      view.releases = Array.isArray(list) ? list : null;
      const waiting = (view.releases || []).map((v) => v.record || v).filter((r) => r.status === 'awaiting_approval');
      const details = await Promise.all(waiting.map((r) => getJson(`/api/releases/${r.release}`)));
      view.reviews = {};
      waiting.forEach((r, i) => { if (details[i]) view.reviews[r.release] = details[i]; });
      renderReleases();
    },
  };

  function problem(text) {
    const p = $('problem');
    p.hidden = !text;
    p.textContent = text || '';
  }

  async function load(parts) {
    const failures = [];
    await Promise.all(parts.map((p) => loaders[p]().catch((e) => failures.push(`${p}: ${e.message}`))));
    problem(failures.length ? `Cannot read from the console (${failures.join('; ')}). Retrying.` : '');
    if (!failures.length) {
      const now = new Date();
      $('updated').textContent = fmtTime(now.getTime());
      $('updated').setAttribute('datetime', now.toISOString());
    }
  }

  const pending = new Set();
  let debounce = null;
  function refresh(...parts) {
    parts.forEach((p) => pending.add(p));
    if (debounce) return;
    debounce = setTimeout(() => {
      debounce = null;
      const parts = [...pending];
      pending.clear();
      load(parts);
    }, DEBOUNCE_MS);
  }

  // --- live: server-sent events, polling when they fail ---
  let poller = null;
  function setMode(mode, text) {
    const c = $('connection');
    c.dataset.mode = mode;
    c.textContent = text;
  }
  function startPolling() {
    if (poller) return;
    setMode('polling', `Polling every ${POLL_MS / 1000} s`);
    poller = setInterval(() => load(PARTS), POLL_MS);
  }
  function stopPolling() {
    clearInterval(poller);
    poller = null;
  }

  const affects = {
    device: ['devices'],
    drift: ['drift', 'devices'],
    event: ['events', 'devices'],
    rollout: ['rollouts', 'releases'],
    release: ['releases'],
  };

  function connect() {
    if (!('EventSource' in window)) {
      startPolling();
      return;
    }
    const es = new EventSource('/api/stream');
    let wasDown = false;
    es.addEventListener('open', () => {
      stopPolling();
      setMode('live', 'Live');
      // Whatever changed while the stream was down.
      if (wasDown) refresh(...PARTS);
      wasDown = false;
    });
    es.addEventListener('change', (e) => {
      let change;
      try { change = JSON.parse(e.data); } catch { return; }
      refresh(...(affects[change.kind] || PARTS));
    });
    es.addEventListener('resync', () => refresh(...PARTS));
    es.addEventListener('error', () => {
      wasDown = true;
      startPolling();
      // A stream the server refused (not just dropped) is not retried by
      // the browser: try again later ourselves.
      if (es.readyState === EventSource.CLOSED) setTimeout(connect, REFRESH_MS);
    });
  }

  // --- the session: who is logged in, and logging out ---
  async function showSession() {
    const s = await getJson('/api/session');
    if (!s) return;
    view.session = s;
    $('user').textContent = `${s.name} (${s.role})`;
    $('logout').hidden = false;
    $('logout').addEventListener('click', async () => {
      // The CSRF token proves the request comes from this page.
      await fetch('/logout', { method: 'POST', headers: { 'X-Ferry-CSRF': s.csrf || '' } });
      window.location.assign('/login');
    });
  }

  async function start() {
    await showSession();
    await load(PARTS);
    document.body.dataset.state = 'ready';
    connect();
    setInterval(tickLastSeen, 1000);
    // The rollout part of the console may not announce its changes.
    setInterval(() => {
      if (Array.isArray(view.rollouts) && view.rollouts.some((r) => !rolloutFinished(r))) refresh('rollouts');
    }, POLL_MS);
    setInterval(() => refresh(...PARTS), REFRESH_MS);
  }

  start();
})();
