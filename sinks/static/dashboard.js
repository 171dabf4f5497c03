// chatpipe analytics dashboard: reads /api/v1/subaccounts/{sub}/analytics/* (docs/analytics.md) and draws
// every chart by hand as inline SVG or HTML bars. No dependencies, no network access beyond this origin.
// Every figure the page shows carries its raw value in a data-value attribute under a stable id.
"use strict";

(function () {
  const RANGES = { "2h": 2, "6h": 6, "24h": 24, "7d": 168, "30d": 720 };
  const HOUR = 3600e3, DAY = 24 * HOUR;
  const OUTCOMES = ["pending", "sent", "delivered", "read", "failed"];
  const PALETTE = ["#2f6fb3", "#e0892b", "#2f9e6e", "#8a5cc2", "#d2473f", "#2aa5b5", "#b5a02a", "#c2569b", "#6b7a8c", "#7aa84a"];
  const LIVE_SAMPLES = 30;
  const $ = (id) => document.getElementById(id);
  const app = $("app");
  const form = $("filters");
  let timer = null, generation = 0, samples = [], sampleKey = "";

  // ---- formatting -------------------------------------------------------------------------------
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const num = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const pct = (r, digits = 1) => (r === null || r === undefined ? "–" : (100 * r).toFixed(digits) + "%");
  const ratio = (a, b) => (b ? a / b : null);
  function dur(s) {
    if (s === null || s === undefined) return "–";
    if (s < 60) return (s < 10 ? s.toFixed(1) : s.toFixed(0)) + " s";
    if (s < 3600) return (s / 60).toFixed(s < 600 ? 1 : 0) + " min";
    if (s < 86400) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  const pad = (n) => String(n).padStart(2, "0");
  const isoZ = (d) => d.toISOString().replace(/\.\d{3}Z$/, "Z");
  function stamp(d, withDate = true) {
    const t = `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
    return withDate ? `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${t}` : t;
  }
  const localInput = (d) => isoZ(d).slice(0, 16);
  function fromInput(v) {
    if (!v) return null;
    const d = new Date(v.length === 16 ? v + ":00Z" : v);
    return isNaN(d) ? null : d;
  }
  function set(id, text, value) {
    const el = $(id);
    if (!el) return;
    el.textContent = text;
    el.dataset.value = value === null || value === undefined ? "" : String(value);
  }

  // ---- filters <-> URL --------------------------------------------------------------------------
  function readQuery() {
    const q = new URLSearchParams(location.search);
    const f = {
      sub: q.get("sub") || q.get("subAccountId") || "",
      channel: q.get("channel") || "",
      country: q.get("country") || "",
      range: q.get("range") || (q.get("since") ? "custom" : "24h"),
      since: q.get("since") || "",
      until: q.get("until") || "",
      granularity: q.get("granularity") === "day" ? "day" : "hour",
      refresh: q.has("refresh") ? q.get("refresh") : "15",
    };
    if (!(f.range in RANGES) && f.range !== "custom") f.range = "24h";
    return f;
  }
  function fillForm(f) {
    $("f-sub").value = f.sub;
    $("f-key").value = sessionStorage.getItem("chatpipe-api-key") || "";
    $("f-channel").value = f.channel;
    $("f-country").value = f.country;
    $("f-range").value = f.range;
    $("f-granularity").value = f.granularity;
    $("f-refresh").value = ["0", "5", "15", "60"].includes(String(f.refresh)) ? String(f.refresh) : "15";
    const since = fromInput(f.since), until = fromInput(f.until);
    if (since) $("f-since").value = localInput(since);
    if (until) $("f-until").value = localInput(until);
    form.classList.toggle("is-custom", f.range === "custom");
  }
  function formFilters() {
    const key = $("f-key").value;  // kept in this tab's sessionStorage, never in the URL
    if (key) sessionStorage.setItem("chatpipe-api-key", key); else sessionStorage.removeItem("chatpipe-api-key");
    const country = $("f-country").value.trim();
    const f = {
      sub: $("f-sub").value.trim(),
      channel: $("f-channel").value,
      country: country.toLowerCase() === "unknown" ? "unknown" : country.toUpperCase(),
      range: $("f-range").value,
      since: "", until: "",
      granularity: $("f-granularity").value,
      refresh: $("f-refresh").value,
    };
    if (f.range === "custom") {
      const s = fromInput($("f-since").value), u = fromInput($("f-until").value);
      f.since = s ? isoZ(s) : "";
      f.until = u ? isoZ(u) : "";
    }
    return f;
  }
  function writeQuery(f) {
    const q = new URLSearchParams();
    for (const k of ["sub", "channel", "country", "range", "since", "until", "granularity", "refresh"]) {
      const custom = k === "since" || k === "until";
      if (f[k] && (!custom || f.range === "custom")) q.set(k, f[k]);
    }
    history.replaceState(null, "", "?" + q.toString());
  }
  // The hours the page asks for: a custom [since, until), or the last N hours up to the end of this hour.
  function window_(f, now) {
    if (f.range === "custom") {
      const s = fromInput(f.since), u = fromInput(f.until);
      if (s && u && s < u) return { since: s, until: u, live: u.getTime() > now };
    }
    const until = new Date(Math.floor(now / HOUR) * HOUR + HOUR);
    return { since: new Date(until.getTime() - RANGES[f.range in RANGES ? f.range : "24h"] * HOUR), until, live: true };
  }

  // ---- data -------------------------------------------------------------------------------------
  async function get(f, w, view, extra) {
    const q = new URLSearchParams({ since: isoZ(w.since), until: isoZ(w.until), ...extra });
    if (f.channel) q.set("channel", f.channel);
    if (f.country) q.set("country", f.country);
    const url = `/api/v1/subaccounts/${encodeURIComponent(f.sub)}/analytics/${view}?${q}`;
    const headers = { Accept: "application/json" };
    const key = sessionStorage.getItem("chatpipe-api-key");  // the read API's key, when it requires one
    if (key) headers.Authorization = `Bearer ${key}`;
    const r = await fetch(url, { headers, cache: "no-store" });
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error(`${view}: ${r.status} ${body && body.message ? body.message : r.statusText}`);
    return body;
  }
  async function load(f, w) {
    const g = f.granularity;
    const [total, series, fallback, deliver, read, errors, inbound, win, keys] = await Promise.all([
      get(f, w, "funnel", { granularity: "total" }),
      get(f, w, "funnel", { granularity: g }),
      get(f, w, "fallback", { granularity: "total" }),
      get(f, w, "latency", { granularity: "total", metric: "deliver" }),
      get(f, w, "latency", { granularity: "total", metric: "read" }),
      get(f, w, "errors", { granularity: "total", limit: "10" }),
      get(f, w, "inbound", { granularity: g }),
      get(f, w, "window", { granularity: "total" }),
      get(f, w, "funnel", { granularity: "total", groupBy: "channel,country" }),
    ]);
    return { total, series, fallback, deliver, read, errors, inbound, win, keys };
  }

  // ---- SVG helpers ------------------------------------------------------------------------------
  function buckets(w, g) {
    const step = g === "day" ? DAY : HOUR;
    const out = [];
    for (let t = Math.floor(w.since.getTime() / step) * step; t < w.until.getTime(); t += step) out.push(t);
    return out;
  }
  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  // How many grid steps divide `max` into whole numbers (counts are whole).
  function steps(max) {
    for (const n of [4, 5, 2]) if (Number.isInteger(max / n)) return n;
    return 1;
  }
  // Stacked bars over time: series = [{key, cls|color, label}], values = Map(bucketMs -> {key: n}).
  function stackedBars(times, series, values, g, yUnit) {
    const W = 420, H = 172, L = 40, R = 6, T = 14, B = 22;
    const totals = times.map((t) => series.reduce((a, s) => a + ((values.get(t) || {})[s.key] || 0), 0));
    const max = niceMax(Math.max(0, ...totals));
    const bw = (W - L - R) / Math.max(times.length, 1);
    const y = (v) => T + (H - T - B) * (1 - v / max);
    let svg = `<svg viewBox="0 0 ${W} ${H}" role="img">`;
    const n = steps(max);
    for (let i = 0; i <= n; i++) {
      const v = (max * i) / n, yy = y(v);
      svg += `<line class="grid-line" x1="${L}" x2="${W - R}" y1="${yy}" y2="${yy}"/>`;
      svg += `<text x="${L - 4}" y="${yy + 3.5}" text-anchor="end">${esc(num(Math.round(v * 100) / 100))}</text>`;
    }
    times.forEach((t, i) => {
      let acc = 0;
      const x = L + i * bw + Math.min(1, bw * 0.15), width = Math.max(bw - Math.min(2, bw * 0.3), 0.6);
      const v = values.get(t) || {};
      const tip = `${stamp(new Date(t))} UTC: ` + series.map((s) => `${s.label} ${num(v[s.key] || 0)}`).join(", ");
      svg += `<g><title>${esc(tip)}</title>`;
      for (const s of series) {
        const n = v[s.key] || 0;
        if (!n) continue;
        const y0 = y(acc + n), h = y(acc) - y0;
        acc += n;
        svg += `<rect x="${x.toFixed(2)}" y="${y0.toFixed(2)}" width="${width.toFixed(2)}" height="${Math.max(h, 0.5).toFixed(2)}" ${s.cls ? `class="${s.cls}"` : `fill="${s.color}"`}/>`;
      }
      svg += `</g>`;
    });
    svg += `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
    const every = Math.max(1, Math.ceil(times.length / 7));
    times.forEach((t, i) => {
      if (i % every) return;
      const d = new Date(t), x = L + (i + 0.5) * bw;
      const date = `${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
      const label = g === "day" ? date : times.length > 24 ? `${date} ${pad(d.getUTCHours())}h` : stamp(d, false);
      svg += `<line class="axis" x1="${x}" x2="${x}" y1="${H - B}" y2="${H - B + 3}"/><text x="${x}" y="${H - B + 13}" text-anchor="middle">${label}</text>`;
    });
    svg += `<text x="${W - R}" y="${T - 5}" text-anchor="end">x: UTC ${g === "day" ? "day" : "hour"} · y: ${esc(yUnit)}</text>`;
    return svg + "</svg>";
  }

  // ---- charts -----------------------------------------------------------------------------------
  function drawKpis(d) {
    const t = (d.total.data[0] || {});
    const messages = t.messages || 0, delivered = (t.delivered || 0) + (t.read || 0);
    set("kpi-messages", num(messages), messages);
    set("kpi-delivered-rate", pct(ratio(delivered, messages)), ratio(delivered, messages));
    set("kpi-delivered", `${num(delivered)} delivered or read`, delivered);
    set("kpi-read-rate", pct(ratio(t.read || 0, messages)), ratio(t.read || 0, messages));
    set("kpi-read", `${num(t.read || 0)} read`, t.read || 0);
    set("kpi-failed-rate", pct(ratio(t.failed || 0, messages)), ratio(t.failed || 0, messages));
    set("kpi-failed", `${num(t.failed || 0)} failed or undelivered`, t.failed || 0);
    // fallback by the path's first channel (what a channel filter means for fallback): of the messages
    // that started on it, how many fell back, and how many of those the fallback delivered
    const sum = (k) => (d.fallback.summary || []).reduce((a, s) => a + (s[k] || 0), 0);
    const started = sum("messages"), fell = sum("fellBack"), saved = sum("fellBackDelivered");
    set("kpi-fallback-rate", pct(ratio(fell, started)), ratio(fell, started));
    set("kpi-fallback", `${num(fell)} msgs · ${pct(ratio(saved, fell), 0)} saved`, fell);
    const w = d.win.data[0] || { inbound: 0, answered: 0 };
    set("kpi-window-rate", pct(ratio(w.answered, w.inbound)), ratio(w.answered, w.inbound));
    set("kpi-window", `${num(w.answered)} of ${num(w.inbound)} answered`, w.answered);
    const inbound = d.inbound.data.reduce((a, r) => a + r.count, 0);
    set("kpi-inbound", num(inbound), inbound);
    return { messages, inbound };
  }

  function drawFunnel(d) {
    const t = d.total.data[0] || {};
    const m = t.messages || 0;
    const stages = [
      ["messages", "Messages", m, "fill-accent", "#2f6fb3"],
      ["reached-sent", "Sent or later", (t.sent || 0) + (t.delivered || 0) + (t.read || 0), "", "#8db7e3"],
      ["delivered", "Delivered", (t.delivered || 0) + (t.read || 0), "", "#2f9e6e"],
      ["read", "Read", t.read || 0, "", "#1b6a4a"],
    ];
    if (!m) return `<p class="empty">No outbound messages in this range.</p>`;
    let h = `<div class="rows">`;
    for (const [key, label, n, , color] of stages) {
      h += `<div class="row" data-stage="${key}"><span class="name">${label}</span>` +
        `<span class="track"><span data-w="${(100 * n) / m}" data-bg="${color}"></span></span>` +
        `<span class="fig"><b id="funnel-${key}" data-value="${n}">${num(n)}</b> <small>${pct(n / m)}</small></span></div>`;
    }
    h += `</div><div class="stack" title="current outcome of every message">`;
    for (const o of OUTCOMES) if (t[o]) h += `<span class="bg-${o}" data-w="${(100 * t[o]) / m}" title="${o}: ${num(t[o])}"></span>`;
    h += `</div><div class="legend">`;
    for (const o of OUTCOMES) h += `<span><i class="bg-${o}"></i>${o} <b id="outcome-${o}" data-value="${t[o] || 0}">${num(t[o] || 0)}</b></span>`;
    h += `</div><p class="summary"><span>Final state reached: <b id="funnel-final" data-value="${t.final || 0}">${num(t.final || 0)}</b> (${pct(ratio(t.final || 0, m))}); each message counted once, in its current state.</span></p>`;
    return h;
  }

  function drawVolume(d, w, g) {
    const times = buckets(w, g);
    const values = new Map();
    for (const r of d.series.data) values.set(Date.parse(r.bucket), r);
    if (!d.series.data.length) return `<p class="empty">No outbound messages in this range.</p>`;
    const series = OUTCOMES.map((o) => ({ key: o, cls: `fill-${o}`, label: o }));
    let h = stackedBars(times, series, values, g, `msgs/${g}`);
    h += `<div class="legend">` + OUTCOMES.map((o) => `<span><i class="bg-${o}"></i>${o}</span>`).join("") + `</div>`;
    return h;
  }

  function histogram(lat, id, title) {
    const W = 420, H = 84, L = 40, R = 6, T = 12, B = 20;
    const n = lat ? lat.count : 0;
    let h = `<div class="lat" id="lat-${id}"><h4>${title} <span class="n">· <b id="lat-${id}-count" data-value="${n}">${num(n)}</b> messages</span></h4>`;
    h += `<div class="pcts">` + ["p50", "p90", "p99"].map((p) =>
      `<span>${p} <b id="lat-${id}-${p}" data-value="${lat && lat[p] !== null ? lat[p] : ""}">${dur(lat ? lat[p] : null)}</b></span>`).join("") + `</div>`;
    if (!n) return h + `<p class="empty small">No ${title.toLowerCase()} measured in this range.</p></div>`;
    // x: log10(seconds) from 10^-0.5 (the < 1 s bucket) to the largest bucket seen, at least 1 h
    const hist = lat.histogram;
    const lo = (b) => (b.bucket === 0 ? 0.71 : b.lowerSeconds);
    const hi = (b) => (b.upperSeconds === null ? b.lowerSeconds * 1.19 : b.bucket === 0 ? 1 : b.upperSeconds);
    const xmin = Math.log10(0.6), xmax = Math.max(Math.log10(3600), ...hist.map((b) => Math.log10(hi(b))));
    const x = (s) => L + ((Math.log10(s) - xmin) / (xmax - xmin)) * (W - L - R);
    const max = niceMax(Math.max(...hist.map((b) => b.count)));
    const y = (v) => T + (H - T - B) * (1 - v / max);
    let svg = `<svg viewBox="0 0 ${W} ${H}" role="img">`;
    const half = Number.isInteger(max / 2) ? [max / 2, max] : [max];
    for (const v of half) {
      svg += `<line class="grid-line" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/><text x="${L - 4}" y="${y(v) + 3.5}" text-anchor="end">${num(v)}</text>`;
    }
    for (const b of hist) {
      const x0 = x(lo(b)), x1 = x(hi(b));
      const range = b.upperSeconds === null ? `≥ ${dur(b.lowerSeconds)}` : b.bucket === 0 ? "< 1 s" : `${dur(b.lowerSeconds)} – ${dur(b.upperSeconds)}`;
      svg += `<rect class="${id === "read" ? "fill-read" : "fill-delivered"}" x="${x0.toFixed(2)}" y="${y(b.count).toFixed(2)}" width="${Math.max(x1 - x0 - 0.6, 0.8).toFixed(2)}" height="${(y(0) - y(b.count)).toFixed(2)}" data-bucket="${b.bucket}" data-count="${b.count}"><title>${esc(range)}: ${num(b.count)} messages</title></rect>`;
    }
    const marks = { p50: "#1c2430", p90: "#e0892b", p99: "#d2473f" };
    let freeFrom = -Infinity, row = 0;
    for (const [p, color] of Object.entries(marks)) {
      if (lat[p] === null) continue;
      const xx = x(Math.max(lat[p], 0.71));
      row = xx + 2 < freeFrom ? row + 1 : 0;  // a label that would overlap the previous one goes lower
      freeFrom = xx + 22;
      svg += `<line class="pct" stroke="${color}" x1="${xx}" x2="${xx}" y1="${T - 6}" y2="${H - B}"/><text class="m-${p}" x="${xx + 2}" y="${T - 2 + 10 * row}">${p}</text>`;
    }
    svg += `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
    for (const [s, label] of [[1, "1 s"], [10, "10 s"], [60, "1 min"], [600, "10 min"], [3600, "1 h"], [36000, "10 h"], [86400, "1 d"], [864000, "10 d"]]) {
      if (Math.log10(s) > xmax) break;
      svg += `<line class="axis" x1="${x(s)}" x2="${x(s)}" y1="${H - B}" y2="${H - B + 3}"/><text x="${x(s)}" y="${H - B + 13}" text-anchor="middle">${label}</text>`;
    }
    return h + svg + `</svg></div>`;
  }

  function drawLatency(d) {
    const one = (r) => (r.data[0] || null);
    return histogram(one(d.deliver), "deliver", "Time to deliver (first sent → delivered)") +
      histogram(one(d.read), "read", "Time to read (delivered → read)");
  }

  function drawFallback(d) {
    const rows = d.fallback.data.slice().sort((a, b) => b.messages - a.messages || a.path.localeCompare(b.path));
    if (!rows.length) return `<p class="empty">No outbound messages in this range.</p>`;
    const max = Math.max(...rows.map((r) => r.messages));
    const shown = rows.slice(0, 7);
    let h = `<div class="rows wide">`;
    for (const r of shown) {
      const ok = r.delivered + r.read;
      h += `<div class="row" data-path="${esc(r.path)}" data-messages="${r.messages}" data-delivered="${ok}">` +
        `<span class="name" title="${esc(r.path)}: ${r.steps} step${r.steps > 1 ? "s" : ""}">${esc(r.path.split(">").join(" › "))}</span>` +
        `<span class="track"><span class="bg-delivered" data-w="${(100 * ok) / max}"></span><span class="bg-failed" data-w="${(100 * r.failed) / max}"></span><span class="bg-sent" data-w="${(100 * (r.messages - ok - r.failed)) / max}"></span></span>` +
        `<span class="fig"><b>${num(r.messages)}</b> · ${pct(r.deliveredRate, 0)}</span></div>`;
    }
    h += `</div>`;
    if (rows.length > shown.length) h += `<p class="sub">+ ${rows.length - shown.length} more paths (${num(rows.slice(7).reduce((a, r) => a + r.messages, 0))} messages)</p>`;
    h += `<div class="legend"><span><i class="bg-delivered"></i>delivered/read</span><span><i class="bg-failed"></i>failed</span><span><i class="bg-sent"></i>pending/sent</span></div>`;
    h += `<div class="summary">`;
    for (const s of d.fallback.summary || []) {
      h += `<div data-first-channel="${esc(s.firstChannel)}" data-fell-back="${s.fellBack}" data-saved="${s.fellBackDelivered}"><span>from <b>${esc(s.firstChannel)}</b>: fell back ${num(s.fellBack)} of ${num(s.messages)} (${pct(s.fallbackRate)})</span><span>saved <b>${pct(s.fallbackSuccessRate)}</b></span></div>`;
    }
    return h + `</div>`;
  }

  function drawErrors(d) {
    const rows = d.errors.data;
    if (!rows.length) return `<p class="empty">No failed step with an error code in this range.</p>`;
    const max = Math.max(...rows.map((r) => r.count));
    let h = `<div class="rows wide">`;
    for (const r of rows) {
      const reason = r.reason || "not documented by 8x8";
      h += `<div class="row" data-code="${r.errorCode}" data-count="${r.count}" title="${esc(r.description || reason)}">` +
        `<span class="name"><b>${r.errorCode}</b> ${esc(reason)}</span>` +
        `<span class="track"><span class="bg-failed" data-w="${(100 * r.count) / max}"></span></span>` +
        `<span class="fig"><b>${num(r.count)}</b> · ${pct(r.share, 0)}</span></div>`;
    }
    return h + `</div>`;
  }

  function drawInbound(d, w, g) {
    const rows = d.inbound.data;
    if (!rows.length) return `<p class="empty">No inbound messages in this range.</p>`;
    const key = (r) => (r.interactiveType ? `${r.type}: ${r.interactiveType}` : r.type);
    const totals = new Map();
    for (const r of rows) totals.set(key(r), (totals.get(key(r)) || 0) + r.count);
    const kinds = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || a.localeCompare(b));
    const series = kinds.map((k, i) => ({ key: k, color: PALETTE[i % PALETTE.length], label: k }));
    const values = new Map();
    for (const r of rows) {
      const t = Date.parse(r.bucket), v = values.get(t) || {};
      v[key(r)] = (v[key(r)] || 0) + r.count;
      values.set(t, v);
    }
    let h = stackedBars(buckets(w, g), series, values, g, `msgs/${g}`);
    h += `<div class="legend">` + series.map((s) =>
      `<span data-type="${esc(s.key)}" data-count="${totals.get(s.key)}"><i data-bg="${s.color}"></i>${esc(s.key)} <b>${num(totals.get(s.key))}</b></span>`).join("") + `</div>`;
    return h;
  }

  function drawLive(totals, w, key) {
    const now = Date.now();
    if (key !== sampleKey) { samples = []; sampleKey = key; }
    if (!w.live) {
      set("kpi-live", "–", "");
      $("kpi-live-note").textContent = "range ends in the past";
      $("live-spark").innerHTML = "";
      return;
    }
    samples.push({ t: now, m: totals.messages, i: totals.inbound });
    const rates = [];
    for (let k = 1; k < samples.length; k++) {
      const dt = (samples[k].t - samples[k - 1].t) / 60e3;
      if (dt > 0) rates.push(Math.max(0, (samples[k].m - samples[k - 1].m) / dt));
    }
    while (rates.length > LIVE_SAMPLES) rates.shift();
    while (samples.length > LIVE_SAMPLES + 1) samples.shift();
    if (!rates.length) {
      set("kpi-live", "…", "");
      $("kpi-live-note").textContent = "measuring (next refresh)";
      return;
    }
    const last = rates[rates.length - 1];
    set("kpi-live", last < 10 ? last.toFixed(1) : num(Math.round(last)), last);
    const span = Math.round((samples[samples.length - 1].t - samples[0].t) / 1000);
    $("kpi-live-note").textContent = `msg/min · last ${span} s`;
    const max = Math.max(...rates, 1e-9);
    const pts = rates.map((r, k) => `${(120 * k) / Math.max(rates.length - 1, 1)},${(21 - (20 * r) / max).toFixed(1)}`).join(" ");
    $("live-spark").innerHTML = `<polyline points="${pts}"/>`;
  }

  // The filters offer the channels and countries seen in the range (next to the usual channels).
  function offerKeys(d) {
    const countries = [...new Set(d.keys.data.map((r) => r.country))].sort();
    $("countries").innerHTML = countries.map((c) => `<option value="${esc(c)}"></option>`).join("");
    const select = $("f-channel"), known = new Set([...select.options].map((o) => o.value));
    for (const c of new Set(d.keys.data.map((r) => r.channel))) {
      if (!known.has(c)) select.add(new Option(c, c));
    }
  }

  // Widths and colours of HTML bars are set through the CSSOM: the page's Content-Security-Policy
  // refuses inline style attributes.
  function applyStyles(root) {
    for (const el of root.querySelectorAll("[data-w]")) el.style.width = `${Math.max(0, Number(el.dataset.w))}%`;
    for (const el of root.querySelectorAll("[data-bg]")) el.style.background = el.dataset.bg;
  }

  // ---- refresh loop -----------------------------------------------------------------------------
  function status(text, error) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("error", !!error);
  }
  async function refresh() {
    const f = readQuery();
    const mine = ++generation;
    if (!f.sub) {
      app.dataset.state = "empty";
      status("Enter a subaccount to see its analytics.", false);
      return;
    }
    const w = window_(f, Date.now());
    const label = `<b>${esc(f.sub)}</b> · ${f.channel ? esc(f.channel) : "all channels"} · ${f.country ? esc(f.country) : "all countries"} · <b>${stamp(w.since)} – ${stamp(w.until)} UTC</b> (${f.granularity === "day" ? "daily" : "hourly"} buckets)`;
    app.dataset.state = app.dataset.state === "ready" ? "refreshing" : "loading";
    let d;
    try {
      d = await load(f, w);
    } catch (e) {
      if (mine !== generation) return;
      app.dataset.state = "error";
      status(`Could not load: ${e.message}`, true);
      return;
    }
    if (mine !== generation) return;
    $("range-line").innerHTML = label;
    const rangeText = `${stamp(w.since)} – ${stamp(w.until)} UTC${f.channel ? " · " + f.channel : ""}${f.country ? " · " + f.country : ""}`;
    for (const p of document.querySelectorAll(".card .sub.range")) p.textContent = rangeText;
    $("volume-unit").textContent = `messages / ${f.granularity}`;
    $("inbound-unit").textContent = `messages / ${f.granularity}`;
    const totals = drawKpis(d);
    $("funnel").innerHTML = drawFunnel(d);
    $("volume").innerHTML = drawVolume(d, w, f.granularity);
    $("latency").innerHTML = drawLatency(d);
    $("fallback").innerHTML = drawFallback(d);
    $("errors").innerHTML = drawErrors(d);
    $("inbound").innerHTML = drawInbound(d, w, f.granularity);
    applyStyles(app);
    offerKeys(d);
    drawLive(totals, w, JSON.stringify([f.sub, f.channel, f.country, isoZ(w.since)]));
    app.dataset.state = "ready";
    app.dataset.since = isoZ(w.since);
    app.dataset.until = isoZ(w.until);
    const now = new Date();
    status(`Updated ${stamp(now, false)}:${pad(now.getUTCSeconds())} UTC${Number(f.refresh) ? ` · every ${f.refresh} s` : ""}`, false);
  }
  function schedule() {
    clearInterval(timer);
    const every = Number(readQuery().refresh);
    if (every > 0) timer = setInterval(refresh, every * 1000);
  }

  // a key handed over in the link's fragment (#key=..., never sent to a server) moves to this tab's
  // sessionStorage and leaves the address bar
  const handed = new URLSearchParams(location.hash.slice(1)).get("key");
  if (handed) {
    sessionStorage.setItem("chatpipe-api-key", handed);
    history.replaceState(null, "", location.pathname + location.search);
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    writeQuery(formFilters());
    fillForm(readQuery());
    schedule();
    refresh();
  });
  $("f-range").addEventListener("change", () => form.classList.toggle("is-custom", $("f-range").value === "custom"));
  fillForm(readQuery());
  schedule();
  refresh();
})();
