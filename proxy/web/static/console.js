// cachegate console: the dashboard's whole script. No framework, no build step, nothing
// from other origins; charts are SVG drawn here. Every call is a same-origin fetch with
// Content-Type: application/json and, once logged in, the session's secret in X-CSRF-Token
// (on every call: the session cookie alone opens nothing, since browsers send it to every
// port of this host). The secret comes only from the login answer and is kept in
// sessionStorage, which is this origin's (scheme, host and port) and this tab's only: a reload
// of the page stays logged in, a new tab logs in again.
// Data is only ever put into the page as text (textContent), never as markup, and every piece
// of it through `el`, which writes what a browser would show as nothing or use to reorder the
// text around it as an escape, and a backslash as `\\` (`shown`), and long values cut short
// (`clipped`).
"use strict";

const STATUS_COLORS = {
  HIT: "#2e9d57", STALE: "#7cc49a", UPDATING: "#1f7a8c", REVALIDATED: "#2463d6",
  MISS: "#e8890c", EXPIRED: "#c9a227", BYPASS: "#8a94a6", ERROR: "#c62828",
};
const STATUS_ORDER = ["HIT", "STALE", "UPDATING", "REVALIDATED", "EXPIRED", "MISS", "BYPASS", "ERROR"];
const WINDOW_POINTS = 300; // seconds charted (the server keeps 600)
const POLL_MS = 1000;
// A call the admin API has not answered by then is given up (AbortController), so that a hung
// admin process (stopped, or its API saturated) cannot hold the next poll forever.
const POLL_TIMEOUT_MS = 5000;
// What the operator asked for (inspect, purge, reload) may legitimately take long (a cluster's
// ack_timeout, a worker's 30 s to apply a reload): it gets longer.
const ACTION_TIMEOUT_MS = 120000;
// "not updating" is shown once the last successful update is older than this.
const STALE_MS = 5000;
const SVG_NS = "http://www.w3.org/2000/svg";

const SECRET_KEY = "cachegate.session";
// instance: the id of the admin process the points came from (/console/api/live's `instance`);
// lastUpdate: when the last poll succeeded (Date.now()), for the "not updating" warning.
const state = { csrf: null, seq: 0, instance: null, points: [], timer: null, staleTimer: null,
  lastUpdate: 0, clusterChecked: 0 };

const $ = (id) => document.getElementById(id);

// -- calls ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// A call the admin API did not answer in time (given up): it may still have been made.
class ApiTimeout extends Error {}

