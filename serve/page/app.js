// The search page: plain JS against the same HTTP API as any client. A key the page was opened with (/?key=...)
// is kept in this tab only and sent as a bearer token; it is removed from the address bar at once.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const key = params.get("key") || sessionStorage.getItem("bicascade-key");
if (params.has("key")) {
  sessionStorage.setItem("bicascade-key", key);
  params.delete("key");
  history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
}
const headers = key ? { Authorization: "Bearer " + key } : {};
let levels = 0;
let lastImage = null;

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...headers, ...(options.headers || {}) } });
  const type = resp.headers.get("content-type") || "";
  const body = type.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok) throw new Error((body && body.error) || `${resp.status} ${resp.statusText}`);
  return body;
}

function thumb(id) {
  const img = new Image();
  img.alt = "";
  img.loading = "lazy";
  img.decoding = "async";
  if (key) {  // <img src> cannot send a header: fetch the bytes with the key
    fetch(`/images/${id}?size=256`, { headers }).then((r) => r.blob()).then((b) => { img.src = URL.createObjectURL(b); });
  } else {
    img.src = `/images/${id}?size=256`;
  }
  return img;
}

function render(doc, label) {
  const grid = $("grid");
  grid.replaceChildren();
  const stats = doc.stats;
  for (const [n, r] of doc.results.entries()) {
    const li = document.createElement("li");
    li.dataset.id = r.id;
    const link = document.createElement("a");
    link.href = `/images/${r.id}`;
    link.target = "_blank";
    link.rel = "noopener";
    link.setAttribute("aria-label", `result ${n + 1}: ${r.uri || r.id}, score ${r.score.toFixed(3)}`);
    link.append(thumb(r.id));
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${n + 1}. ${r.score.toFixed(4)}`;
    const uri = document.createElement("span");
    uri.className = "uri";
    uri.textContent = r.uri || r.id;
    uri.title = r.uri || r.id;
    const trail = document.createElement("div");
    trail.className = "trail";
    for (const [j, step] of r.levels.entries()) {
      const b = document.createElement("span");
      b.className = "badge " + (j === 0 ? "" : step.cached ? "cached" : "fresh");
      b.title = `${step.model}: ${j === 0 ? "level 0 (index)" : step.cached ? "from the cache" : "freshly encoded"}`;
      b.textContent = `L${j} ${step.score.toFixed(3)}${j === 0 ? "" : step.cached ? " ✓" : " ★"}`;
      trail.append(b);
    }
    const more = document.createElement("button");
    more.type = "button";
    more.className = "more";
    more.textContent = "More like this";
    more.addEventListener("click", () => search({ image_id: r.id }, `images like ${r.uri || r.id}`));
    const captured = document.createElement("div");
    captured.className = "captured";
    if (r.keyword_rank || r.cascade_rank) {
      captured.title = "place in the keyword list and in the cascade's";
      captured.dataset.ranks = `words #${r.keyword_rank || "–"} · meaning #${r.cascade_rank || "–"}`;
      captured.textContent = captured.dataset.ranks;
    }
    meta.append(score, uri, captured, trail, more);
    li.append(link, meta);
    grid.append(li);
  }
  const spent = stats.gflops, full = stats.uncascaded_gflops;
  const cost = $("cost");
  cost.hidden = false;
  const per = stats.levels.map((l) => `${l.model}: ${l.candidates} ranked, ${l.cache_hits} cached, ${l.encoded} encoded`).join(" · ");
  const share = full > 0 ? Math.min(100, (100 * spent) / full) : 0;
  cost.innerHTML = "";
  const line = document.createElement("div");
  line.textContent = `${doc.results.length} results for ${label} in ${stats.ms.toFixed(1)} ms. Image encoding: ` +
    `${spent.toFixed(3)} GFLOPs` + (full > 0 ? ` vs ${full.toFixed(3)} for the top level over every candidate` : " (all cached)") +
    `; ${stats.text_encodes} query embedding(s).`;
  const detail = document.createElement("div");
  detail.className = "uri";
  detail.textContent = per;
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.innerHTML = `<span style="width:${share.toFixed(1)}%"></span>`;
  cost.append(line, detail, bar);
  status(doc.results.length ? "" : "No results.");
  describe(new Map([...grid.children].map((li) => [li.dataset.id, li.querySelector(".captured")])));
  window.scrollTo({ top: 0 });  // "More like this" is clicked far down the grid: show its summary and first result
}

function place(lat, lon) {
  return `${Math.abs(lat).toFixed(4)}° ${lat < 0 ? "S" : "N"}, ${Math.abs(lon).toFixed(4)}° ${lon < 0 ? "W" : "E"}`;
}

// when, with what and where each result was taken (its file's EXIF), under its path; `slots`: id -> the element of
// the grid these results were rendered into (a later search's grid is never written to)
async function describe(slots) {
  if (!slots.size) return;
  try {
    const items = await api("/metadata", { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify({ ids: [...slots.keys()] }) });
    for (const item of items) {
      const m = item.metadata || {};
      const el = slots.get(item.id);
      const parts = [m.taken && m.taken.replace("T", " ").slice(0, 16), m.camera,
                     m.lat != null && m.lon != null && place(m.lat, m.lon), el && el.dataset.ranks].filter(Boolean);
      if (el) el.textContent = parts.join(" · ");
    }
  } catch (e) { /* the results stand without their capture details */ }
}

