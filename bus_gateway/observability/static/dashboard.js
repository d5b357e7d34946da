// tinker-bus dashboard: polls the gateway's /dashboard/api/* with the API key typed above (sent as X-API-Key),
// and draws each curve of the selected model as a plain SVG line chart. No external scripts: works offline.
"use strict";
const POLL_MS = 2000;
const state = { key: localStorage.getItem("tinker-bus-key") || "", model: null, curves: {} };

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(tag === "svg" || attrs.svg ? "http://www.w3.org/2000/svg"
    : "http://www.w3.org/1999/xhtml", tag);
  for (const [k, v] of Object.entries(attrs)) if (k !== "svg") node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path) {
  const response = await fetch(path, { headers: { "X-API-Key": state.key } });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status} ${await response.text()}`);
  return response.json();
}

function fmt(value) {
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return value.toExponential(2);
  return Number.isInteger(value) ? String(value) : value.toFixed(3);
}

// `k=v, ...`; a list of dicts (one per worker instance) becomes one [k=v, ...] group per instance
function pairs(detail) {
  return Object.entries(detail || {}).filter(([k]) => k !== "healthy").map(([k, v]) => {
    if (Array.isArray(v) && v.length && v.every((item) => item && typeof item === "object")) {
      return v.map((item) => `[${pairs(item)}]`).join(" ");
    }
    return `${k}=${Array.isArray(v) ? `[${v.join(",")}]` : typeof v === "object" ? JSON.stringify(v) : v}`;
  }).join(", ");
}

function fillRows(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const cell of cells) tr.append(cell instanceof Node ? el("td").appendChild(cell).parentNode : el("td", {}, cell));
    return tr;
  }));
}

function badge(ok, yes = "healthy", no = "unhealthy") { return el("span", { class: ok ? "ok" : "bad" }, ok ? yes : no); }

function renderOverview(data) {
  fillRows("services", Object.entries(data.health.components).map(([name, c]) => [name, badge(c.healthy), pairs(c)]));
  fillRows("queues", Object.entries(data.queues).map(([role, q]) => [role,
    badge(q.queue_state === "active", q.queue_state, q.queue_state), q.queue_state_reason || ""]));
  const t = data.throughput || {};
  fillRows("throughput", [["training tokens/s", fmt(t.train_tokens_per_s ?? 0)],
    ["sampled tokens/s", fmt(t.sample_tokens_per_s ?? 0)], ["replies/s", fmt(t.replies_per_s ?? 0)],
    ["errors/s", fmt(t.errors_per_s ?? 0)]]);
  document.getElementById("metrics-error").textContent = data.metrics_error || "";
  const body = document.querySelector("#models tbody");
  body.replaceChildren(...data.models.map((m) => {
    const tr = el("tr", { class: "model" + (m.model_id === state.model ? " selected" : ""), "data-model": m.model_id });
    const loss = Object.entries(m.latest).find(([k]) => k.startsWith("loss"));
    for (const cell of [m.model_id, m.counts.forward_backward || 0, m.counts.tokens || 0, m.counts.errors || 0,
      loss ? fmt(loss[1]) : ""]) tr.append(el("td", {}, String(cell)));
    tr.addEventListener("click", () => selectModel(m.model_id));
    return tr;
  }));
  if (state.model === null && data.models.length) selectModel(data.models[0].model_id);
}

function selectModel(modelId) {
  state.model = modelId; state.curves = {};
  document.getElementById("curve-model").textContent = modelId;
  document.getElementById("charts").replaceChildren();
  for (const tr of document.querySelectorAll("tr.model")) tr.classList.toggle("selected", tr.dataset.model === modelId);
  pollCurves();
}

function chart(name, points) {
  const W = 320, H = 150, L = 46, B = 18, T = 6, R = 8;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[2]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => L + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (W - L - R);
  const sy = (y) => T + (y1 > y0 ? 1 - (y - y0) / (y1 - y0) : 0.5) * (H - T - B);
  const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  svg.append(el("line", { svg: 1, class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    el("line", { svg: 1, class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    el("text", { svg: 1, x: 2, y: T + 8 }, fmt(y1)), el("text", { svg: 1, x: 2, y: H - B }, fmt(y0)),
    el("text", { svg: 1, x: L, y: H - 4 }, fmt(x0)), el("text", { svg: 1, x: W - R - 30, y: H - 4 }, fmt(x1)));
  const d = points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[2]).toFixed(1)}`).join("");
  svg.append(el("path", { svg: 1, class: "line", d }));
  for (const p of points.length <= 60 ? points : []) svg.append(el("circle", { svg: 1, cx: sx(p[0]), cy: sy(p[2]), r: 2, fill: "#2f6fdb" }));
  const box = el("div", { class: "chart", "data-series": name, "data-points": points.length });
  box.append(el("h3", {}, `${name} (${points.length})`), svg);
  return box;
}

function renderCurves() {
  const names = Object.keys(state.curves).sort((a, b) => (b.startsWith("loss") - a.startsWith("loss")) || a.localeCompare(b));
  document.getElementById("charts").replaceChildren(...names.filter((n) => state.curves[n].length)
    .map((n) => chart(n, state.curves[n])));
}

async function pollCurves() {
  if (!state.model) return;
  const model = state.model;
  // The whole curves each time: at most a few series of MAX_POINTS points (the API's `since` serves
  // incremental readers; here sampling series count their own x, so one `since` would not fit them all).
  const data = await api(`/dashboard/api/models/${encodeURIComponent(model)}`);
  if (model !== state.model) return;
  const changed = Object.entries(data.series).some(([n, pts]) => (state.curves[n] || []).length !== pts.length);
  state.curves = data.series;
  if (changed || !document.querySelector(".chart")) renderCurves();
}

async function tick() {
  if (!state.key) return;
  try {
    renderOverview(await api("/dashboard/api/overview"));
    await pollCurves();
    document.getElementById("status").textContent = `live, updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("status").textContent = String(err.message || err);
  }
}

document.getElementById("api-key").value = state.key;
document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = document.getElementById("api-key").value.trim();
  localStorage.setItem("tinker-bus-key", state.key);
  state.model = null;
  tick();
});
tick();
setInterval(tick, POLL_MS);