async function api(method, path, body, timeoutMs = POLL_TIMEOUT_MS) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  let response, data = null;
  try {
    response = await fetch(path, {
      method, headers, credentials: "same-origin", cache: "no-store", signal: abort.signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const type = response.headers.get("Content-Type") || "";
    if (type.includes("json")) data = await response.json();
  } catch (err) {
    if (abort.signal.aborted) {
      throw new ApiTimeout(`the admin API did not answer within ${Math.round(timeoutMs / 1000)} s`);
    }
    throw err;
  } finally {
    clearTimeout(timer);
  }
  if (!response.ok) {
    if (response.status === 401 && !path.startsWith("/console/api/login")) {
      // This tab had a session: another tab's login (or logout) replaced the browser's cookie.
      showLogin(state.csrf ? "this browser logged in again elsewhere (another tab or window), or "
        + "the session ended: log in again" : "");
    }
    throw new ApiError(response.status, data);
  }
  return data;
}

// -- formatting -------------------------------------------------------------------------------

function pct(x) { return x === null || x === undefined ? "–" : (x * 100).toFixed(1) + "%"; }
function num(x, digits = 1) {
  if (x === null || x === undefined) return "–";
  if (Math.abs(x) >= 1000) return Math.round(x).toLocaleString("en");
  return x.toFixed(digits);
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
function seconds(s) {
  if (s === null || s === undefined) return "–";
  const a = Math.abs(s);
  const text = a < 60 ? a.toFixed(a < 10 ? 1 : 0) + " s" : a < 3600 ? (a / 60).toFixed(1) + " min"
    : a < 86400 ? (a / 3600).toFixed(1) + " h" : (a / 86400).toFixed(1) + " d";
  return (s < 0 ? "−" : "") + text;
}
function sum(obj) { return Object.values(obj || {}).reduce((a, b) => a + b, 0); }

// -- text that clients and origins wrote ----------------------------------------------------------

// What a browser shows as nothing or as something else, or uses to reorder what follows it:
// controls (C0, DEL, C1: the set `cachegate top` replaces, proxy/shown.py), lone surrogates (shown
// as the same U+FFFD whatever they were), bidi controls (U+202A-202E, U+2066-2069, U+200E/200F,
// U+061C), line and paragraph separators, and the characters Unicode says to draw as nothing
// (Default_Ignorable_Code_Point: zero-width space, joiners, U+FEFF, soft hyphen, variation
// selectors...). With them a URL, a Vary value or a tag could pass for another: "acme", "acme"
// with a zero-width space and U+202E "emca" all read "acme".
const UNSEEN = /[\p{Cc}\p{Cs}\p{Bidi_Control}\p{Default_Ignorable_Code_Point}\u2028\u2029]/gu;
// ... and a backslash, which their escapes start with: written `\\`, so that the six characters
// `\u200b` as a client sent them (shown `\\u200b`) are told from a zero-width space (`\u200b`).
const ESCAPED = new RegExp(`\\\\|${UNSEEN.source}`, "gu");

function escaped(c) {
  if (c === "\\") return "\\\\";
  const n = c.codePointAt(0);
  const hex = (width) => n.toString(16).padStart(width, "0");
  return n < 0x100 ? "\\x" + hex(2) : n < 0x10000 ? "\\u" + hex(4) : "\\U" + hex(8);
}

// `text` with each such character written as an escape (`\u200b`, `\u202e`, `\x1b`) and each
// backslash as `\\`, as proxy/shown.py writes them. `backslash` false: text that writes its own
// backslashes as `\\` already (JSON.stringify's), where only the unseen characters are escaped.
function shown(text, backslash = true) { return String(text).replace(backslash ? ESCAPED : UNSEEN, escaped); }

// Cells and buttons show this much of a value (characters, escapes counted as written); the rest
// is left out and said: an 8 KB URL is one short row, not 3,500 px of text. The whole value stays
// the button's (what inspect looks up) and the cell's title.
const CLIP_CHARS = 200;

// shown(text), cut after CLIP_CHARS with "…(8,150 chars)": the length of the whole value, in
// characters (code points: an emoji is one, not its two UTF-16 units).
function clipped(text, backslash = true) {
  text = String(text);
  const pattern = backslash ? ESCAPED : UNSEEN;
  let out = "", count = 0;
  for (const c of text) { // by code point: never half a surrogate pair
    const s = c.match(pattern) ? escaped(c) : c; // (an escape is ASCII: one character a unit)
    const n = s === c ? 1 : s.length;
    if (count + n > CLIP_CHARS) return `${out}…(${Array.from(text).length.toLocaleString("en")} chars)`;
    out += s;
    count += n;
  }
  return out;
}

// -- small DOM helpers --------------------------------------------------------------------------

// Text goes in through `shown`: whatever a client or an origin wrote in it shows as written.
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = shown(text);
  if (cls) node.className = cls;
  return node;
}

// A node showing a value from a client or an origin (a URL, a Vary value, a tag): at most
// CLIP_CHARS of it, and the whole of it (shown) as its title when that was cut. `backslash`:
// as `shown`'s.
function data(node, value, backslash = true) {
  const text = clipped(value, backslash);
  node.textContent = text;
  if (text !== shown(value, backslash)) node.title = shown(value, backslash);
  return node;
}

function fillTable(id, rows) {
  const tbody = $(id).tBodies[0];
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
    return tr;
  }));
}

function td(text, cls) { return el("td", text, cls); }
function dataTd(value, cls, backslash = true) {
  return data(el("td", null, cls ? `${cls} data` : "data"), value, backslash);
}

