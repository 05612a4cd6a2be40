// Live dashboard: polls ./stages every second and draws ingress -> rules -> egress; while a rule runs a shadow or
// a canary (a stage with `trial`), it also reads ./models and shows the rule's two versions side by side, each
// trial in a table with data-trial="<rule>:<kind>" and its figures in data-field="<version>.<figure>" cells.
// With control.protect_reads the first read answers 403 "token required": the page asks for the token once,
// keeps it in sessionStorage and sends it as "Authorization: Bearer" with every read; polling waits meanwhile.
// Plain DOM, no dependencies. Every number sits in an element with data-field, inside a box with
// data-stage="<stage name>", so the page can be read by tests and scripts.
"use strict";

const POLL_MS = 1000;
const SPARK_POINTS = 60;
const TOKEN_KEY = "pipeline-control-token"; // sessionStorage: kept for this tab only, sent as Authorization
const history = new Map(); // stage name -> recent rate_per_s values

function fmt(value, digits) {
  if (value === null || value === undefined) return "\u2013";
  if (typeof value !== "number") return String(value);
  return value.toLocaleString("en-US", {maximumFractionDigits: digits === undefined ? 0 : digits});
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function metric(box, field, label) {
  const cell = el("div", "metric");
  const value = el("span", "value", "\u2013");
  value.dataset.field = field;
  cell.append(value, el("span", "label", label));
  box.querySelector(".metrics").append(cell);
}

function makeBox(stage) {
  const box = el("section", "stage");
  box.dataset.stage = stage.name;
  const head = el("div", "head");
  const title = el("h2", "", stage.name.replace(/^rule:/, ""));
  const badge = el("span", "badge");
  badge.dataset.field = "up";
  head.append(title, badge);
  box.append(head);
  if (stage.name.startsWith("rule:")) {
    const workers = el("div", "workers");
    workers.dataset.field = "workers";
    box.append(workers);
  }
  box.append(el("div", "metrics"));
  for (const [field, label] of [["depth", "depth"], ["rate_per_s", "msg/s"], ["errors", "errors"],
    ["p99", "p99 ms"]]) {
    metric(box, field, label);
  }
  const counts = el("div", "counts");
  counts.dataset.field = "counts";
  const spark = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  spark.setAttribute("class", "spark");
  spark.setAttribute("viewBox", "0 0 120 28");
  spark.setAttribute("preserveAspectRatio", "none");
  spark.dataset.field = "sparkline";
  const base = document.createElementNS("http://www.w3.org/2000/svg", "path");
  base.setAttribute("class", "base");
  base.setAttribute("d", "M0,27.5 L120,27.5");
  spark.append(base, document.createElementNS("http://www.w3.org/2000/svg", "path"));
  box.append(counts, spark);
  return box;
}

function figures(stage, all) {
  // what each box shows: errors and p99 mean different things per stage
  if (stage.name === "ingress") {
    return {errors: stage.unrouted, p99: null, counts: `received ${fmt(stage.received)}`};
  }
  if (stage.name === "egress") {
    const p99s = all.filter(s => s.end_to_end_ms && s.end_to_end_ms.p99 !== null).map(s => s.end_to_end_ms.p99);
    return {errors: stage.dropped, p99: p99s.length ? Math.max(...p99s) : null,
      counts: `published ${fmt(stage.published)} \u00b7 error records ${fmt(stage.error_records)}`};
  }
  return {errors: stage.errors, p99: stage.latency_ms ? stage.latency_ms.p99 : null,
    counts: `processed ${fmt(stage.processed)} \u00b7 in flight ${fmt(stage.in_flight)}`};
}

function drawSpark(box, values) {
  const top = Math.max(1, ...values);
  const step = 120 / (SPARK_POINTS - 1);
  const start = SPARK_POINTS - values.length;
  const points = values.map((v, i) => `${((start + i) * step).toFixed(1)},${(27 - (v / top) * 25).toFixed(1)}`);
  box.querySelector("[data-field=sparkline] path:not(.base)").setAttribute("d", points.length ? "M" + points.join(" L") : "");
}

function update(box, stage, all) {
  const f = figures(stage, all);
  const set = (field, text) => { box.querySelector(`[data-field="${field}"]`).textContent = text; };
  box.dataset.up = stage.up ? "true" : "false";
  set("up", stage.up ? "up" : "down");
  set("depth", fmt(stage.depth));
  set("rate_per_s", fmt(stage.rate_per_s, 1));
  set("errors", fmt(f.errors));
  set("p99", fmt(f.p99, 2));
  set("counts", f.counts);
  if (stage.workers !== undefined) set("workers", `${stage.workers_alive}/${stage.workers} workers`);
  box.classList.toggle("backlog", stage.depth > 0);
  const values = history.get(stage.name) || [];
  values.push(stage.rate_per_s || 0);
  if (values.length > SPARK_POINTS) values.shift();
  history.set(stage.name, values);
  drawSpark(box, values);
}

function column(stage) {
  if (stage.name === "ingress") return document.getElementById("col-ingress");
  if (stage.name === "egress") return document.getElementById("col-egress");
  return document.getElementById("col-rules");
}

function wire(svg, from, to, origin) {
  const a = from.getBoundingClientRect();
  const b = to.getBoundingClientRect();
  const x1 = a.right - origin.left, y1 = a.top + a.height / 2 - origin.top;
  const x2 = b.left - origin.left, y2 = b.top + b.height / 2 - origin.top;
  const mid = (x1 + x2) / 2;
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2 - 6},${y2}`);
  path.setAttribute("marker-end", "url(#arrow)");
  svg.append(path);
}

function drawWires() {
  const svg = document.getElementById("wires");
  const origin = document.getElementById("flow").getBoundingClientRect();
  svg.innerHTML = '<defs><marker id="arrow" viewBox="0 0 10 10" refX="2" refY="5" markerWidth="6" ' +
    'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z"></path></marker></defs>';
  const ingress = document.querySelector('[data-stage="ingress"]');
  const egress = document.querySelector('[data-stage="egress"]');
  for (const rule of document.querySelectorAll("#col-rules .stage")) {
    if (ingress) wire(svg, ingress, rule, origin);
    if (egress) wire(svg, rule, egress, origin);
  }
}

function render(doc) {
  const seen = new Set();
  for (const stage of doc.stages) {
    seen.add(stage.name);
    let box = document.querySelector(`[data-stage="${CSS.escape(stage.name)}"]`);
    if (!box) {
      box = makeBox(stage);
      column(stage).append(box);
    }
    update(box, stage, doc.stages);
  }
  for (const box of document.querySelectorAll("[data-stage]")) {
    if (!seen.has(box.dataset.stage)) box.remove();
  }
  drawWires();
}

const VERSION_ROWS = [
  ["model", "model", v => v.model],
  ["workers", "workers alive", v => fmt(v.workers_alive)],
  ["rate_per_s", "msg/s", v => fmt(v.rate_per_s, 1)],
  ["results", "results", v => fmt(v.results)],
  ["error_rate", "error rate", v => pct(v.error_rate)],
  ["p50", "p50 ms", v => fmt(v.latency_ms.p50, 2)],
  ["p99", "p99 ms", v => fmt(v.latency_ms.p99, 2)],
];

function pct(share) {
  return share === null || share === undefined ? "\u2013" : `${(share * 100).toFixed(2)} %`;
}

function trialSummary(trial) {
  // what is particular to the kind: a shadow's agreement, a canary's state
  if (trial.kind === "shadow") {
    return `shadow: agreement ${pct(trial.agreement_rate)} of ${fmt(trial.compared)} compared \u00b7 ` +
      `dropped ${fmt(trial.dropped)}`;
  }
  const reason = trial.reason ? ` (${trial.reason})` : "";
  return `canary: ${trial.state.replace("_", " ")}, serving ${fmt(trial.serving_percent, 1)} % of the keys` +
    `${reason} \u00b7 rollbacks ${fmt(trial.rollbacks)}`;
}

function trialTable(trial) {
  const table = el("table", "versions");
  table.dataset.trial = `${trial.rule}:${trial.kind}`;
  table.dataset.state = trial.state || "running";
  const caption = el("caption", "", trialSummary(trial));
  caption.dataset.field = "summary";
  const head = el("tr");
  head.append(el("th", "", trial.rule), el("th", "", "live"), el("th", "", trial.kind));
  table.append(caption, head);
  for (const [field, label, show] of VERSION_ROWS) {
    const row = el("tr");
    row.append(el("th", "", label));
    for (const [name, version] of [["live", trial.live], ["candidate", trial.candidate]]) {
      const cell = el("td", "", show(version));
      cell.dataset.field = `${name}.${field}`;
      row.append(cell);
    }
    table.append(row);
  }
  return table;
}

function renderTrials(trials) {
  const section = document.getElementById("trials");
  section.replaceChildren(...trials.map(trialTable));
  section.hidden = trials.length === 0;
}

async function pollTrials(stages) {
  // ./models only while a shadow or canary runs
  if (!stages.some(s => s.trial)) {
    renderTrials([]);
    return;
  }
  const resp = await fetch("models", {cache: "no-store", headers: authorized()});
  if (resp.ok) renderTrials((await resp.json()).trials || []);
}

function setState(state, text) {
  const node = document.getElementById("state");
  node.dataset.state = state;
  node.textContent = text;
}

function askToken(message) {
  const form = document.getElementById("login");
  document.getElementById("login-error").textContent = message;
  form.hidden = false;
  document.getElementById("token").focus();
  setState("locked", "token required");
}

async function tokenRefused(resp) {
  // 403 "token required" (protect_reads): ask once; a token that was sent and refused is forgotten
  if (resp.status !== 403) return false;
  const doc = await resp.json().catch(() => ({}));
  if (doc.title !== "token required") return false;
  const sent = sessionStorage.getItem(TOKEN_KEY) !== null;
  sessionStorage.removeItem(TOKEN_KEY);
  askToken(sent ? "that token was refused: enter control.token again" : "");
  return true;
}

function authorized() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token === null ? {} : {Authorization: `Bearer ${token}`};
}

async function poll() {
  try {
    const resp = await fetch("stages", {cache: "no-store", headers: authorized()});
    if (await tokenRefused(resp)) return;
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const doc = await resp.json();
    render(doc);
    await pollTrials(doc.stages);
    const down = doc.stages.filter(s => !s.up).map(s => s.name);
    setState(down.length ? "degraded" : "ok", down.length ? `down: ${down.join(", ")}` : "all stages up");
    document.getElementById("updated").textContent = new Date(doc.time * 1000).toLocaleTimeString();
  } catch (err) {
    setState("unreachable", `control API unreachable (${err.message})`);
  } finally {
    if (document.getElementById("login").hidden) setTimeout(poll, POLL_MS); // submitting the token polls again
  }
}

document.getElementById("login").addEventListener("submit", event => {
  event.preventDefault();
  const input = document.getElementById("token");
  if (!input.value.trim()) return;
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  event.target.hidden = true;
  setState("connecting", "connecting");
  poll();
});
window.addEventListener("resize", drawWires);
poll();
