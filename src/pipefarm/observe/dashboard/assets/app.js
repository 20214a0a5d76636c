"use strict";
// pipefarm's dashboard page: one run's overview, task stream, durations, failures and task
// pages. Live data comes from api/events (Server-Sent Events; api/snapshot when SSE fails);
// charts are inline SVG drawn here. No framework, nothing from a CDN.

const STATES = ["blocked", "ready", "claimed", "running", "succeeded", "failed", "skipped", "cancelled"];
const OUTCOMES = ["succeeded", "failed", "timed_out", "lost", "released", "stale", "running"];
const SVGNS = "http://www.w3.org/2000/svg";
const params = new URLSearchParams(location.search);
let token = params.get("token") || sessionStorage.getItem("pipefarm_token") || "";
let last = null;

function color(name) {
  return getComputedStyle(document.documentElement).getPropertyValue("--" + name).trim() || "#999";
}
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
}
function fmtS(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 0) + " ms";
  if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function n(x) { return (x || 0).toLocaleString(); }
function taskLink(id) { return el("a", {href: "#task/" + id, class: "task-link", "data-task": id, text: String(id)}); }

// --- overview ----------------------------------------------------------------------------------
function drawOverview(ov) {
  document.getElementById("run-name").textContent = last.run || ov.run;
  const live = document.getElementById("live");
  const left = ov.total - ov.done;
  live.textContent = ov.live ? "running" : left ? "not running" : "finished";
  live.className = "badge " + (ov.live ? "live" : left ? "" : "done");
  const counts = document.getElementById("counts");
  counts.textContent = "";
  for (const s of STATES) {
    const c = ov.counts[s] || 0;
    counts.append(el("span", {class: "count", id: "count-" + s, "data-state": s, "data-count": c},
      el("span", {class: "swatch", style: "background:" + color(s)}), s + " ", el("b", {text: n(c)})));
  }
  const w = 1000, h = 22;
  const bar = svg("svg", {viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", height: h, width: "100%", role: "img"});
  let x = 0;
  for (const s of ["succeeded", "failed", "skipped", "cancelled", "running", "claimed", "ready", "blocked"]) {
    const c = ov.counts[s] || 0;
    if (!c || !ov.total) continue;
    const bw = w * c / ov.total;
    bar.append(svg("rect", {x, y: 0, width: bw, height: h, fill: color(s)}, svg("title", {}, `${s}: ${n(c)}`)));
    x += bw;
  }
  const prog = document.getElementById("progress");
  prog.textContent = "";
  prog.append(el("p", {id: "done-line", text:
    `${n(ov.done)} of ${n(ov.total)} tasks done (${ov.total ? (100 * ov.done / ov.total).toFixed(1) : 0} %)`}), bar);
  document.getElementById("rate").textContent = ov.live
    ? `${ov.throughput_per_s.toFixed(2)} tasks/s over the last minute · ETA ${ov.eta_s === null ? "–" : fmtS(ov.eta_s)}`
    : left ? `${n(left)} task(s) left; not being run now` : "every task has ended";
}

function drawThroughput(series) {
  const box = document.getElementById("throughput");
  box.textContent = "";
  if (!series || series.length < 2) { box.append(el("p", {class: "muted", text: "no task has ended yet"})); return; }
  const w = 600, h = 120, pad = 28;
  const t0 = series[0][0], t1 = series[series.length - 1][0];
  const max = Math.max(1, ...series.map(p => p[1]));
  const step = (t1 - t0) / (series.length - 1) || 1;
  const X = t => pad + (w - pad - 4) * (t - t0) / ((t1 - t0) || 1);
  const Y = v => h - 16 - (h - 24) * v / max;
  const pts = series.map(p => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
  const g = svg("svg", {viewBox: `0 0 ${w} ${h}`, role: "img"});
  g.append(svg("text", {x: 2, y: 10, "font-size": 10, fill: "#777"}, `${(max / step).toFixed(1)} tasks/s`));
  g.append(svg("line", {x1: pad, x2: w, y1: h - 16, y2: h - 16, stroke: "#ccc"}));
  g.append(svg("polyline", {points: pts, fill: "none", stroke: color("running"), "stroke-width": 2}));
  g.append(svg("text", {x: pad, y: h - 2, "font-size": 10, fill: "#777"}, new Date(t0 * 1000).toLocaleTimeString()));
  g.append(svg("text", {x: w - 4, y: h - 2, "font-size": 10, fill: "#777", "text-anchor": "end"}, new Date(t1 * 1000).toLocaleTimeString()));
  box.append(el("p", {class: "muted", text: "tasks ended over time"}), g);
}

// --- task stream (a Gantt per worker, like Dask's) ---------------------------------------------
function drawStream(bars, now) {
  const legend = document.getElementById("legend");
  legend.textContent = "";
  for (const o of OUTCOMES) legend.append(el("span", {}, el("span", {class: "swatch", style: "background:" + color(o)}), " " + o));
  const box = document.getElementById("stream");
  box.textContent = "";
  if (!bars || !bars.length) { box.append(el("p", {class: "muted", text: "no attempt yet"})); return; }
  const workers = [...new Set(bars.map(b => b.worker || "-"))].sort();
  const t0 = Math.min(...bars.map(b => b.start));
  const t1 = Math.max(...bars.map(b => b.end || now));
  const w = 1000, row = Math.max(6, Math.min(40, 320 / workers.length)), left = 110;
  const h = row * workers.length + 18;
  const X = t => left + (w - left - 4) * (t - t0) / ((t1 - t0) || 1);
  const g = svg("svg", {viewBox: `0 0 ${w} ${h}`, role: "img", class: "bar"});
  workers.forEach((wk, i) => g.append(svg("text", {x: 0, y: i * row + row * 0.75, "font-size": Math.min(11, row), fill: "#555"}, wk.slice(0, 18))));
  for (const b of bars) {
    const i = workers.indexOf(b.worker || "-");
    const x = X(b.start), x2 = X(b.end || now);
    const r = svg("rect", {x: x.toFixed(2), y: i * row + 1, width: Math.max(0.8, x2 - x).toFixed(2), height: row - 2,
      fill: color(b.outcome), "data-task": b.task},
      svg("title", {}, `task ${b.task} attempt ${b.attempt}: ${b.outcome}, ${fmtS((b.end || now) - b.start)}`));
    r.addEventListener("click", () => { location.hash = "task/" + b.task; });
    g.append(r);
  }
  g.append(svg("text", {x: left, y: h - 3, "font-size": 10, fill: "#777"}, new Date(t0 * 1000).toLocaleTimeString()));
  g.append(svg("text", {x: w - 4, y: h - 3, "font-size": 10, fill: "#777", "text-anchor": "end"}, `${fmtS(t1 - t0)} later`));
  box.append(g);
}

// --- durations ---------------------------------------------------------------------------------
function drawDurations(stats) {
  const box = document.getElementById("durations");
  box.textContent = "";
  if (!stats || !stats.length) { box.append(el("p", {class: "muted", text: "no attempt has succeeded yet"})); return; }
  for (const d of stats) {
    const w = 600, h = 90, max = Math.max(1, ...d.counts);
    const bw = (w - 8) / Math.max(1, d.counts.length);
    const g = svg("svg", {viewBox: `0 0 ${w} ${h}`, role: "img"});
    d.counts.forEach((c, i) => {
      const bh = (h - 20) * c / max;
      g.append(svg("rect", {x: 4 + i * bw, y: h - 16 - bh, width: Math.max(1, bw - 1), height: bh, fill: color("succeeded")},
        svg("title", {}, `${fmtS(d.edges[i])} – ${fmtS(d.edges[i + 1])}: ${n(c)}`)));
    });
    g.append(svg("text", {x: 4, y: h - 3, "font-size": 10, fill: "#777"}, fmtS(d.edges[0])));
    g.append(svg("text", {x: w - 4, y: h - 3, "font-size": 10, fill: "#777", "text-anchor": "end"}, fmtS(d.edges[d.edges.length - 1])));
    box.append(el("div", {class: "duration", "data-name": d.name},
      el("b", {text: d.name}),
      el("span", {class: "muted", text: ` ${n(d.count)} · p50 ${fmtS(d.p50)} · p95 ${fmtS(d.p95)} · max ${fmtS(d.max)}`}), g));
  }
}

// --- failures and their "retry this group" action ----------------------------------------------
async function act(path, body, msg) {
  msg.textContent = "…";
  try {
    const headers = {"Content-Type": "application/json"};
    if (token) headers["Authorization"] = "Bearer " + token;
    const r = await fetch(path, {method: "POST", headers, body: JSON.stringify(body)});
    const j = await r.json();
    msg.textContent = r.ok ? (j.retried !== undefined ? `${n(j.retried)} task(s) will run again` : `${n(j.cancelled)} cancelled`) : (j.error || r.statusText);
  } catch (e) { msg.textContent = String(e); }
}

function drawFailures(groups) {
  const box = document.getElementById("failures");
  box.textContent = "";
  if (!groups || !groups.length) { box.append(el("p", {class: "muted", id: "no-failures", text: "no failed tasks"})); return; }
  for (const g of groups) {
    const ids = el("div", {class: "ids"}, "tasks: ");
    for (const id of g.task_ids.slice(0, 30)) ids.append(taskLink(id), " ");
    if (g.count > 30) ids.append(`… (${n(g.count)} in all)`);
    const msg = el("span", {class: "msg"});
    const btn = el("button", {class: "retry-group", text: "retry this group"});
    btn.addEventListener("click", () => act("api/retry", {signature: g.signature}, msg));
    const example = g.example_stderr || g.example_error || "";
    box.append(el("div", {class: "group"},
      el("div", {}, el("b", {text: n(g.count) + " "}), el("span", {class: "sig", text: g.signature})),
      el("div", {class: "muted"}, "example: task ", taskLink(g.example_task)),
      el("pre", {class: "example-stderr", text: example}), ids, el("div", {}, btn, msg)));
  }
}

function drawTable(id, head, rows) {
  const t = document.getElementById(id);
  t.textContent = "";
  t.append(el("tr", {}, ...head.map(h => el("th", {text: h}))));
  for (const r of rows) t.append(el("tr", {}, ...r.map(c => el("td", {}, c instanceof Node ? c : String(c)))));
}

function draw(data) {
  last = data;
  drawOverview(data.overview);
  drawThroughput(data.throughput);
  drawStream(data.stream, data.overview.now);
  drawDurations(data.durations);
  drawFailures(data.failures);
  drawTable("workers", ["worker", "host", "pid", "done", "running", "heartbeat", "state"],
    (data.workers || []).map(w => [w.id, w.host || "", w.pid || "", n(w.done), n(w.running),
      w.heartbeat_age_s === null ? "–" : fmtS(w.heartbeat_age_s) + " ago", w.state]));
  drawTable("running", ["task", "what", "worker", "for"],
    (data.running || []).map(r => [taskLink(r.id), r.label, r.worker || "", fmtS(r.elapsed_s)]));
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

// --- one task ----------------------------------------------------------------------------------
async function showTask(id) {
  document.getElementById("run-view").hidden = true;
  const view = document.getElementById("task-view");
  view.hidden = false;
  const body = document.getElementById("task-body");
  body.textContent = "loading…";
  const r = await fetch("api/task/" + id);
  const t = await r.json();
  body.textContent = "";
  if (!r.ok) { body.append(el("p", {text: t.error || r.statusText})); return; }
  document.getElementById("task-title").textContent = `task ${t.task_id}: ${t.state}`;
  const what = t.kind === "command" ? t.command : `${t.function}(${[...(t.args || []), ...Object.entries(t.kwargs || {}).map(([k, v]) => k + "=" + v)].join(", ")})`;
  body.append(el("p", {}, el("b", {text: t.kind === "command" ? "command: " : "function: "}), el("code", {text: what})));
  if (t.key !== null && t.key !== undefined) body.append(el("p", {text: "key: " + t.key}));
  if (t.error) body.append(el("p", {}, el("b", {text: "error: "}), el("code", {class: "task-error", text: t.error.trim().split("\n").slice(-1)[0]})));
  const msg = el("span", {class: "msg"});
  const retry = el("button", {class: "retry-task", text: "retry this task"});
  retry.addEventListener("click", () => act("api/retry", {ids: [t.task_id], force: t.state === "succeeded"}, msg));
  body.append(el("p", {}, retry, msg));
  if (!t.attempts.length) body.append(el("p", {class: "muted", text: "no attempt yet"}));
  for (const a of t.attempts) {
    body.append(el("div", {class: "attempt", "data-attempt": a.attempt},
      el("div", {}, el("b", {text: `attempt ${a.attempt}: `}), el("span", {class: "outcome-" + a.outcome, text: a.outcome}),
        ` on ${a.worker || "-"}, ${a.started_at || "-"} .. ${a.ended_at || "-"}`,
        a.duration_s !== null ? ` (${fmtS(a.duration_s)})` : "",
        a.exit_code !== null ? `, exit ${a.exit_code}${a.signal ? " (" + a.signal + ")" : ""}` : ""),
      a.error ? el("div", {class: "muted", text: "error: " + a.error}) : "",
      a.note ? el("div", {class: "muted", text: "note: " + a.note}) : "",
      el("div", {class: "muted", text: "stdout"}), el("pre", {class: "stdout", text: a.stdout || ""}),
      el("div", {class: "muted", text: "stderr"}), el("pre", {class: "stderr", text: a.stderr || ""})));
  }
}

function route() {
  const m = location.hash.match(/^#task\/(\d+)$/);
  if (m) { showTask(m[1]); return; }
  document.getElementById("task-view").hidden = true;
  document.getElementById("run-view").hidden = false;
}

// --- live updates ------------------------------------------------------------------------------
function poll() {
  fetch("api/snapshot").then(r => r.json()).then(draw).catch(() => {
    document.getElementById("live").textContent = "server unreachable";
  }).finally(() => setTimeout(poll, 2000));
}
function connect() {
  if (!window.EventSource) { poll(); return; }
  const es = new EventSource("api/events");
  es.onmessage = e => draw(JSON.parse(e.data));
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) { es.close(); setTimeout(connect, 2000); } };
}

const tokenInput = document.getElementById("token");
tokenInput.value = token;
tokenInput.addEventListener("change", () => { token = tokenInput.value; sessionStorage.setItem("pipefarm_token", token); });
if (token) sessionStorage.setItem("pipefarm_token", token);
window.addEventListener("hashchange", route);
route();
connect();