// -- charts -----------------------------------------------------------------------------------

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function niceMax(x) {
  if (!(x > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

// series: [{name, color, values: [number|null, ...]}]; opts: {stacked, max, unit}
function drawChart(svg, series, opts) {
  const width = svg.clientWidth || 480;
  const height = svg.clientHeight || 170;
  const left = 44, right = 8, top = 8, bottom = 18;
  const w = width - left - right, h = height - top - bottom;
  const n = WINDOW_POINTS;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const stacks = [];
  let peak = 0;
  const base = new Array(n).fill(0);
  for (const s of series) {
    const lower = base.slice();
    const upper = s.values.map((v, i) => (opts.stacked ? base[i] : 0) + (v || 0));
    if (opts.stacked) for (let i = 0; i < n; i++) base[i] = upper[i];
    for (let i = 0; i < n; i++) if (s.values[i] !== null) peak = Math.max(peak, upper[i]);
    stacks.push({ s, lower, upper });
  }
  const max = opts.max || niceMax(peak);
  const x = (i) => left + (w * i) / (n - 1);
  const y = (v) => top + h - (h * Math.min(v, max)) / max;
  const nodes = [];
  for (const frac of [0, 0.5, 1]) {
    const yy = top + h - h * frac;
    nodes.push(svgEl("line", { x1: left, x2: left + w, y1: yy, y2: yy, class: "axis" }));
    const label = svgEl("text", { x: left - 4, y: yy + 3, "text-anchor": "end" });
    label.textContent = num(max * frac, max * frac < 10 && frac ? 1 : 0) + (opts.unit || "");
    nodes.push(label);
  }
  for (const [i, text] of [[0, "−5 min"], [Math.round((n - 1) / 2), "−2.5 min"], [n - 1, "now"]]) {
    const label = svgEl("text", { x: x(i), y: height - 4, "text-anchor": i === 0 ? "start" : i === n - 1 ? "end" : "middle" });
    label.textContent = text;
    nodes.push(label);
  }
  for (const { s, lower, upper } of stacks) {
    if (opts.stacked) {
      let d = "";
      for (let i = 0; i < n; i++) d += (i ? "L" : "M") + x(i).toFixed(1) + "," + y(upper[i]).toFixed(1);
      for (let i = n - 1; i >= 0; i--) d += "L" + x(i).toFixed(1) + "," + y(lower[i]).toFixed(1);
      nodes.push(svgEl("path", { d: d + "Z", fill: s.color, "fill-opacity": 0.85, stroke: "none" }));
    } else {
      let d = "", pen = false;
      for (let i = 0; i < n; i++) {
        if (s.values[i] === null || s.values[i] === undefined) { pen = false; continue; }
        d += (pen ? "L" : "M") + x(i).toFixed(1) + "," + y(s.values[i]).toFixed(1);
        pen = true;
      }
      nodes.push(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.6 }));
    }
  }
  svg.replaceChildren(...nodes);
}

function drawLegend(id, series, latest) {
  $(id).replaceChildren(...series.map((s) => {
    const item = el("span");
    const swatch = el("span", null, "swatch");
    swatch.style.background = s.color;
    item.append(swatch, `${s.name} ${latest ? latest(s) : ""}`);
    return item;
  }));
}

// Align points to the last WINDOW_POINTS seconds: index n-1 is the newest point.
function windowed(fn) {
  const pts = state.points.slice(-WINDOW_POINTS);
  const out = new Array(WINDOW_POINTS - pts.length).fill(null);
  for (let i = 0; i < pts.length; i++) out.push(fn(pts, i));
  return out;
}

function perSecond(key) {
  return windowed((pts, i) => pts[i][key] / (pts[i].dt || 1));
}

function rolling(i, pts, span, fn) {
  const from = Math.max(0, i - span + 1);
  return fn(pts.slice(from, i + 1));
}

// Client requests that count in ratios: PURGE is counted as a request, but is neither a hit,
// a miss nor offload (proxy/live.py NOT_IN_RATIOS).
const asked = (p) => sum(p.requests) - (p.requests.PURGE || 0);

function ratioSeries() {
  const make = (f) => windowed((pts, i) => rolling(i, pts, 10, f));
  const hit = make((ps) => {
    let all = 0, hits = 0;
    for (const p of ps) { all += asked(p); hits += (p.requests.HIT || 0) + (p.requests.STALE || 0) + (p.requests.UPDATING || 0); }
    return all ? (100 * hits) / all : null;
  });
  const reqOffload = make((ps) => {
    let all = 0, origin = 0;
    for (const p of ps) { all += asked(p); origin += p.origin; }
    return all ? Math.max(0, 100 * (1 - origin / all)) : null;
  });
  const byteOffload = make((ps) => {
    let all = 0, up = 0;
    for (const p of ps) { all += sum(p.bytes) - (p.bytes.none || 0); up += p.bytes.upstream || 0; }
    return all ? 100 * (1 - up / all) : null;
  });
  return [
    { name: "hit ratio", color: "#2e9d57", values: hit },
    { name: "request offload", color: "#2463d6", values: reqOffload },
    { name: "byte offload", color: "#e8890c", values: byteOffload },
  ];
}

function drawCharts() {
  const statuses = new Set();
  for (const p of state.points) for (const s of Object.keys(p.requests)) statuses.add(s);
  const order = [...STATUS_ORDER.filter((s) => statuses.has(s)), ...[...statuses].filter((s) => !STATUS_ORDER.includes(s)).sort()];
  const reqSeries = order.map((s) => ({
    name: s, color: STATUS_COLORS[s] || "#555",
    values: windowed((pts, i) => (pts[i].requests[s] || 0) / (pts[i].dt || 1)),
  }));
  drawChart($("chart-requests"), reqSeries, { stacked: true });
  drawLegend("legend-requests", reqSeries, (s) => num(s.values[s.values.length - 1] || 0) + "/s");

  const ratios = ratioSeries();
  drawChart($("chart-ratio"), ratios, { max: 100, unit: "%" });
  drawLegend("legend-ratio", ratios, (s) => {
    const v = s.values[s.values.length - 1];
    return v === null ? "" : v.toFixed(1) + "%";
  });

  const lat = [
    { name: "p50", color: "#2463d6", values: windowed((pts, i) => pts[i].p50) },
    { name: "p99", color: "#c62828", values: windowed((pts, i) => pts[i].p99) },
  ];
  drawChart($("chart-latency"), lat, {});
  drawLegend("legend-latency", lat);

  const fills = [
    { name: "fills/s", color: "#2e9d57", values: perSecond("fills") },
    { name: "evictions/s", color: "#c62828", values: perSecond("evictions") },
  ];
  drawChart($("chart-fills"), fills, {});
  drawLegend("legend-fills", fills);
}

// -- the numbers --------------------------------------------------------------------------------

function renderCards(live) {
  const recent = state.points.slice(-10);
  const dt = recent.reduce((a, p) => a + p.dt, 0);
  const n = recent.reduce((a, p) => a + sum(p.requests), 0);
  $("card-rps").textContent = dt ? num(n / dt) : "–";
  const m = live.last_minute;
  $("card-hit").textContent = pct(m.hit_ratio);
  $("card-hit-sub").textContent = `last minute · ${pct(live.since_start.hit_ratio)} since start`;
  $("card-offload").textContent = pct(m.request_offload);
  $("card-offload-sub").textContent = `requests · ${pct(m.byte_offload)} of bytes`;
  $("card-fills").textContent = m.seconds ? num(m.fills / m.seconds) : "–";
  $("card-evictions").textContent = `${m.evictions} evictions in the last minute`;
  const bar = (id, textId, tier) => {
    if (!tier) { $(textId).textContent = "off"; $(id).style.width = "0"; return; }
    const share = tier.budget ? Math.min(1, tier.bytes / tier.budget) : 0;
    $(id).style.width = (100 * share).toFixed(1) + "%";
    $(textId).textContent = `${bytes(tier.bytes)} of ${bytes(tier.budget)} (${(100 * share).toFixed(1)}%) · ${tier.entries} entries`;
  };
  bar("bar-memory", "card-memory", live.storage.memory);
  bar("bar-disk", "card-disk", live.storage.disk);
  const workers = live.workers ? `${live.workers} workers · ` : "";
  $("headline").textContent = `${workers}up ${seconds(live.uptime_seconds)} · ${sum(live.since_start.requests).toLocaleString("en")} requests since start`;
}

function renderTables(live) {
  fillTable("latency", Object.entries(live.latency).map(([status, l]) => [
    td(status), td(l.count, "num"), td(num(l.p50, 3), "num"), td(num(l.p90, 3), "num"), td(num(l.p99, 3), "num"),
  ]));
  fillTable("upstreams", live.upstreams.map((u) => {
    let stateText = u.available ? "up" : "down";
    if ("workers" in u) {  // --workers N: the state says in how many workers (GET /upstreams' top level)
      if (u.state !== "up") stateText += `: ${u.state}`;
    } else if (u.state && u.state !== "up" && u.state !== "down") stateText += ` (${u.state})`;
    return [dataTd(u.url, "url"), td(stateText, u.available ? "state-up" : "state-down"), td(u.in_flight, "num"),
      td(u.requests, "num"), td(u.failures, "num")];
  }));
  fillTable("top-urls", live.top_urls.map((u) => {
    const cell = td();
    const button = el("button", "inspect", "link");
    button.type = "button";
    button.addEventListener("click", () => inspect(u.url, ""));
    cell.append(button);
    return [dataTd(u.url, "url"), td(u.requests, "num"), td(pct(u.hit_ratio), "num"), cell];
  }));
  fillTable("not-stored", live.not_stored.map((r) => {
    const cell = td(null, "url data");
    const link = data(el("button", null, "link"), r.example);
    link.type = "button";
    link.addEventListener("click", () => inspect(r.example, ""));
    cell.append(link);
    return [data(td(), r.reason), td(r.count, "num"), cell];
  }));
}

// Forget the points drawn: they are another session's, or another process's.
function resetSeries() {
  state.points = [];
  state.seq = 0;
  state.instance = null;
}

async function poll() {
  try {
    let live = await api("GET", `/console/api/live?since=${state.seq}&top=15`);
    if ((state.instance !== null && live.instance !== state.instance) || live.seq < state.seq) {
      // cachegate restarted: its points are not a continuation of those held, and since=<old
      // seq> left out the new process's first ones. Start over from all of the new process's.
      resetSeries();
      live = await api("GET", `/console/api/live?since=0&top=15`);
    }
    state.instance = live.instance === undefined ? null : live.instance;
    const known = new Set(state.points.map((p) => p.seq));
    for (const p of live.points) if (!known.has(p.seq)) state.points.push(p);
    state.points = state.points.slice(-600);
    state.seq = live.seq;
    renderCards(live);
    renderTables(live);
    drawCharts();
    state.lastUpdate = Date.now();
    checkStale();
    if (Date.now() - state.clusterChecked > 5000) {
      state.clusterChecked = Date.now();
      pollCluster();
    }
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return;
    checkStale();
  }
  if (!$("dashboard").hidden) state.timer = setTimeout(poll, POLL_MS);
}

// Its own timer, not poll's: a poll that hangs must not keep the warning from showing.
function checkStale() {
  const age = Date.now() - state.lastUpdate;
  const stale = !$("dashboard").hidden && age > STALE_MS;
  $("stale").hidden = !stale;
  if (stale) {
    $("stale").textContent = state.lastUpdate
      ? `not updating: last update ${seconds(age / 1000)} ago` : "not updating";
  }
}

// GET /cluster exists only in cluster mode (and in versions that have it): shown when present.
async function pollCluster() {
  try {
    const cluster = await api("GET", "/cluster");
    const nodes = (cluster && cluster.nodes) || [];
    // lag: purges on the cluster's bus this node has not applied yet.
    fillTable("cluster", nodes.map((node) => [
      dataTd((node.node || node.name || "?") + (node.node === cluster.node ? " (this node)" : ""), "url"),
      td(node.state || "?", node.live === false || node.state === "gone" ? "state-down" : ""),
      td(node.lag === undefined || node.lag === null ? "–" : String(node.lag), "num"),
    ]));
    $("cluster-box").hidden = nodes.length === 0;
  } catch (err) {
    $("cluster-box").hidden = true;
  }
}

// -- inspect, purge, reload ---------------------------------------------------------------------

function parseHeaders(text) {
  const headers = {};
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const at = line.indexOf(":");
    if (at <= 0) throw new Error(`not a header line: ${line.trim()} (write "Name: value")`);
    const name = line.slice(0, at).trim();
    const value = line.slice(at + 1).trim();
    headers[name] = name in headers ? [].concat(headers[name], value) : value;
  }
  return headers;
}

