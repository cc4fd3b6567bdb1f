// The sensor's web view: reads /api/v1/summary and /api/v1/checks (the endpoints `sensor top`
// reads) every few seconds while the tab is visible and draws everything as plain DOM and SVG.
// No library, no request anywhere but the daemon.
'use strict';
(function () {
  const REFRESH_MS = 5000;
  const PAGE = 25;
  // Rows of the recent-kills and recent-failures tables.
  const SHOW = 15;
  const SVGNS = 'http://www.w3.org/2000/svg';
  const state = { offset: 0, filter: '', timer: null, busy: false };

  const $ = (id) => document.getElementById(id);
  function h(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v);
    }
    for (const k of kids.flat()) {
      if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
    }
    return e;
  }
  function s(tag, attrs, ...kids) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) e.setAttribute(k, v);
    }
    for (const k of kids.flat()) {
      if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
    }
    return e;
  }
  const tip = (text) => s('title', {}, text);

  // Formatting.
  function secs(v) {
    if (v === null || v === undefined) return '-';
    if (v < 1) return (v * 1000).toFixed(v < 0.01 ? 1 : 0) + 'ms';
    return v.toFixed(2) + 's';
  }
  const pct = (v) => (v === null || v === undefined ? '-' : (v * 100).toFixed(1) + '%');
  function bytes(v) {
    if (v === null || v === undefined) return '-';
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : v) + ' ' + u[i];
  }
  function dur(v) {
    v = Math.floor(v);
    const d = Math.floor(v / 86400), hh = Math.floor((v % 86400) / 3600), m = Math.floor((v % 3600) / 60);
    if (d) return d + 'd ' + hh + 'h';
    if (hh) return hh + 'h ' + m + 'm';
    if (m) return m + 'm ' + (v % 60) + 's';
    return v + 's';
  }
  function clock(t) {
    const d = new Date(t * 1000);
    const now = new Date();
    const hms = d.toLocaleTimeString([], { hour12: false });
    return d.toDateString() === now.toDateString() ? hms : d.toISOString().slice(0, 10) + ' ' + hms;
  }
  const num = (v) => (Math.round(v * 100) / 100).toLocaleString();
  const short = (id) => (id ? id.slice(0, 12) : '');

  function workload(o) {
    // Kubernetes names when known, else the container and the cgroup path.
    if (o.namespace || o.pod || o.container) {
      return [o.namespace, o.pod, o.container].filter(Boolean).join('/');
    }
    const parts = [];
    if (o.pod_uid) parts.push('pod ' + short(o.pod_uid));
    if (o.container_id) parts.push('container ' + short(o.container_id));
    parts.push(o.cgroup || '(unknown cgroup)');
    return parts.join(' · ');
  }

  // A pod's owner ("Deployment ledger"), empty off Kubernetes.
  const owner = (o) => (o.owner_kind ? `${o.owner_kind} ${o.owner}` : '');

  function table(el, head, rows, empty) {
    el.replaceChildren();
    el.append(h('thead', {}, h('tr', {}, head.map((c) => h('th', { class: c.endsWith(' ') ? 'num' : null, scope: 'col' }, c.trim())))));
    const body = h('tbody');
    if (!rows.length) body.append(h('tr', {}, h('td', { colspan: head.length, class: 'muted' }, empty)));
    for (const r of rows) body.append(r);
    el.append(body);
  }

  // Charts: hand-drawn SVG. Every chart carries data-points (what it drew) for tests and tools.
  const W = 400, H = 120, L = 40, R = 6, T = 8, B = 18;
  function frame(maxY, fmtY, t0, t1, n) {
    const svg = s('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'data-points': n });
    svg.append(
      s('line', { class: 'axis', x1: L, y1: H - B, x2: W - R, y2: H - B }),
      s('line', { class: 'axis', x1: L, y1: T, x2: L, y2: H - B }),
      s('text', { x: L - 4, y: T + 8, 'text-anchor': 'end' }, fmtY(maxY)),
      s('text', { x: L - 4, y: H - B, 'text-anchor': 'end' }, fmtY(0)));
    if (t0 !== null) {
      svg.append(s('text', { x: L, y: H - 4 }, t0), s('text', { x: W - R, y: H - 4, 'text-anchor': 'end' }, t1));
    }
    return svg;
  }
  const nice = (v) => {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  };
  function empty(svg, text) {
    svg.append(s('text', { class: 'empty', x: (L + W) / 2, y: H / 2, 'text-anchor': 'middle' }, text));
    return svg;
  }

  // Lines over time: series = [{cls, name, pts: [[t, v], ...]}].
  function lines(series, fmtY, minMax) {
    const all = series.flatMap((x) => x.pts);
    const n = all.length;
    if (!n) return empty(frame(1, fmtY, null, null, 0), 'no samples yet');
    const ts = all.map((p) => p[0]);
    const t0 = Math.min(...ts), t1 = Math.max(...ts, t0 + 1);
    const maxY = nice(Math.max(minMax || 0, ...all.map((p) => p[1])));
    const svg = frame(maxY, fmtY, clock(t0), clock(t1), n);
    const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
    const y = (v) => H - B - (v / maxY) * (H - T - B);
    for (const ser of series) {
      if (!ser.pts.length) continue;
      const pl = s('polyline', { class: ser.cls, points: ser.pts.map((p) => x(p[0]).toFixed(1) + ',' + y(p[1]).toFixed(1)).join(' ') });
      pl.append(tip(ser.name));
      svg.append(pl);
      for (const p of ser.pts) {
        const c = s('circle', { class: 'pt ' + ser.cls, cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: 1.6 });
        c.append(tip(`${ser.name} ${fmtY(p[1])} at ${clock(p[0])}`));
        svg.append(c);
      }
    }
    return svg;
  }

  // Bars: values with labels; first and last label under the axis.
  function bars(values, labels, fmtY, what) {
    const n = values.length;
    const maxY = nice(Math.max(1, ...values));
    const svg = frame(maxY, fmtY, labels[0], labels[n - 1], values.filter((v) => v > 0).length);
    const bw = (W - L - R) / Math.max(n, 1);
    values.forEach((v, i) => {
      const bh = (v / maxY) * (H - T - B);
      const r = s('rect', { class: 'bar', x: (L + i * bw + bw * 0.1).toFixed(1), y: (H - B - bh).toFixed(1), width: (bw * 0.8).toFixed(1), height: bh.toFixed(1) });
      r.append(tip(`${labels[i]}: ${v} ${what}`));
      svg.append(r);
    });
    return svg;
  }

  // One check's runs: phases stacked per run, failed runs marked.
  function runs(points, window, now) {
    const maxY = nice(Math.max(0.001, ...points.map((p) => p[2])));
    const svg = frame(maxY, secs, clock(now - window), clock(now), points.length);
    if (!points.length) return empty(svg, 'no runs in this window');
    const t0 = now - window;
    const bw = Math.max(1.5, ((W - L - R) / 120) * 0.8);
    const x = (t) => L + ((t - t0) / window) * (W - L - R - bw);
    const sc = (v) => (v / maxY) * (H - T - B);
    for (const p of points) {
      const g = s('g', { class: p[1] ? 'run' : 'run failed' });
      g.append(tip(`${clock(p[0])} ${p[1] ? 'ok' : 'FAILED'} ${secs(p[2])}: dns ${secs(p[3])}, connect ${secs(p[4])}, tls ${secs(p[5])}, ttfb ${secs(p[6])}, transfer ${secs(p[7])}`));
      let base = H - B;
      const xs = x(p[0]).toFixed(1);
      for (let i = 0; i < 5; i++) {
        const hh = sc(p[3 + i]);
        if (hh <= 0) continue;
        base -= hh;
        g.append(s('rect', { class: 'p' + i, x: xs, y: base.toFixed(1), width: bw.toFixed(1), height: Math.max(hh, 0.5).toFixed(1) }));
      }
      const rest = sc(p[2]) - (H - B - base);
      if (rest > 0.5) {
        base -= rest;
        g.append(s('rect', { class: 'p3', opacity: 0.35, x: xs, y: base.toFixed(1), width: bw.toFixed(1), height: rest.toFixed(1) }));
      }
      if (!p[1]) g.append(s('rect', { class: 'fail', x: xs, y: T, width: bw.toFixed(1), height: 4 }));
      svg.append(g);
    }
    return svg;
  }

  // Header.
  function header(sum) {
    const host = sum.host;
    $('host').textContent = host.hostname;
    $('version').textContent = host.version;
    $('kernel').textContent = host.kernel;
    $('uptime').textContent = dur(host.uptime_seconds);
    $('updated').textContent = clock(sum.generated_at);
    document.title = (sum.problems.length ? '\u26a0 ' : '') + host.hostname + ' \u00b7 sensor';
    const probes = $('probes');
    probes.replaceChildren(...sum.probes.map((p) => h('div', { class: 'probe', title: p.reason || '' },
      h('b', {}, p.probe), h('span', { class: 'state-' + p.state }, p.state.toUpperCase()),
      h('div', { class: 'hooks' }, p.hooks.length
        ? p.hooks.map(([purpose, hook]) => `${purpose}: ${hook || 'NOT ATTACHED'}`).join(' · ')
        : (p.reason || 'no hooks')))));
    if (!sum.probes.length) probes.append(h('div', { class: 'probe' }, h('b', {}, 'kernel probes'), h('span', { class: 'muted' }, 'none (checks only)')));
    const lost = sum.lost;
    $('lost').textContent = 'Events lost: ' + num(lost.total) +
      (lost.by.length ? ' (' + lost.by.map((l) => `${l.probe} ${l.reason} ${num(l.count)}`).join(', ') + ')' : '');
    banner(sum.problems);
  }

  function banner(problems, extra) {
    const b = $('banner');
    const all = (extra ? [extra] : []).concat(problems || []);
    b.hidden = !all.length;
    b.replaceChildren();
    if (all.length) b.append(h('span', {}, 'Attention'), h('ul', {}, all.map((p) => h('li', {}, p))));
  }

  // Checks.
  const CHECK_HEAD = ['CHECK', 'TYPE', 'UP', 'AVAIL ', 'RUNS ', 'AVG ', 'MAX ', 'AVG TTFB ', 'MAX TTFB ', 'CODES', 'LAST ERROR'];
  function checkRow(c, w, withError) {
    w = w || {};
    const up = c.up === true ? h('span', { class: 'up' }, 'up') : c.up === false ? h('span', { class: 'down' }, 'DOWN') : h('span', { class: 'muted' }, '-');
    const codes = Object.entries(w.codes || {}).map(([k, v]) => `${k}:${v}`).join(' ');
    return h('tr', { 'data-check': c.name },
      h('td', { title: c.url }, c.name, c.alert_firing ? h('span', { class: 'firing', title: 'availability alert firing' }, 'ALERT') : null),
      h('td', {}, c.type), h('td', {}, up),
      h('td', { class: 'num' }, pct(w.availability)), h('td', { class: 'num' }, w.runs || 0),
      h('td', { class: 'num' }, secs(w.avg_response_seconds)), h('td', { class: 'num' }, secs(w.max_response_seconds)),
      h('td', { class: 'num' }, secs(w.avg_ttfb_seconds)), h('td', { class: 'num' }, secs(w.max_ttfb_seconds)),
      h('td', {}, codes), h('td', { class: 'err' }, withError ? ((c.last && c.last.error) || '') : ''));
  }

  function checks(rep) {
    const page = rep.page || { offset: 0, limit: PAGE, matched: rep.checks.length, counts: null };
    const c = page.counts;
    $('check-counts').textContent = c
      ? `${c.total} checks: ${c.up} up, ${c.down} down, ${c.pending} pending, ${c.firing} alerting; failing first. Down at availability \u2264 ${pct(rep.alerting ? rep.alerting.availability_threshold : null)} over ${dur(rep.alerting ? rep.alerting.window_seconds : 0)}.`
      : '';
    // This sensor is one vantage point: its location's view; the fleet's per-location view is
    // the central Prometheus's (location_check:sensor_check_availability:*, the checks dashboard).
    const v = rep.vantage || {};
    const out = v.sampled_out || [];
    $('check-vantage').textContent = `Availability from location ${v.location || '(none)'}` + (v.node ? `, node ${v.node}` : '') +
      (out.length ? `. Run by other nodes (sampled out here): ${out.join(', ')}.` : '.');
    const last = Math.min(page.offset + page.limit, page.matched);
    $('check-page').textContent = page.matched ? `${page.offset + 1}\u2013${last} of ${page.matched}` : '0 of 0';
    $('check-prev').disabled = page.offset <= 0;
    $('check-next').disabled = last >= page.matched;
    const none = c && c.total === 0 ? 'no checks configured' : 'no check matches';
    table($('checks-10m'), CHECK_HEAD, rep.checks.map((x) => checkRow(x, x.windows['10m'], true)), none);
    table($('checks-1h'), CHECK_HEAD.slice(0, -1), rep.checks.map((x) => {
      const r = checkRow(x, x.windows['1h'], false);
      r.lastChild.remove();
      return r;
    }), none);
    const charts = $('check-charts');
    const win = page.series_window_seconds || 600;
    charts.replaceChildren(...rep.checks.map((x) => h('figure', { 'data-check': x.name },
      h('figcaption', {}, h('b', {}, x.name), ' ', x.up === false ? h('span', { class: 'down' }, 'DOWN') : ''),
      runs(x.points || [], win, rep.generated_at))));
    const alerts = (rep.alerts || []).slice().reverse();
    $('alerts-count').textContent = `(${rep.alerts_total || alerts.length} in history, newest first${alerts.length < (rep.alerts_total || 0) ? ', ' + alerts.length + ' shown' : ''})`;
    const ol = $('alerts');
    ol.replaceChildren(...alerts.map((a) => h('li', { class: 'a-' + a.state }, a.message)));
    if (!alerts.length) ol.append(h('li', { class: 'muted' }, 'no alerts'));
  }

  // The limit a kill hit: its own, an ancestor's (the pod's, a slice's: named on hover) or none.
  function limitCell(k) {
    const hit = (k.lead_up || {}).limit_bytes ?? k.memory_limit_bytes;
    if (k.limit_scope === 'host') return h('td', { class: 'num' }, 'host');
    if (k.limit_scope === 'ancestor') {
      return h('td', { class: 'num', title: `the limit of ${k.limit_cgroup}` }, `${bytes(hit)} (ancestor)`);
    }
    return h('td', { class: 'num' }, bytes(hit));
  }

  // OOM kills.
  function oom(sum) {
    const o = sum.oom;
    const st = $('oom-status');
    st.replaceChildren();
    if (!o.running) {
      st.append(h('span', { class: 'muted' }, 'The OOM probe is not running on this daemon.'));
    } else {
      const unseen = o.unseen_total > 0
        ? h('span', { class: 'down' }, `cross-check: ${num(o.unseen_total)} kill(s) the kernel counted were not seen (${o.unseen.map((u) => `${u.source} ${u.cgroup || 'host'} ${num(u.count)}`).join(', ')})`)
        : h('span', { class: 'up' }, 'cross-check: every kill the kernel counted was seen');
      st.append(`${num(o.kills_total)} kill(s) since the sensor started \u00b7 `, unseen);
    }
    // Warnings before the kill that hold now.
    $('oom-imminent').replaceChildren(...(o.imminent || []).map((w) => h('li', {},
      `OOM imminent: ${workload(w)} grows ${bytes(w.growth_bytes_per_minute)}/min: the ${bytes(w.limit_bytes)} limit of ${w.limit_cgroup} (${w.limit_scope}) in ~${Math.round(w.projected_seconds)} s (${bytes(w.usage_bytes)} used)`)));
    const now = sum.generated_at;
    const lab = (n, width, f) => Array.from({ length: n }, (_, i) => f(now - (n - 1 - i) * width));
    const hm = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', hour12: false });
    const day = (t) => new Date(t * 1000).toISOString().slice(5, 10);
    $('oom-minute').replaceChildren(bars(o.per_minute, lab(60, 60, hm), (v) => String(v), 'kills'));
    $('oom-hour').replaceChildren(bars(o.per_hour, lab(24, 3600, hm), (v) => String(v), 'kills'));
    $('oom-day').replaceChildren(bars(o.per_day, lab(30, 86400, day), (v) => String(v), 'kills'));
    table($('oom-recent'), ['TIME', 'SCOPE', 'WORKLOAD', 'OWNER', 'VICTIM', 'RSS ', 'LIMIT ', 'TRIGGER'],
      o.recent.slice(0, SHOW).map((k) => h('tr', { 'data-seq': k.seq },
        h('td', {}, clock(k.time)), h('td', {}, k.scope),
        h('td', { class: 'wrap' }, workload(k)), h('td', { class: 'owner' }, owner(k)),
        h('td', {}, `${k.victim_comm || '?'} (pid ${k.victim_pid ?? '?'})`),
        h('td', { class: 'num' }, bytes(k.rss_bytes)), limitCell(k),
        h('td', {}, `${k.trigger_comm} (pid ${k.trigger_pid})`))),
      o.running ? 'no kills since the sensor started' : 'OOM probe not running');
  }

  // Memory pressure.
  function memory(sum) {
    const m = sum.memory;
    const psi = m.psi || [];
    $('psi').replaceChildren(lines([
      { cls: 'some', name: 'some', pts: psi.map((p) => [p[0], p[1]]) },
      { cls: 'full', name: 'full', pts: psi.filter((p) => p[2] !== null).map((p) => [p[0], p[2]]) },
    ], pct, 0.01));
    const none = m.running ? 'none so far' : 'memcg probe not running';
    table($('mem-reclaim'), ['WORKLOAD', 'RECLAIM TIME ', 'STALLS '],
      m.top_reclaim.map((r) => h('tr', {}, h('td', { class: 'wrap' }, workload(r)), h('td', { class: 'num' }, secs(r.value)), h('td', { class: 'num' }, num(r.count)))), none);
    table($('mem-max'), ['WORKLOAD', 'MAX EVENTS '],
      m.top_max_events.map((r) => h('tr', {}, h('td', { class: 'wrap' }, workload(r)), h('td', { class: 'num' }, num(r.value)))), none);
  }

  // TCP.
  const RESULTS = ['success', 'refused', 'timeout', 'reset', 'unreachable', 'error'];
  function tcp(sum) {
    const t = sum.tcp;
    const total = Object.values(t.totals).reduce((a, b) => a + b, 0);
    const failed = total - (t.totals.success || 0);
    $('tcp-status').textContent = t.running
      ? `${num(total)} connects since the sensor started, ${num(failed)} failed` + (failed ? ' (' + RESULTS.filter((r) => r !== 'success' && t.totals[r]).map((r) => `${r} ${num(t.totals[r])}`).join(', ') + ')' : '')
      : 'The TCP probe is not running on this daemon.';
    const seen = RESULTS.filter((r) => t.rate.some((p) => p[1][r] > 0) || t.totals[r] > 0);
    $('tcp-legend').replaceChildren(...seen.flatMap((r) => [h('i', { class: 'r-' + r }), r + ' ']));
    $('tcp-rate').replaceChildren(lines(seen.map((r) => ({ cls: 'r-' + r, name: r, pts: t.rate.map((p) => [p[0], p[1][r] || 0]) })),
      (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(v >= 10 ? 1 : 2)) + '/s', 1));
    const lat = t.latency.filter((b, i) => b[1] > 0 || t.latency.slice(0, i).some((x) => x[1] > 0));
    let last = lat.length;
    while (last > 0 && lat[last - 1][1] === 0) last--;
    const shown = lat.slice(0, last);
    $('tcp-latency').replaceChildren(shown.length
      ? bars(shown.map((b) => b[1]), shown.map((b) => (b[0] === null ? '> max' : '\u2264 ' + secs(b[0]))), (v) => num(v), 'connects')
      : empty(frame(1, String, null, null, 0), 'no connects yet'));
    const none = t.running ? 'no failures' : 'TCP probe not running';
    table($('tcp-dests'), ['DESTINATION', 'FAILURES ', 'CONNECTS '],
      t.top_destinations.map((d) => h('tr', {}, h('td', {}, d.destination), h('td', { class: 'num' }, num(d.failures)), h('td', { class: 'num' }, num(d.connects)))), none);
    table($('tcp-workloads'), ['WORKLOAD', 'FAILURES ', 'CONNECTS '],
      t.top_workloads.map((d) => h('tr', {}, h('td', { class: 'wrap' }, workload(d)), h('td', { class: 'num' }, num(d.failures)), h('td', { class: 'num' }, num(d.connects)))), none);
    $('tcp-failures-count').textContent = t.recent_failures.length > SHOW ? `(newest ${SHOW} of the last ${t.recent_failures.length})` : '';
    table($('tcp-failures'), ['TIME', 'RESULT', 'ADDRESS', 'PORT ', 'DESTINATION', 'PROCESS', 'WORKLOAD'],
      t.recent_failures.slice(0, SHOW).map((f) => h('tr', {},
        h('td', {}, clock(f.time)), h('td', { class: 'down' }, (f.count ?? 1) > 1 ? `${f.result} \u00d7${num(f.count)}` : f.result), h('td', {}, f.address), h('td', { class: 'num' }, f.port),
        h('td', {}, f.destination), h('td', {}, `${f.comm} (pid ${f.pid})`), h('td', { class: 'wrap' }, workload(f)))), none);
  }

  async function get(path) {
    const r = await fetch(path, { cache: 'no-store', credentials: 'same-origin' });
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  }

  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    try {
      const q = new URLSearchParams({ offset: state.offset, limit: PAGE, series: '10m', alerts: 100 });
      if (state.filter) q.set('q', state.filter);
      const [sum, rep] = await Promise.all([get('/api/v1/summary'), get('/api/v1/checks?' + q)]);
      header(sum);
      checks(rep);
      oom(sum);
      memory(sum);
      tcp(sum);
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
    } catch (e) {
      banner([], 'Cannot read the daemon: ' + e.message);
    } finally {
      state.busy = false;
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = null;
    const hidden = document.visibilityState === 'hidden';
    $('paused').hidden = !hidden;
    if (hidden) return;
    state.timer = setTimeout(async () => {
      await refresh();
      schedule();
    }, REFRESH_MS);
  }

  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') refresh().then(schedule);
    else schedule();
  });
  let typing = null;
  $('check-filter').addEventListener('input', (e) => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      state.filter = e.target.value.trim();
      state.offset = 0;
      refresh();
    }, 250);
  });
  $('check-prev').addEventListener('click', () => { state.offset = Math.max(0, state.offset - PAGE); refresh(); });
  $('check-next').addEventListener('click', () => { state.offset += PAGE; refresh(); });
  refresh().then(schedule);
})();
