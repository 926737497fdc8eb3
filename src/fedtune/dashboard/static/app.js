// fedtune dashboard: polls /api/run and draws the run with plain DOM and SVG (no libraries, nothing fetched
// from elsewhere). Every text from the run (client ids, reasons) goes in through textContent, never as HTML.
"use strict";

const params = new URLSearchParams(window.location.search);
const token = params.get("token") || "";
const every = Math.max(250, Number(params.get("every")) || 1000);
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea"];

function $(id) { return document.getElementById(id); }

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  return value.toPrecision(digits || 4);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.round(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// A line chart of series [{label, points: [[x, y], ...]}] in a 360x200 viewBox.
function lineChart(svg, series, opts) {
  svg.replaceChildren();
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) {
    svg.appendChild(svgEl("text", { x: 180, y: 100, "text-anchor": "middle", class: "empty" }, "no data yet"));
    return;
  }
  const L = 46, R = 350, T = 14, B = 176;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (opts && opts.zero) y0 = Math.min(0, y0);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (R - L);
  const sy = (y) => B - ((y - y0) / (y1 - y0)) * (B - T);
  // tick labels with as many decimals as the step between them needs (no two alike)
  const decimals = Math.min(8, Math.max(0, 1 - Math.floor(Math.log10((y1 - y0) / 4))));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.appendChild(svgEl("line", { x1: L, x2: R, y1: sy(y), y2: sy(y), class: "grid" }));
    svg.appendChild(svgEl("text", { x: L - 4, y: sy(y) + 3, "text-anchor": "end" }, y.toFixed(decimals)));
  }
  const ticks = Math.min(8, x1 - x0);
  for (let i = 0; i <= ticks; i++) {
    const x = Math.round(x0 + ((x1 - x0) * i) / ticks);
    svg.appendChild(svgEl("text", { x: sx(x), y: B + 13, "text-anchor": "middle" }, String(x)));
  }
  svg.appendChild(svgEl("line", { x1: L, x2: R, y1: B, y2: B, class: "axis" }));
  svg.appendChild(svgEl("text", { x: R, y: B + 24, "text-anchor": "end" }, "round"));
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const color = COLORS[i % COLORS.length];
    const d = s.points.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
    svg.appendChild(svgEl("path", { d: d, fill: "none", stroke: color, "stroke-width": 2 }));
    for (const p of s.points) {
      const dot = svgEl("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color });
      dot.appendChild(svgEl("title", {}, s.label + ", round " + p[0] + ": " + fmt(p[1])));
      svg.appendChild(dot);
    }
    svg.appendChild(svgEl("rect", { x: L + 8 + i * 130, y: 2, width: 10, height: 4, fill: color }));
    svg.appendChild(svgEl("text", { x: L + 22 + i * 130, y: 8 }, s.label));
  });
}

function series(rounds, key, label, scale) {
  const points = rounds.filter((r) => typeof r[key] === "number").map((r) => [r.round, r[key] * (scale || 1)]);
  return { label: label, points: points };
}

function fillTable(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const cell of cells) tr.appendChild(cell instanceof Node ? wrapTd(cell) : el("td", fmt(cell)));
    return tr;
  }));
}

function wrapTd(node) { const td = el("td"); td.appendChild(node); return td; }

function render(run) {
  const st = run.status || {};
  const acc = !!st.accuracy;
  const quality = acc ? "eval_accuracy" : "eval_perplexity";
  const qname = acc ? "accuracy" : "perplexity";
  document.title = "fedtune · " + run.name;
  $("name").textContent = run.name;
  $("state").textContent = st.state || "unknown";
  $("state").className = "badge " + (st.state || "");
  const done = st.round || 0, total = st.total_rounds;
  $("bar").style.width = total ? Math.min(100, (100 * done) / total) + "%" : "0";
  $("c-round").textContent = total ? done + " / " + total : String(done);
  $("c-eta").textContent = st.state === "running" ? duration(st.eta_s) : "-";
  const clients = run.clients || [];
  const enrolled = st.enrolled ? st.enrolled.length : clients.length;
  const connected = st.connected ? st.connected.length : enrolled;
  $("c-clients").textContent = connected + " / " + enrolled;
  $("c-training").textContent = String(clients.filter((c) => c.state === "training").length);
  const last = [...run.rounds].reverse().find((r) => typeof r[quality] === "number");
  $("c-quality-label").textContent = "held-out " + qname;
  $("c-quality").textContent = last ? fmt(last[quality]) + " (round " + last.round + ")" : "-";
  const pv = run.privacy || {};
  $("c-privacy").textContent = pv.dp ? fmt(pv.epsilon, 3) + " / " + (pv.epsilon_budget ? fmt(pv.epsilon_budget, 3) : "∞")
    + (pv.delta ? " at δ=" + pv.delta : "") : (pv.client_epsilon_max ? "client ε ≤ " + fmt(pv.client_epsilon_max, 3) : "no DP");
  const updated = st.updated_at ? new Date(st.updated_at * 1000).toLocaleTimeString() : "-";
  $("summary").textContent = (st.reason ? st.reason + " · " : "") + "status updated " + updated
    + (st.trainable_params ? " · " + fmt(st.trainable_params) + " trainable parameters" : "");
  $("run-dir").textContent = run.run_dir;

  lineChart($("chart-loss"), [series(run.rounds, "train_loss", "train (clients)"), series(run.rounds, "eval_loss", "held-out (global)")]);
  $("quality-caption").textContent = "held-out " + qname;
  lineChart($("chart-quality"), [series(run.rounds, quality, qname)]);
  lineChart($("chart-bytes"), [series(run.rounds, "bytes_down", "down", 1e-6), series(run.rounds, "bytes_up", "up", 1e-6)], { zero: true });
  $("fig-epsilon").hidden = !pv.dp;
  if (pv.dp) lineChart($("chart-epsilon"), [series(run.rounds, "agg_epsilon", "ε")], { zero: true });

  $("quality-col").textContent = qname;
  fillTable($("clients").tBodies[0], clients.map((c) => [
    c.client_id, el("span", c.state, "state " + c.state), el("span", c.reason || ""), c.rounds, c.num_examples,
    c.train_loss, c.eval_loss, c[quality], c.bytes_down === undefined ? null : c.bytes_down / 1e6,
    c.bytes_up === undefined ? null : c.bytes_up / 1e6, c.fit_seconds, c.examples_per_s, c.failures || 0,
  ]));
  const refused = st.refused || [];
  $("refused-section").hidden = !refused.length;
  fillTable($("refused").tBodies[0], refused.slice().reverse().map((r) => [r.who, r.reason, new Date(r.at * 1000).toLocaleTimeString()]));
  const failures = (run.failures || []).slice().reverse();
  $("no-failures").hidden = failures.length > 0;
  fillTable($("failures").tBodies[0], failures.map((f) => [f.round, f.client_id, f.reason]));
}

function notice(text) {
  $("notice").hidden = !text;
  $("notice").textContent = text || "";
}

async function poll() {
  try {
    const reply = await fetch("api/run", { headers: { "Authorization": "Bearer " + token }, cache: "no-store" });
    if (reply.status === 401) {
      notice("This dashboard needs its access token: open the URL fedtune printed (…/?token=…).");
    } else if (!reply.ok) {
      notice("The dashboard answered " + reply.status + ".");
    } else {
      render(await reply.json());
      notice("");
    }
  } catch (err) {
    notice("Lost the dashboard server (the run may have ended): showing the last data received.");
  }
  window.setTimeout(poll, every);
}

poll();