async function inspect(url, headerText) {
  $("inspect-url").value = url;
  $("inspect-headers").value = headerText;
  $("inspect-error").textContent = "";
  $("inspect-result").hidden = true;
  let headers;
  try {
    headers = parseHeaders(headerText);
  } catch (err) {
    $("inspect-error").textContent = err.message;
    return;
  }
  try {
    const [stored, trace] = await Promise.all([
      api("GET", "/cache?url=" + encodeURIComponent(url), undefined, ACTION_TIMEOUT_MS),
      api("POST", "/explain", { url, headers }, ACTION_TIMEOUT_MS),
    ]);
    const d = trace.decision || {};
    const rule = trace.rule ? `rule ${trace.rule.name} (${trace.rule.where})` : "no rule";
    $("inspect-decision").replaceChildren(
      el("span", `${d.action || "?"} → X-Cache-Status: ${d.x_cache_status || "?"}; `),
      el("span", d.why || "", "data"), el("span", " · key "),
      data(el("span", null, "data"), trace.cache_key || "(none)"), el("span", ` · ${rule}`));
    fillTable("variants", variantRows(stored.variants));
    if (!stored.variants.length) fillTable("variants", [[td("nothing stored for this URL")]]);
    $("inspect-rules").replaceChildren(...(trace.rules || []).map((r) => {
      const item = el("li", `${r.name} (${r.where}): ${r.holds ? "holds" + (r.role ? " · " + r.role : "") : r.why}`);
      if (r.holds) item.className = "holds";
      return item;
    }));
    $("inspect-result").hidden = false;
  } catch (err) {
    $("inspect-error").textContent = err.message;
  }
}

