/* fedlite dashboard: polls /api/state and renders tiles, charts, the fleet and the registry.
 *
 * Everything from the server is inserted with textContent (never innerHTML): device ids and reasons are data.
 * Rendered counts are exposed as data attributes for tests and scripts:
 *   body[data-rounds|data-complete|data-updates|data-status], #chart-*[data-points],
 *   #rounds[data-rounds] (each row tr[data-round], cells td[data-field]),
 *   #fleet-table[data-devices] (each row tr[data-client][data-stale][data-liveness], cells td[data-field]),
 *   #registry[data-versions] (each row tr[data-version]).
 */
"use strict";

const POLL_MS = 1500;
const PALETTE = ["#2563eb", "#d97706", "#7c3aed", "#0d9488", "#db2777", "#65a30d", "#0891b2", "#b45309", "#4f46e5",
  "#be123c"];
const COLORS = {
  accuracy: "#2563eb", loss: "#dc2626", accepted: "#16a34a", declined: "#d97706", aborted: "#a855f7",
  timed_out: "#64748b", cut_off: "#cbd5e1", rejected: "#dc2626", up: "#0d9488", down: "#2563eb", epsilon: "#7c3aed",
  mean: "#2563eb", band: "rgba(37, 99, 235, 0.14)", p10: "#d97706", hist: "#0d9488",
};

const $ = (id) => document.getElementById(id);
const charts = {};
let updates = 0;

/* ---------- formatting ---------- */

