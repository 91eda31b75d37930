// potluck dashboard: the pages of potluck.dashboard.app, drawn from its JSON API with uPlot.
"use strict";

const boot = JSON.parse(document.body.dataset.boot);
const main = document.getElementById("main");
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];
// chart title -> which round metrics it draws (a name test)
const GROUPS = [
  ["loss", (n) => n.endsWith("loss") && !n.includes("slope")],
  ["accuracy", (n) => /^(test|fed|personal|finetuned|backdoor)_accuracy$/.test(n)],
  ["accuracy over the clients", (n) => /^clients_accuracy_(mean|worst10|min)$/.test(n)],
  ["accuracy variance / Gini", (n) => /^clients_accuracy_(var|gini)$/.test(n)],
  ["accuracy per group", (n) => /^group_.*_accuracy$/.test(n)],
  ["update norm / client drift", (n) => /^(update_norm|client_drift)_(mean|max)$/.test(n)],
  ["data shift", (n) => /^(label|feature)_shift_max$/.test(n) || n === "shifted_clients"],
  ["epsilon", (n) => n === "epsilon"],
  ["anomaly flags", (n) => n === "flagged" || n === "quarantined"],
  ["bytes", (n) => n === "bytes_up" || n === "bytes_down"],
  ["bytes per accuracy point", (n) => n === "bytes_per_gain"],
];
window.potluck = { charts: {}, rounds: 0, view: boot.view };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c));
  return node;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(3) : v.toPrecision(4);
}

// axis labels that fit: 1.2M, 35k, 0.004
function compact(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  for (const [d, unit] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (a >= d) return `${+(v / d).toPrecision(3)}${unit}`;
  }
  return String(+v.toPrecision(3));
}
const AXES = [{}, { values: (_u, ticks) => ticks.map(compact), size: 56 }];

function table(head, rows) {
  const t = el("table", {}, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))));
  const body = el("tbody");
  for (const r of rows) body.append(el("tr", {}, ...r.map((c) => el("td", {}, c))));
  t.append(body);
  return t;
}