// One row a stored variant. `hits` is the key's (memory-tier lookups of all its variants
// together: docs/admin-api.md), not the variant's: shown once per key, in a cell spanning its
// variants' rows, the largest of theirs (a variant held in no worker's memory says 0).
function variantRows(variants) {
  const byKey = new Map();
  for (const v of variants) byKey.set(v.key, [...(byKey.get(v.key) || []), v]);
  const rows = [];
  for (const group of byKey.values()) {
    group.forEach((v, i) => {
      const row = [
        // (null: the request that stored it did not send the field; a value is quoted, so that
        // a field sent as "null" is not read as absent. JSON.stringify writes a backslash and a
        // quote in it as \\ and \": its backslashes are not doubled again.)
        dataTd(Object.entries(v.vary).map(([k, x]) => `${k}: ${x === null ? "(absent)" : JSON.stringify(x)}`).join("; ") || "–",
          undefined, false),
        td(v.status, "num"),
        td(v.soft_purged ? "soft-purged" : v.fresh ? "fresh" : "stale"),
        td(seconds(v.age), "num"),
        td(seconds(v.ttl), "num"),
        dataTd(v.tags.join(" ") || "–"),
        td(bytes(v.size), "num"),
        td(v.tiers.join(", ")),
      ];
      if (i === 0) {
        const lookups = td(Math.max(...group.map((g) => g.hits || 0)), "num lookups");
        lookups.rowSpan = group.length;
        row.push(lookups);
      }
      rows.push(row);
    });
  }
  return rows;
}

