// mmpt search page: asks /api/info what the model takes, sends the query to /api/search, shows each hit as
// what it is (the server says: image, audio, text, or a preview it decodes, e.g. points drawn below).
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function pickModality() {
  const q = info.query[$("modality").value];
  $("text").disabled = !q.text;
  $("text").placeholder = q.text ? "type a " + $("modality").value + " query" : "upload a file for this modality";
  $("file").accept = q.upload.map((e) => "." + e).join(",");
}

async function load() {
  info = await (await fetch("api/info")).json();
  $("about").textContent = info.count + " vectors (" + Object.entries(info.modalities).map(([m, n]) => m + " " + n)
    .join(", ") + "), " + info.index.kind + " index";
  for (const m of Object.keys(info.query)) $("modality").add(new Option(m, m));
  for (const m of Object.keys(info.modalities)) $("target").add(new Option(m, m));
  const typed = Object.keys(info.query).find((m) => info.query[m].text);
  if (typed) $("modality").value = typed;
  $("k").max = info.k_max;
  pickModality();
  $("modality").addEventListener("change", pickModality);
  $("file").addEventListener("change", () => {  // a file picks the modality that takes its suffix
    const f = $("file").files[0];
    if (!f) return;
    const ext = f.name.split(".").pop().toLowerCase();
    const m = Object.keys(info.query).find((m) => info.query[m].upload.includes(ext));
    if (m) { $("modality").value = m; pickModality(); }
  });
}

function drawPoints(canvas, points) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.fillStyle = "#111"; ctx.fillRect(0, 0, w, h);
  const a = 0.6, b = 0.4;  // a fixed view: turn about y, then tilt about x
  const proj = points.map((p) => {
    const x = p[0] * Math.cos(a) + p[2] * Math.sin(a), z = -p[0] * Math.sin(a) + p[2] * Math.cos(a);
    const y = p[1] * Math.cos(b) - z * Math.sin(b), d = p[1] * Math.sin(b) + z * Math.cos(b);
    return [x, y, d, p];
  });
  const xs = proj.map((p) => p[0]), ys = proj.map((p) => p[1]);
  const lo = Math.min(...xs, ...ys), hi = Math.max(...xs, ...ys), s = 0.9 * Math.min(w, h) / ((hi - lo) || 1);
  const cx = (Math.min(...xs) + Math.max(...xs)) / 2, cy = (Math.min(...ys) + Math.max(...ys)) / 2;
  const rgbMax = Math.max(1, ...points.map((p) => p.length >= 6 ? Math.max(p[3], p[4], p[5]) : 0));
  proj.sort((p, q) => p[2] - q[2]);
  for (const [x, y, d, p] of proj) {
    ctx.fillStyle = p.length >= 6
      ? "rgb(" + [3, 4, 5].map((i) => Math.round(255 * p[i] / rgbMax)).join(",") + ")"
      : "hsl(200, 80%, " + Math.round(40 + 25 * d) + "%)";
    ctx.fillRect(w / 2 + (x - cx) * s - 1, h / 2 - (y - cy) * s - 1, 3, 3);
  }
}

async function mediaElement(hit) {
  const m = hit.media;
  if (!m) return null;
  if (m.type === "image") { const img = new Image(); img.src = m.url; img.alt = hit.key; return img; }
  if (m.type === "audio") { const au = document.createElement("audio"); au.controls = true; au.src = m.url; return au; }
  const res = await fetch(m.url);
  if (!res.ok) { const pre = document.createElement("pre"); pre.textContent = "(media unavailable)"; return pre; }
  if (m.type === "text") { const pre = document.createElement("pre"); pre.textContent = await res.text(); return pre; }
  const body = await res.json();
  if (body.points) {
    const c = document.createElement("canvas"); c.width = 190; c.height = 160; drawPoints(c, body.points); return c;
  }
  const pre = document.createElement("pre"); pre.textContent = body.text || ""; return pre;
}

async function show(hits) {
  const grid = $("results");
  grid.textContent = "";
  for (const hit of hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.dataset.modality = hit.modality;
    const media = await mediaElement(hit);
    if (media) card.appendChild(media);
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("div"); score.className = "score";
    score.textContent = hit.modality + " · " + (hit.score === null ? "" : hit.score.toFixed(3));
    meta.appendChild(score);
    if (hit.caption) { const c = document.createElement("div"); c.className = "caption"; c.textContent = hit.caption; meta.appendChild(c); }
    const key = document.createElement("div"); key.className = "key"; key.textContent = hit.key; meta.appendChild(key);
    card.appendChild(meta);
    grid.appendChild(card);
  }
}

$("query").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = new FormData();
  form.append("modality", $("modality").value);
  form.append("k", $("k").value);
  if ($("target").value) form.append("target", $("target").value);
  const f = $("file").files[0];
  if (f && (!$("text").value || $("text").disabled)) form.append("file", f, f.name);
  else form.append("text", $("text").value);
  setStatus("searching…");
  const t0 = performance.now();
  const res = await fetch("api/search", { method: "POST", body: form });
  const body = await res.json();
  if (!res.ok) { setStatus(body.error || res.statusText, true); return; }
  await show(body.hits);
  setStatus(body.hits.length + " hits in " + Math.round(performance.now() - t0) + " ms");
  document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
});

load().catch((e) => setStatus("cannot reach the server: " + e, true));