async function json(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: ${r.status} ${(await r.json()).error || ""}`);
  return r.json();
}

// ---- charts -------------------------------------------------------------------------------

function lineChart(title, names, width = 520) {
  const series = [{ label: "round" }].concat(
    names.map((n, i) => ({ label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true }))
  );
  const box = el("figure", { class: "chart", "data-title": title });
  main.querySelector("#charts").append(box);
  const data = [[], ...names.map(() => [])];
  const opts = { title, width, height: 260, series, axes: AXES, scales: { x: { time: false } } };
  const plot = new uPlot(opts, data, box);
  return { plot, names, data };
}

function addRound(chart, round) {
  chart.data[0].push(round.round);
  chart.names.forEach((n, i) => chart.data[i + 1].push(round.metrics[n] ?? null));
}

function drawRounds(rounds) {
  const names = [...new Set(rounds.flatMap((r) => Object.keys(r.metrics)))];
  for (const [title, test] of GROUPS) {
    const mine = names.filter(test);
    if (!mine.length || window.potluck.charts[title]) continue;
    window.potluck.charts[title] = lineChart(title, mine);
  }
  for (const r of rounds) {
    for (const chart of Object.values(window.potluck.charts)) addRound(chart, r);
    window.potluck.rounds = r.round;
  }
  for (const chart of Object.values(window.potluck.charts)) chart.plot.setData(chart.data);
}

function histogram(title, values, bins = 10) {
  const lo = values.reduce((a, b) => Math.min(a, b)), hi = values.reduce((a, b) => Math.max(a, b));
  const step = hi > lo ? (hi - lo) / bins : 1;
  const counts = new Array(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor((v - lo) / step))] += 1;
  const xs = counts.map((_, i) => lo + (i + 0.5) * step);
  const box = el("figure", { class: "chart", "data-title": title });
  main.querySelector("#histograms").append(box);
  new uPlot({
    title, width: 520, height: 220, scales: { x: { time: false } },
    series: [{ label: "value" }, { label: "clients", fill: "#1f77b455", stroke: PALETTE[0],
      paths: uPlot.paths.bars({ size: [0.9] }) }],
  }, [xs, counts], box);
  return counts;
}

// ---- views --------------------------------------------------------------------------------

async function runsView() {
  const runs = await json("/api/runs");
  const rows = runs.map((r) => {
    const link = el("a", { href: `/runs/${r.run}` }, r.name !== r.run ? `${r.name} (${r.run})` : r.run);
    const pick = el("input", { type: "checkbox", value: r.run, class: "pick" });
    const best = r.summary.personal_accuracy ?? r.summary.test_accuracy ?? r.summary.fed_accuracy;
    return [pick, link, r.what, r.status, String(r.rounds), fmt(best)];
  });
  main.append(table(["", "run", "algorithm / data / model", "status", "rounds", "accuracy"], rows));
  const go = el("button", { id: "compare" }, "compare selected");
  go.onclick = () => {
    const ids = [...document.querySelectorAll(".pick:checked")].map((c) => c.value);
    if (ids.length >= 2) location.href = `/compare?runs=${ids.join(",")}`;
  };
  main.append(go);
  window.potluck.runs = runs.length;
}

async function runView() {
  const id = boot.run;
  const info = await json(`/api/runs/${id}`);
  const status = el("span", { id: "status" }, info.status);
  main.append(el("p", {}, `${info.what} · status `, status, ` · created ${info.created_at}`));
  main.append(el("div", { id: "charts" }), el("h2", {}, "clients"), el("div", { id: "histograms" }));
  drawRounds(await json(`/api/runs/${id}/rounds`));
  const first = await json(`/api/runs/${id}/clients`);
  if (first.accuracy.length) {
    window.potluck.histogram = histogram("accuracy on the clients' test data", first.accuracy);
  }
  clientTable(id, first);
  if (info.health.length) {
    main.append(el("h2", {}, "health (deployment)"));
    main.append(table(["client", "name", "rounds", "failures", "latency s", "last error"],
      info.health.map((h) => [String(h.client), h.name, String(h.rounds_completed), String(h.failures),
        fmt(h.latency_s), h.last_error || ""])));
  }
  if (info.versions.length) {
    main.append(el("h2", {}, "model versions from this run"));
    main.append(table(["model", "version", "round", "stage", "registered", "last change"],
      info.versions.map((v) => [v.name, String(v.version), String(v.round), v.stage, v.created_at,
        v.last_change])));
  }
  main.append(el("h2", {}, "config"), el("pre", {}, JSON.stringify(info.config, null, 2)));
  if (info.status === "running") live(id, status);
}

const CLIENT_COLUMNS = [["rounds", (c) => c.rounds], ["last round", (c) => c.last_round],
  ["train loss", (c) => c.mean.train_loss], ["accuracy", (c) => c.last.eval_global_accuracy],
  ["update norm", (c) => c.mean.update_norm], ["drift", (c) => c.mean.client_drift],
  ["label shift", (c) => c.last.label_shift], ["feature shift", (c) => c.last.feature_shift],
  ["flagged", (c) => (c.mean.flagged ?? 0) * c.rounds],
  ["MB up", (c) => (c.mean.bytes_up ?? 0) * c.rounds / 1e6]];

// the per-client table, a page at a time (a federation can have millions of clients)
function clientTable(id, page) {
  const rows = (p) => p.clients.map((c) => [String(c.client), ...CLIENT_COLUMNS.map(([, f]) => fmt(f(c)))]);
  const t = table(["client", ...CLIENT_COLUMNS.map((c) => c[0])], rows(page));
  const note = el("p", { id: "clients-shown" });
  main.append(t, note);
  let shown = page.clients.length;
  const more = el("button", { id: "more-clients" }, "more clients");
  const update = () => {
    note.textContent = `${shown} of ${page.total} clients`;
    if (shown >= page.total) more.remove();
  };
  more.onclick = async () => {
    const next = await json(`/api/runs/${id}/clients?offset=${shown}`);
    for (const r of rows(next)) t.tBodies[0].append(el("tr", {}, ...r.map((c) => el("td", {}, c))));
    shown += next.clients.length;
    window.potluck.clients = shown;
    update();
  };
  main.append(more);
  update();
  window.potluck.clients = shown;
}

function live(id, status) {
  // the server sends each round with its number as the event id: a reconnecting EventSource
  // sends Last-Event-ID and gets only the rounds after it
  const source = new EventSource(`/api/runs/${id}/events?after=${window.potluck.rounds}`);
  source.addEventListener("round", (e) => {
    const r = JSON.parse(e.data);
    if (r.round > window.potluck.rounds) drawRounds([r]);
  });
  source.addEventListener("end", (e) => {
    status.textContent = JSON.parse(e.data).status;
    source.close();
  });
  window.potluck.source = source;
}

async function compareView() {
  const metric = boot.metric;
  main.append(el("div", { id: "charts" }));
  const runs = await Promise.all(boot.runs.map((id) => json(`/api/runs/${id}/rounds`)));
  const rounds = [...new Set(runs.flatMap((rs) => rs.map((r) => r.round)))].sort((a, b) => a - b);
  const data = [rounds, ...runs.map((rs) => {
    const by = new Map(rs.map((r) => [r.round, r.metrics[metric] ?? null]));
    return rounds.map((x) => by.get(x) ?? null);
  })];
  const series = [{ label: "round" }, ...boot.runs.map((id, i) => ({ label: id, stroke: PALETTE[i % PALETTE.length], spanGaps: true }))];
  const box = el("figure", { class: "chart" });
  main.querySelector("#charts").append(box);
  const plot = new uPlot({ title: metric, width: 800, height: 360, series, scales: { x: { time: false } } }, data, box);
  window.potluck.charts[metric] = { plot, data };
  main.append(table(["run", "rounds", `last ${metric}`],
    boot.runs.map((id, i) => [id, String(runs[i].length), fmt(data[i + 1].filter((v) => v !== null).at(-1))])));
}

const views = { runs: runsView, run: runView, compare: compareView };
views[boot.view]().then(() => { window.potluck.ready = true; }).catch((err) => {
  main.append(el("p", { class: "error" }, String(err)));
  window.potluck.error = String(err);
});