async function purge(event) {
  event.preventDefault();
  const kind = $("purge-kind").value;
  const value = $("purge-value").value.trim();
  const soft = $("purge-soft").checked;
  $("purge-result").className = "";
  $("purge-result").textContent = "purging…";
  try {
    const answer = await api("POST", "/purge", { [kind]: [value], soft }, ACTION_TIMEOUT_MS);
    const purged = `purged ${answer.purged} ${answer.purged === 1 ? "entry" : "entries"}${answer.soft ? " (soft: marked stale)" : ""}`;
    const missing = answer.missing || [];
    if (missing.length) {
      // A 202 in cluster mode: the nodes named did not acknowledge within cluster.ack_timeout;
      // the count is that of the nodes that did.
      const on = Object.keys(answer.nodes || {});
      $("purge-result").className = "error";
      $("purge-result").textContent = `${purged}${on.length ? " on " + on.join(", ") : ""}; `
        + `not acknowledged by ${missing.join(", ")}: `
        + `${missing.length === 1 ? "it" : "they"} may still serve what was purged`;
    } else {
      $("purge-result").textContent = purged;
    }
  } catch (err) {
    $("purge-result").className = "error";
    $("purge-result").textContent = err.message
      + (err instanceof ApiTimeout ? ": the purge may or may not have been made (retrying it is safe)" : "");
  }
}