function filters() {
  const where = {};
  if ($("after").value) where.taken_after = $("after").value;
  if ($("before").value) {  // the day chosen is included: before the next midnight
    const next = new Date($("before").value + "T00:00:00Z");
    next.setUTCDate(next.getUTCDate() + 1);
    where.taken_before = next.toISOString().slice(0, 10);
  }
  if ($("camera").value) where.camera = $("camera").value;
  return Object.keys(where).length ? { where } : {};
}

async function loadFacets() {
  try {
    const f = await api("/facets");
    for (const c of f.cameras) {
      const o = document.createElement("option");
      o.value = c.name;
      o.textContent = `${c.name} (${c.count})`;
      $("camera").append(o);
    }
    if (f.taken.min) { $("after").min = $("before").min = f.taken.min.slice(0, 10); }
    if (f.taken.max) { $("after").max = $("before").max = f.taken.max.slice(0, 10); }
  } catch (e) { /* no filters offered: search still works */ }
}

let latest = 0;  // filters re-run searches as they change: only the newest one's answer is shown

async function search(body, label) {
  const mine = ++latest;
  const depth = Number($("depth").value) || undefined;
  const mode = body.query && $("mode").value !== "semantic" ? { mode: $("mode").value } : {};
  status("Searching…");
  try {
    const doc = await api("/search", { method: "POST", headers: { "Content-Type": "application/json" },
                                       body: JSON.stringify({ k: 24, depth, ...mode, ...filters(), ...body }) });
    if (mine === latest) render(doc, label);
  } catch (e) {
    if (mine === latest) status(`Search failed: ${e.message}`, true);
  }
}

async function searchFile(file) {
  if (!file || !file.type.startsWith("image/")) { status("That is not an image file.", true); return; }
  const data = await new Promise((ok, fail) => {
    const reader = new FileReader();
    reader.onload = () => ok(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => fail(reader.error);
    reader.readAsDataURL(file);
  });
  lastImage = file.name || "a pasted image";
  search({ image: data }, lastImage);
}

async function loadLadder() {
  try {
    const ladder = await api("/ladder");
    levels = ladder.levels.length;
    const select = $("depth");
    for (let d = levels; d >= 1; d--) {
      const o = document.createElement("option");
      o.value = d;
      o.textContent = d === levels ? `all ${d}` : d === 1 ? "1 (level 0 alone)" : `${d}`;
      select.append(o);
    }
  } catch (e) {
    status(`This server did not answer: ${e.message}`, true);
  }
}

async function loadStats() {
  try {
    const s = await api("/stats");
    const rows = s.levels.map((l, j) => `<tr><td>${j}</td><td>${esc(l.model)}</td><td>${l.cached}</td>` +
      `<td>${(100 * l.coverage).toFixed(2)}%</td></tr>`).join("");
    const replicas = Object.entries(s.replicas || {}).map(([n, c]) => `${esc(n)} ${c}`).join(", ");
    $("stats").innerHTML = `<p>${s.rows} images, ladder ${esc(s.ladder || "")}, ${s.queries} queries on this router; ` +
      `lifetime image encoding ${s.encoder_gflops.toFixed(1)} GFLOPs vs ${s.uncascaded_gflops.toFixed(1)} uncascaded ` +
      `(${s.cost_ratio ? s.cost_ratio.toFixed(2) + "x cheaper" : "n/a"}). Replicas: ${replicas}.</p>` +
      `<table><thead><tr><th>level</th><th>model</th><th>cached images</th><th>coverage</th></tr></thead>` +
      `<tbody>${rows}</tbody></table>`;
  } catch (e) {
    $("stats").textContent = `Stats unavailable: ${e.message}`;
  }
}

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

$("search").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("q").value.trim();
  if (!q) { status("Type a description, or drop an image.", true); return; }
  const url = new URL(location.href);
  url.searchParams.set("q", q);
  history.replaceState(null, "", url);
  search({ query: q }, `“${q}”`);
});
$("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
$("q").addEventListener("dragover", (e) => { e.preventDefault(); $("q").classList.add("drop"); });
$("q").addEventListener("dragleave", () => $("q").classList.remove("drop"));
$("q").addEventListener("drop", (e) => { e.preventDefault(); $("q").classList.remove("drop"); searchFile(e.dataTransfer.files[0]); });
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
  if (item) { e.preventDefault(); searchFile(item.getAsFile()); }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "/" && document.activeElement !== $("q")) { e.preventDefault(); $("q").focus(); }
});

loadLadder().then(() => {
  const q = params.get("q");
  if (q) { $("q").value = q; search({ query: q }, `“${q}”`); }
});
for (const id of ["mode", "after", "before", "camera"]) {  // a changed filter re-runs the current text search
  $(id).addEventListener("change", () => { if ($("q").value.trim()) $("search").requestSubmit(); });
}
loadFacets();
loadStats();
setInterval(loadStats, 5000);