function isNum(v) { return typeof v === "number" && Number.isFinite(v); }
function pct(v, digits = 1) { return isNum(v) ? `${(v * 100).toFixed(digits)} %` : "–"; }
function fixed(v, digits = 3) { return isNum(v) ? v.toFixed(digits) : "–"; }
function bytes(n) {
  if (!isNum(n)) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i === 0 ? 0 : n < 10 ? 2 : 1)} ${units[i]}`;
}
function ago(seconds) {
  if (!isNum(seconds)) return "never";
  if (seconds < 0) seconds = 0;
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h ago`;
  return `${(seconds / 86400).toFixed(1)} d ago`;
}
function clock(unix) {
  if (!isNum(unix)) return "–";
  const d = new Date(unix * 1000);
  const pad = (x) => String(x).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
function short(hash, n = 12) { return typeof hash === "string" && hash ? hash.slice(0, n) : "–"; }
// The agent's gates keep their colours; other gates and rejection reasons get one by name (stable across polls).
const NAMED = { idle: "#d97706", charged: "#2563eb", on_network: "#7c3aed", cool: "#0891b2", memory: "#db2777" };
function colorFor(name) {
  if (Object.hasOwn(NAMED, name)) return NAMED[name];
  let h = 0;
  for (const ch of String(name)) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

/* ---------- DOM helpers ---------- */

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "title") node.title = v;
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
function setText(id, text) { const n = $(id); if (n && n.textContent !== text) n.textContent = text; }
function badge(text, cls) { return el("span", { class: `badge b-${cls}`, text }); }
function chip(label, value) { return el("span", { class: "chip" }, el("b", { text: String(value) }), label); }

/* ---------- charts ---------- */

function baseOptions(yTitle, extra = {}) {
  return {
    responsive: true,
    maintainAspectRatio: false,
    animation: false,
    interaction: { mode: "index", intersect: false },
    plugins: {
      legend: { position: "bottom", labels: { boxWidth: 12, boxHeight: 12, padding: 12 } },
      tooltip: { enabled: true },
    },
    scales: {
      x: { title: { display: true, text: "round" }, grid: { display: false }, ...(extra.x || {}) },
      y: { title: { display: true, text: yTitle }, beginAtZero: true, grid: { color: "#eef2f6" }, ...(extra.y || {}) },
      ...(extra.scales || {}),
    },
  };
}

function makeChart(cardId, type, options) {
  const canvas = $(cardId).querySelector("canvas");
  charts[cardId] = new Chart(canvas, { type, data: { labels: [], datasets: [] }, options });
  return charts[cardId];
}

function initCharts() {
  Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
  Chart.defaults.font.size = 12;
  Chart.defaults.color = "#475569";

  makeChart("chart-accuracy", "line", baseOptions("accuracy (%)", {
    x: { type: "linear", bounds: "data", ticks: { precision: 0 } },
    y: { min: 0, max: 100, ticks: { callback: (v) => `${v} %` } },
    scales: { y1: { position: "right", beginAtZero: true, title: { display: true, text: "loss" },
      grid: { drawOnChartArea: false } } },
  }));
  charts["chart-accuracy"].options.plugins.tooltip.callbacks = {
    title: (items) => (items.length ? `round ${items[0].parsed.x}` : ""),
    label: (item) => (item.dataset.yAxisID === "y1" ? `loss ${fixed(item.parsed.y)}`
      : `accuracy ${item.parsed.y.toFixed(1)} %`),
  };

  const stacked = { x: { stacked: true }, y: { stacked: true, ticks: { precision: 0 } } };
  makeChart("chart-participation", "bar", baseOptions("devices", stacked));
  makeChart("chart-gates", "bar", baseOptions("devices declined", stacked));
  makeChart("chart-rejected", "bar", baseOptions("updates rejected", stacked));
  makeChart("chart-bytes", "bar", baseOptions("kB per round"));
  makeChart("chart-epsilon", "line", baseOptions("ε (cumulative)", {
    x: { type: "linear", bounds: "data", ticks: { precision: 0 } },
  }));
  makeChart("chart-distribution", "bar", baseOptions("clients", {
    x: { title: { display: true, text: "accuracy on own data (%)" } }, y: { ticks: { precision: 0 } },
  }));
  charts["chart-distribution"].options.plugins.legend.display = false;
  makeChart("chart-fairness", "line", baseOptions("per-client accuracy (%)", {
    x: { type: "linear", bounds: "data", ticks: { precision: 0 } },
    y: { min: 0, max: 100, ticks: { callback: (v) => `${v} %` } },
  }));
  charts["chart-fairness"].options.plugins.legend.labels.filter = (item) => !item.text.startsWith("_");
  charts["chart-fairness"].options.plugins.tooltip.filter = (item) => !item.dataset.label.startsWith("_");
  for (const id of ["chart-accuracy", "chart-epsilon", "chart-fairness"]) {  // legend: a line, dashed like its series
    Object.assign(charts[id].options.plugins.legend.labels,
      { usePointStyle: true, pointStyle: "line", pointStyleWidth: 28 });
  }
}

function show(cardId, points, hasData) {
  const card = $(cardId);
  card.dataset.points = String(points);
  card.classList.toggle("is-empty", !hasData);
}

function setChart(cardId, labels, datasets) {
  const chart = charts[cardId];
  chart.data.labels = labels;
  chart.data.datasets = datasets;
  chart.update("none");
}

function line(label, data, color, extra = {}) {
  return { label, data, borderColor: color, backgroundColor: color, borderWidth: 2, pointRadius: 2.5,
    pointHoverRadius: 4, tension: 0.2, spanGaps: false, ...extra };
}
function bars(label, data, color) {
  return { label, data, backgroundColor: color, borderWidth: 0, borderRadius: 2, maxBarThickness: 28 };
}

function roundLabel(r) { return r.status === "abandoned" ? `${r.round}✕` : String(r.round); }

function renderCharts(rounds, latest) {
  const complete = rounds.filter((r) => r.status === "complete");
  const roundLabels = rounds.map(roundLabel);

  // Global accuracy and loss: one point per complete round with an accuracy.
  const acc = complete.filter((r) => isNum(r.accuracy)).map((r) => ({ x: r.round, y: r.accuracy * 100 }));
  const loss = complete.filter((r) => isNum(r.loss)).map((r) => ({ x: r.round, y: r.loss }));
  setChart("chart-accuracy", [], [
    line("accuracy (%)", acc, COLORS.accuracy, { yAxisID: "y" }),
    line("loss", loss, COLORS.loss, { yAxisID: "y1", borderDash: [5, 4], pointRadius: 1.5 }),
  ]);
  show("chart-accuracy", acc.length, acc.length > 0);

  // Participation: every round (abandoned ones marked ✕), stacked by outcome.
  const n = (r, k) => (isNum(r[k]) ? r[k] : 0);
  const rejectedTotal = (r) => Object.values(r.rejected || {}).reduce((a, b) => a + (isNum(b) ? b : 0), 0);
  setChart("chart-participation", roundLabels, [
    bars("accepted", rounds.map((r) => n(r, "accepted")), COLORS.accepted),
    bars("declined", rounds.map((r) => n(r, "declined")), COLORS.declined),
    bars("aborted", rounds.map((r) => n(r, "aborted")), COLORS.aborted),
    bars("timed out", rounds.map((r) => n(r, "timed_out")), COLORS.timed_out),
    bars("cut off (not needed)", rounds.map((r) => n(r, "cut_off")), COLORS.cut_off),
    bars("rejected", rounds.map(rejectedTotal), COLORS.rejected),
  ]);
  show("chart-participation", rounds.length, rounds.length > 0);

  // Declines by gate and rejections by reason: one stacked series per key seen in any round.
  for (const [cardId, field] of [["chart-gates", "declined_by_gate"], ["chart-rejected", "rejected"]]) {
    const keys = [...new Set(rounds.flatMap((r) => Object.keys(r[field] || {})))].sort();
    const sets = keys.map((k) => bars(k, rounds.map((r) => (r[field] || {})[k] || 0), colorFor(k)));
    const total = sets.reduce((a, s) => a + s.data.reduce((x, y) => x + y, 0), 0);
    setChart(cardId, roundLabels, sets);
    show(cardId, rounds.length, total > 0);
  }

  // Bytes per round, in a unit that suits the largest value.
  const maxBytes = Math.max(0, ...rounds.map((r) => Math.max(n(r, "bytes_up"), n(r, "bytes_down"))));
  const [div, unit] = maxBytes >= 5e6 ? [1e6, "MB"] : [1e3, "kB"];
  charts["chart-bytes"].options.scales.y.title.text = `${unit} per round`;
  setChart("chart-bytes", roundLabels, [
    bars(`up (${unit})`, rounds.map((r) => n(r, "bytes_up") / div), COLORS.up),
    bars(`down (${unit})`, rounds.map((r) => n(r, "bytes_down") / div), COLORS.down),
  ]);
  show("chart-bytes", rounds.length, rounds.length > 0);

  // ε over rounds, when differential privacy is on.
  const eps = rounds.filter((r) => isNum(r.epsilon)).map((r) => ({ x: r.round, y: r.epsilon }));
  const delta = rounds.map((r) => r.delta).filter(isNum).pop();
  setText("epsilon-sub", `ε consumed, cumulative over rounds${isNum(delta) ? ` (δ = ${delta})` : ""}`);
  setChart("chart-epsilon", [], [line("ε", eps, COLORS.epsilon, { fill: false })]);
  $("chart-epsilon").querySelector(".empty").textContent = rounds.length ? "Differential privacy is off: no ε to report"
    : "No rounds yet";
  show("chart-epsilon", eps.length, eps.length > 0);

  // Per-client accuracy distribution of the latest complete round: 10 bins of 10 %.
  const accs = (latest && latest.client_accuracies) || [];
  const bins = new Array(10).fill(0);
  for (const a of accs) bins[Math.min(9, Math.max(0, Math.floor(a * 10)))] += 1;
  const binLabels = bins.map((_, i) => `${i * 10}–${i * 10 + 10}`);
  setChart("chart-distribution", binLabels, [bars("clients", bins, COLORS.hist)]);
  show("chart-distribution", accs.length, accs.length > 0);
  setText("distribution-sub", accs.length
    ? `round ${latest.round}: ${accs.length} clients · mean ${pct(latest.client_accuracy_mean)} · `
      + `std ${isNum(latest.client_accuracy_std) ? (latest.client_accuracy_std * 100).toFixed(1) : "–"} pp · `
      + `p10 ${pct(latest.client_accuracy_p10)} (clients per 10 % bin)`
    : "global model on each participant's own data, latest round (clients per 10 % bin)");

  // Fairness over rounds: mean ± std band, p10.
  const fair = complete.filter((r) => r.kpis && isNum(r.kpis.client_accuracy_mean));
  const pt = (f) => fair.map((r) => ({ x: r.round, y: f(r.kpis) * 100 }));
  const std = (k) => (isNum(k.client_accuracy_std) ? k.client_accuracy_std : 0);
  setChart("chart-fairness", [], [
    line("_upper", pt((k) => Math.min(1, k.client_accuracy_mean + std(k))), "transparent",
      { pointRadius: 0, borderWidth: 0, fill: false }),
    line("_lower", pt((k) => Math.max(0, k.client_accuracy_mean - std(k))), "transparent",
      { pointRadius: 0, borderWidth: 0, fill: "-1", backgroundColor: COLORS.band }),
    line("mean (%)", pt((k) => k.client_accuracy_mean), COLORS.mean),
    line("p10 (%)", fair.filter((r) => isNum(r.kpis.client_accuracy_p10))
      .map((r) => ({ x: r.round, y: r.kpis.client_accuracy_p10 * 100 })), COLORS.p10, { borderDash: [5, 4] }),
  ]);
  show("chart-fairness", fair.length, fair.length > 0);
}

/* ---------- rounds ---------- */

const CLOSED_BY = { quorum: "K updates", deadline: "deadline", abandoned: "abandoned", failed: "failed" };

function renderRounds(state) {
  const rounds = state.rounds;
  const t = state.totals;
  setText("participation-sub", rounds.length
    ? `this run: ${t.timed_out ?? 0} timed out · ${t.cut_off ?? 0} cut off (not needed)` : "");
  const n = (v) => (isNum(v) ? String(v) : "–");
  const rows = [...rounds].reverse().map((r) => {
    const rejected = Object.values(r.rejected || {}).reduce((a, b) => a + (isNum(b) ? b : 0), 0);
    const cell = (field, text, cls = "num") => el("td", { class: cls, "data-field": field, text });
    return el("tr", { "data-round": String(r.round), class: r.status === "complete" ? "" : "row-abandoned" },
      cell("round", String(r.round)),
      el("td", { "data-field": "status" }, badge(String(r.status ?? "?"), r.status === "complete" ? "yes" : "no")),
      cell("close_reason", CLOSED_BY[r.close_reason] || String(r.close_reason || "–"), ""),
      cell("selected", n(r.selected)), cell("accepted", n(r.accepted)), cell("declined", n(r.declined)),
      cell("aborted", n(r.aborted)), cell("timed_out", n(r.timed_out)), cell("cut_off", n(r.cut_off)),
      cell("rejected", String(rejected)), cell("accuracy", pct(r.accuracy)),
      cell("duration_seconds", isNum(r.duration_seconds) ? `${r.duration_seconds.toFixed(1)} s` : "–"));
  });
  $("rounds-table").querySelector("tbody").replaceChildren(...rows);
  $("rounds").dataset.rounds = String(rows.length);
  $("rounds-empty").hidden = rows.length > 0;
}

/* ---------- tiles and header ---------- */

function renderTiles(state) {
  const t = state.totals;
  const fleet = state.fleet;
  const last = state.rounds.length ? state.rounds[state.rounds.length - 1] : null;
  setText("t-rounds", String(t.complete));
  setText("t-rounds-sub", t.abandoned ? `${t.abandoned} abandoned` : (last ? `last ${ago(state.now - (last.completed_at
    || last.started_at))}` : "waiting for the first round"));
  setText("t-accuracy", pct(t.accuracy));
  setText("t-accuracy-sub", isNum(t.loss) ? `loss ${fixed(t.loss)}` : "");
  setText("t-clientrounds", String(t.successful_client_rounds));
  const ledger = Object.entries(t.refused || {}).map(([kind, reasons]) => `${kind}: ` + Object.entries(reasons)
    .map(([reason, n]) => `${reason} ${n}`).join(", "));
  setText("t-refused", ledger.length ? `every refusal this run, in or between rounds: ${ledger.join(" · ")}`
    : "nothing refused this run");
  setText("t-bytes", bytes(t.bytes_up + t.bytes_down));
  setText("t-bytes-sub", `↑ ${bytes(t.bytes_up)} · ↓ ${bytes(t.bytes_down)}`);
  setText("t-bytes-sub2", isNum(t.bytes_per_accuracy_point) ? `${bytes(t.bytes_per_accuracy_point)} per accuracy point`
    : "");
  setText("t-epsilon", isNum(t.epsilon) ? t.epsilon.toPrecision(3) : (last ? "off" : "–"));
  const delta = last && isNum(last.delta) ? `at δ = ${last.delta}` : "";
  setText("t-epsilon-sub", isNum(t.epsilon) ? delta : (last ? "no differential privacy" : ""));
  const ab = t.personalization;  // the devices' personalized vs global model on their own held-out data
  const on = ab && ab.devices > 0 && isNum(ab.mean_gain);
  setText("t-personal", on ? `${ab.mean_gain >= 0 ? "+" : ""}${(100 * ab.mean_gain).toFixed(1)} pt` : (last ? "off" : "–"));
  setText("t-personal-sub", on ? `better on ${Math.round(ab.win_share * ab.devices)} of ${ab.devices} devices`
    : (last ? "no device reports personalization" : ""));
  setText("t-personal-sub2", on ? `worst decile ${(100 * ab.gain_p10).toFixed(1)} pt` : "");
  if (fleet && fleet.counts) {
    const c = fleet.counts;
    setText("t-fleet", `${c.online ?? "–"} / ${c.known ?? "–"}`);
    const gone = [c.stale ? `${c.stale} stale` : "", c.offline ? `${c.offline} offline` : ""].filter(Boolean);
    const sub = [isNum(fleet.run_ended) ? "online (run ended)" : "online", ...gone,
      `${c.eligible ?? 0} eligible`, `${c.training ?? 0} training`].join(" · ");
    setText("t-fleet-sub", sub);
    $("t-fleet-sub").title = sub;
  } else {
    setText("t-fleet", "–");
    setText("t-fleet-sub", "no fleet status yet");
  }
}

function renderHeader(state) {
  const fleet = state.fleet;
  setText("federation", (fleet && fleet.federation) || "federation");
  document.title = `fedlite · ${(fleet && fleet.federation) || "dashboard"}`;
  setText("state-dir", state.state_dir);
  const box = $("current-round");
  const cur = fleet && fleet.current_round;
  if (cur && isNum(cur.round)) {
    const parts = [el("b", { text: `round ${cur.round}` }), ` ${cur.state || ""}`];
    if (cur.state === "open") {
      parts.push(` · ${cur.accepted ?? 0}/${cur.selected ?? 0} accepted`);
      if (isNum(cur.deadline)) parts.push(` · deadline in ${Math.max(0, Math.round(cur.deadline - state.now))} s`);
    } else if (cur.state === "done") {
      parts.push(` · ${cur.accepted ?? 0}/${cur.selected ?? 0} accepted`);
    }
    box.replaceChildren(...parts);
    box.hidden = false;
  } else {
    box.hidden = true;
  }
  const stale = Object.entries(state.files).filter(([, f]) => f.stale).map(([k]) => k);
  const fresh = fleet && isNum(fleet.updated_at) ? state.now - fleet.updated_at : null;
  let pill = ["live", "pill-live"];
  if (!state.files.history.present && !state.files.fleet.present) pill = ["waiting for data", "pill-wait"];
  else if (stale.length) pill = ["partial read", "pill-stale"];
  else if (fleet && isNum(fleet.run_ended)) pill = ["run ended", "pill-wait"];
  else if (fresh !== null && fresh > 30) pill = ["aggregator idle", "pill-stale"];
  const node = $("status-pill");
  node.textContent = pill[0];
  node.className = `pill ${pill[1]}`;
  document.body.dataset.status = pill[0];
  setText("updated", fresh !== null ? `fleet updated ${ago(fresh)}` : `polled ${clock(state.now)}`);
}

/* ---------- fleet ---------- */

function renderFleet(state) {
  const fleet = state.fleet;
  const devices = (fleet && Array.isArray(fleet.devices)) ? fleet.devices : [];
  const latest = state.latest || {};
  const norms = latest.update_norms || {};
  const cosines = latest.cosine_similarity || {};
  const last = state.rounds.length ? state.rounds[state.rounds.length - 1] : null;
  const c = (fleet && fleet.counts) || {};
  const chips = [];
  if (fleet) {
    chips.push(chip("known", c.known ?? devices.length), chip("online", c.online ?? "–"),
      chip("eligible", c.eligible ?? "–"), chip("training", c.training ?? "–"), chip("stale", c.stale ?? 0),
      chip("offline", c.offline ?? 0));
    if (isNum(fleet.run_ended)) chips.push(chip(ago(state.now - fleet.run_ended), "run ended"));
    if (last) chips.push(chip(`declined in round ${last.round}`, last.declined ?? 0));
    const drift = devices.filter((d) => (d.flags || []).includes("drift")).length;
    const anomaly = devices.filter((d) => (d.flags || []).includes("anomaly")).length;
    chips.push(chip("drift", drift), chip("anomaly", anomaly));
  }
  $("fleet-counts").replaceChildren(...chips);

  const versions = (state.registry && Array.isArray(state.registry.versions)) ? state.registry.versions : [];
  const bySha = new Map(versions.filter((v) => v && v.sha256).map((v) => [v.sha256, v]));
  const rows = devices.map((d) => {
    const id = String(d.client_id ?? "?");
    // liveness is judged by the server from last-seen age and the end of the run (never "online" after it)
    const stateName = ["online", "training", "stale", "offline"].includes(d.liveness) ? d.liveness : "stale";
    const gates = Object.entries(d.failed_gates || {}).map(([g, reason]) =>
      el("span", { class: "gate", title: String(reason) }, el("b", { text: g }), reason ? `: ${reason}` : ""));
    const flags = (d.flags || []).map((f) => badge(String(f), f === "anomaly" ? "anomaly" : "drift"));
    // a device that is stale or offline is greyed: what it last said is history
    const stale = stateName === "stale" || stateName === "offline";
    const why = d.liveness_reason ? `${stateName}: ${d.liveness_reason}; last status ${clock(d.last_seen)}` : null;
    return el("tr", { "data-client": id, "data-stale": String(stale), "data-liveness": stateName,
                      class: stale ? "stale" : null, title: why },
      el("td", { class: "mono", text: id }),
      el("td", { "data-field": "liveness" }, badge(stateName, stateName)),
      el("td", {}, d.eligible ? badge("yes", "yes") : badge("no", "no")),
      el("td", {}, gates.length ? gates : el("span", { class: "muted", text: "–" })),
      el("td", { class: "num", title: clock(d.last_seen) }, ago(state.now - d.last_seen)),
      el("td", { "data-field": "deployed_model" }, deployedModel(d.deployed_model, bySha)),
      el("td", { class: "num", "data-field": "weights_round", title: d.weights_run ? `run ${d.weights_run}` : null },
        isNum(d.weights_round) && d.weights_round > 0 ? `round ${d.weights_round}` : "–"),
      el("td", { class: "num" }, isNum(norms[id]) ? norms[id].toFixed(3) : "–"),
      el("td", { class: "num" }, isNum(cosines[id]) ? cosines[id].toFixed(2) : "–"),
      el("td", {}, flags.length ? flags : el("span", { class: "muted", text: "–" })));
  });
  $("fleet-table").querySelector("tbody").replaceChildren(...rows);
  $("fleet-table").dataset.devices = String(rows.length);
  $("fleet-empty").hidden = rows.length > 0;
}

// The model a device says it has installed (the sha256 in its status), as the registry version it is.
function deployedModel(sha, bySha) {
  if (!sha) return el("span", { class: "muted", text: "none" });
  const version = bySha.get(String(sha));
  return el("span", { title: String(sha) }, version ? el("b", { text: `v${version.version}` }) : null,
    el("span", { class: "mono", text: ` ${short(String(sha), 8)}` }),
    version ? null : el("span", { class: "muted", text: " (not in the registry)" }));
}

/* ---------- registry and rollout ---------- */

function renderRegistry(state) {
  const reg = state.registry;
  const versions = (reg && Array.isArray(reg.versions)) ? [...reg.versions] : [];
  versions.sort((a, b) => (b.version ?? 0) - (a.version ?? 0));
  const rollout = reg && reg.rollout && typeof reg.rollout === "object" ? reg.rollout : null;
  const deployed = reg ? reg.deployed : null;

  $("registry-deployed").replaceChildren(...(reg ? [
    chip("versions", versions.length),
    chip("deployed", isNum(deployed) ? `v${deployed}` : "none"),
  ] : []));

  const rows = versions.map((v) => {
    const status = [];
    if (v.version === deployed) status.push(badge("deployed", "deployed"));
    if (rollout && rollout.state === "canary" && v.version === rollout.candidate) status.push(badge("candidate", "candidate"));
    if (rollout && rollout.state === "canary" && v.version === rollout.previous) status.push(badge("previous", "previous"));
    return el("tr", { class: v.version === deployed ? "row-deployed" : "", "data-version": String(v.version) },
      el("td", {}, el("b", { text: `v${v.version}` })),
      el("td", { class: "num" }, v.round ?? "–"),
      el("td", { class: "num" }, pct(v.accuracy)),
      el("td", { class: "num" }, fixed(v.loss)),
      el("td", { title: clock(v.created_at) }, isNum(v.created_at) ? `${clock(v.created_at)} (${ago(state.now - v.created_at)})` : "–"),
      el("td", { class: "mono", title: v.sha256 || "" }, short(v.sha256)),
      el("td", {}, status.length ? status : el("span", { class: "muted", text: "–" })));
  });
  $("registry-table").querySelector("tbody").replaceChildren(...rows);
  $("registry").dataset.versions = String(rows.length);
  $("registry-empty").hidden = rows.length > 0;
  $("registry-empty").textContent = reg ? "No model versions registered yet"
    : "No model registry yet (registry.json not written)";
  renderRollout(rollout, state.now);
  renderRequests(reg && Array.isArray(reg.requests) ? reg.requests : [], state.now);
}

function renderRequests(requests, now) {
  const box = $("requests");
  const recent = requests.slice(-5).reverse();
  box.hidden = recent.length === 0;
  const rows = recent.map((q) => el("tr", {},
    el("td", { class: "mono", text: String(q.id ?? "–") }),
    el("td", { text: `${q.action ?? "?"}${isNum(q.version) ? ` v${q.version}` : ""}` }),
    el("td", {}, badge(String(q.state ?? "?"), q.state === "done" ? "yes" : q.state === "pending" ? "candidate" : "no")),
    el("td", { class: "num" }, ago(now - q.requested_at)),
    el("td", { class: "small", text: String(q.message || "") })));
  box.querySelector("tbody").replaceChildren(...rows);
}

function renderRollout(r, now) {
  const box = $("rollout");
  if (!r) { box.hidden = true; box.replaceChildren(); return; }
  const stateName = ["canary", "promoted", "rolled_back"].includes(r.state) ? r.state : "canary";
  const labels = { canary: "canary in progress", promoted: "promoted", rolled_back: "rolled back" };
  box.className = `rollout state-${stateName}`;
  const canaries = Array.isArray(r.canaries) ? r.canaries : [];
  const reports = r.reports || {};
  const rows = canaries.map((cid) => {
    const rep = reports[cid];
    if (!rep) {
      return el("tr", {}, el("td", { class: "mono", text: String(cid) }),
        el("td", { class: "muted", colspan: "3", text: "waiting for its report" }));
    }
    const d = isNum(rep.accuracy_candidate) && isNum(rep.accuracy_current)
      ? (rep.accuracy_candidate - rep.accuracy_current) * 100 : null;
    return el("tr", {}, el("td", { class: "mono", text: String(cid) }),
      el("td", { class: "num" }, pct(rep.accuracy_candidate)),
      el("td", { class: "num" }, pct(rep.accuracy_current)),
      el("td", { class: `num ${d === null ? "" : d >= 0 ? "delta-up" : "delta-down"}` },
        d === null ? "–" : `${d >= 0 ? "+" : ""}${d.toFixed(1)} pp`));
  });
  const reported = canaries.filter((c) => reports[c]).length;
  const when = [`started ${ago(now - r.started_at)}`];
  if (isNum(r.finished_at)) when.push(`finished ${ago(now - r.finished_at)}`);
  box.replaceChildren(
    el("div", { class: "rollout-head" },
      el("h3", { text: `Rollout: v${r.candidate ?? "?"}${isNum(r.previous) ? ` replacing v${r.previous}` : ""}` }),
      badge(labels[stateName], stateName),
      el("span", { class: "muted small", text: `${reported}/${canaries.length} canaries reported · ${when.join(" · ")}` }),
      r.reason ? el("span", { class: "small", text: `reason: ${r.reason}` }) : null),
    el("table", {},
      el("thead", {}, el("tr", {}, el("th", { text: "Canary" }), el("th", { class: "num", text: "Candidate acc." }),
        el("th", { class: "num", text: "Current acc." }), el("th", { class: "num", text: "Δ" }))),
      el("tbody", {}, rows)));
  box.hidden = false;
}

/* ---------- polling ---------- */

function notice(text) {
  const n = $("notice");
  n.hidden = !text;
  n.textContent = text || "";
}

function render(state) {
  const rounds = Array.isArray(state.rounds) ? state.rounds : [];
  state.rounds = rounds;
  renderHeader(state);
  renderTiles(state);
  renderCharts(rounds, state.latest);
  renderRounds(state);
  renderFleet(state);
  renderRegistry(state);
  const b = document.body.dataset;
  b.rounds = String(rounds.length);
  b.complete = String(rounds.filter((r) => r.status === "complete").length);
  updates += 1;
  b.updates = String(updates);
  const errors = Object.values(state.files).map((f) => f.error).filter(Boolean);
  notice(errors.length ? `Showing the last good copy of: ${errors.join(", ")} (being rewritten?)` : "");
}

function disconnected(message) {
  const pill = $("status-pill");
  pill.textContent = "disconnected";
  pill.className = "pill pill-down";
  document.body.dataset.status = "disconnected";
  setText("updated", `retrying… (${message})`);
}

async function poll() {
  let state = null;
  try {
    const response = await fetch("/api/state", { cache: "no-store", credentials: "same-origin" });
    if (response.status === 401) {
      const pill = $("status-pill");
      pill.textContent = "unauthorized";
      pill.className = "pill pill-down";
      document.body.dataset.status = "unauthorized";
      notice("This dashboard needs its token: open it once as …/?token=<token>.");
      return;  // no retry loop against a token check
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    state = await response.json();
  } catch (err) {
    disconnected(err.message || String(err));
  }
  try {
    if (state) render(state);
  } catch (err) {
    console.error("fedlite dashboard: cannot render the state", err);  // a bug: let it show in the console
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  initCharts();
  poll();
});