async function reload() {
  $("reload-result").className = "";
  $("reload-result").textContent = "reloading…";
  $("reload-problems").replaceChildren();
  try {
    const answer = await api("POST", "/reload", {}, ACTION_TIMEOUT_MS);
    const restart = answer.restart_required.length ? ` · needs a restart: ${answer.restart_required.join(", ")}` : "";
    const warnings = answer.warnings || [];
    const replaced = answer.replaced_workers || [];
    const notes = [warnings.length ? `${warnings.length} warning(s)` : "",
      replaced.length ? `${replaced.length} worker(s) replaced` : ""].filter(Boolean).join(", ");
    $("reload-result").textContent = `reloaded: ${answer.rules} rule(s) from ${answer.rule_files.length} file(s)${restart}`
      + (notes ? ` · ${notes}, below` : "");
    $("reload-problems").replaceChildren(...warnings.map((w) => el("li", w, "warning")),
      ...replaced.map((r) => el("li", replacedText(r), "warning")));
  } catch (err) {
    $("reload-result").className = "error";
    $("reload-result").textContent = err.message;
    const body = err.body || {};
    $("reload-problems").replaceChildren(...(body.problems || []).map((p) => el("li", p, "error")),
      ...(body.replaced_workers || []).map((r) => el("li", replacedText(r), "warning")));
  }
}

// A worker that ended during the reload (never confirmed it): its detail says who and why.
function replacedText(r) {
  return r.detail || `worker ${r.worker} (pid ${r.pid}) was replaced during the reload (${r.cause})`;
}

// -- session ------------------------------------------------------------------------------------

function keepSecret(secret) {
  state.csrf = secret || null;
  try {
    if (state.csrf) sessionStorage.setItem(SECRET_KEY, state.csrf);
    else sessionStorage.removeItem(SECRET_KEY);
  } catch (err) { /* storage switched off: this page keeps it in memory only */ }
}

function keptSecret() {
  try { return sessionStorage.getItem(SECRET_KEY); } catch (err) { return null; }
}

function showLogin(why = "") {
  clearTimeout(state.timer);
  $("stale").hidden = true;
  keepSecret(null);
  $("login-error").textContent = why;
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("token").focus();
}

function showDashboard(tokenRequired) {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("logout").hidden = !tokenRequired;
  clearTimeout(state.timer);
  state.lastUpdate = Date.now(); // "not updating" counts from here until the first answer
  poll();
}

async function login(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    const answer = await api("POST", "/console/api/login", { token: $("token").value });
    $("token").value = "";
    keepSecret(answer.csrf);
    resetSeries(); // a fresh login starts a fresh chart: the points held may be another process's
    showDashboard(answer.token_required);
  } catch (err) {
    $("login-error").textContent = err.status === 401 ? "wrong admin token" : err.message;
  }
}

async function logout() {
  try {
    await api("POST", "/console/api/logout", {});
  } finally {
    keepSecret(null);
    // A fresh page: nothing of the session's data stays on screen or in memory.
    window.location.reload();
  }
}

async function start() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("inspect-form").addEventListener("submit", (e) => { e.preventDefault(); inspect($("inspect-url").value.trim(), $("inspect-headers").value); });
  $("purge-form").addEventListener("submit", purge);
  $("reload-button").addEventListener("click", reload);
  window.addEventListener("resize", () => { if (!$("dashboard").hidden) drawCharts(); });
  state.staleTimer = setInterval(checkStale, 1000);
  try {
    state.csrf = keptSecret(); // a reload in this tab: the secret its login got
    const session = await api("GET", "/console/api/session");
    if (session.authenticated) showDashboard(session.token_required);
    else showLogin();
  } catch (err) {
    showLogin();
    $("login-error").textContent = "cannot reach the admin API: " + err.message;
  }
}

document.addEventListener("DOMContentLoaded", start);
