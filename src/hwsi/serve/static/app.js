// hwsi viewer page: slide list, overlays, region of interest, chat with streamed answers and evidence.
// URL: ?slide=ID opens that slide; the hash holds the view and ROI (#cx=..&cy=..&s=..&roi=r:x,y,w,h | p:x,y;x,y;..),
// all level-0 px, so a link reopens the same view. window.hwsi is a small API for tests and power users.
"use strict";

const $ = (id) => document.getElementById(id);
const api = async (url, opts) => {
  const r = await fetch(url, opts);
  if (!r.ok) throw new Error(`${url}: ${r.status} ${(await r.text()).slice(0, 200)}`);
  return r;
};

const state = {
  slide: null,        // /api/slides/{id} info
  grid: null, spf: null, tissue: null,
  heatmap: null,      // (R, G) scores of the latest answer
  evidence: [],       // evidence items of the latest answer
  highlight: null,    // evidence item clicked last
  nuclei: null, nucleiBox: null, nucleiTimer: null,
  session: null, busy: false,
  tokenEvents: 0,     // streamed token events received (for tests and the status line)
  shown: [],          // length of the displayed answer after each token event of the current answer
  roi: null,          // {x, y, w, h} or {polygon: [[x, y], ...]} in level-0 px; null: the whole slide
};

const viewer = new SlideView($("viewer"), { onchange: onViewChange, onroi: (roi) => setRoi(roi) });

const overlays = installOverlays(viewer, state, api);   // overlays.js

function onViewChange(v) {
  const s = state.slide;
  if (!s) return;
  const bar = niceScaleBar(v.umPerScreenPixel(s.mpp));
  $("scalebar-bar").style.width = `${bar.px.toFixed(1)}px`;
  $("scalebar-label").textContent = bar.label;
  $("status").textContent = `level ${v.level}/${s.dzi_info.max_level} · ${(s.mpp / v.scale).toFixed(2)} µm/px`;
  document.body.dataset.level = String(v.level);
  overlays.viewChanged();
  scheduleHash();
}

// ---------------------------------------------------------------------------------------------- slides
async function loadSlides() {
  const data = await (await api("/api/slides")).json();
  $("model-name").textContent = data.model ? `model: ${data.model}` : "no model loaded (chat disabled)";
  const ul = $("slide-list");
  ul.innerHTML = "";
  for (const s of data.slides) {
    const li = document.createElement("li");
    li.dataset.slide = s.id;
    const img = document.createElement("img");
    img.src = s.thumbnail; img.alt = s.id; img.loading = "lazy";
    const span = document.createElement("span");
    span.textContent = `${s.id} (${s.mpp.toFixed(3)} µm/px)`;
    li.append(img, span);
    li.addEventListener("click", () => openSlide(s.id, null, true));
    ul.append(li);
  }
  const want = HwsiUrl.read();
  const ids = data.slides.map((s) => s.id);
  if (want.slide !== null && !ids.includes(want.slide)) $("status").textContent = `no slide ${want.slide} in this job`;
  const id = ids.includes(want.slide) ? want.slide : ids[0];
  if (id !== undefined) await openSlide(id, id === want.slide ? want : null, false);
}

async function openSlide(id, view = null, push = false) {
  const enc = encodeURIComponent(id);
  const s = await (await api(`/api/slides/${enc}`)).json();
  Object.assign(state, { slide: s, heatmap: null, evidence: [], highlight: null, nuclei: null, nucleiBox: null,
                         session: null, roi: null, grid: null, spf: null, tissue: null });
  for (const li of $("slide-list").children) li.classList.toggle("active", li.dataset.slide === id);
  $("slide-title").textContent = `${s.id} — ${s.width}×${s.height} px, ${s.mpp} µm/px`;
  $("messages").innerHTML = "";
  $("export-link").href = `/api/slides/${enc}/export.geojson`;
  $("legend").innerHTML = "";
  for (const t of s.nucleus_types) {
    const d = document.createElement("div");
    const dot = document.createElement("span"); dot.style.background = t.colour;
    d.append(dot, document.createTextNode(t.name));
    $("legend").append(d);
  }
  $("ov-spf").disabled = !s.overlays.spf;
  $("ov-nuclei").disabled = !s.overlays.nuclei;
  if (push) history.pushState(null, "", HwsiUrl.build(id, null, null));
  await viewer.open({ width: s.width, height: s.height, maxLevel: s.dzi_info.max_level }, s.dzi);
  const [grid, spf] = await Promise.all([
    api(`/api/slides/${enc}/overlays/grid`).then((r) => r.json()),
    s.overlays.spf ? api(`/api/slides/${enc}/overlays/spf`).then((r) => r.json()) : null,
  ]);
  if (state.slide !== s) return;   // another slide was opened meanwhile
  state.grid = grid; state.spf = spf;
  state.tissue = new Image();
  state.tissue.onload = () => viewer.redraw();
  state.tissue.src = `/api/slides/${enc}/overlays/tissue.png`;
  if (view && view.s !== null && view.cx !== null && view.cy !== null) viewer.setView(view.cx, view.cy, view.s);
  setRoi(view ? view.roi : null);
  document.body.dataset.slide = id;
  viewer.redraw();
}

// ---------------------------------------------------------------------------------------------- ROI and URL
function setRoi(roi) {
  state.roi = roi ? HwsiRoi.normalise(roi) : null;
  viewer.showRoi(state.roi);
  $("roi-status").textContent = HwsiRoi.describe(state.roi);
  $("chat-title").textContent = state.roi ? "Ask about the ROI" : "Ask about this slide";
  for (const b of ["roi-rect", "roi-poly"]) $(b).classList.remove("active");
  document.body.dataset.roi = state.roi ? HwsiRoi.format(state.roi) : "";
  viewer.redraw();
  scheduleHash();
  return state.roi;
}
function setTool(tool) {
  viewer.setTool(tool);
  $("roi-rect").classList.toggle("active", tool === "rectangle");
  $("roi-poly").classList.toggle("active", tool === "polygon");
}
$("roi-rect").addEventListener("click", () => setTool($("roi-rect").classList.contains("active") ? null : "rectangle"));
$("roi-poly").addEventListener("click", () => setTool($("roi-poly").classList.contains("active") ? null : "polygon"));
$("roi-clear").addEventListener("click", () => { setTool(null); setRoi(null); });

function getView() {
  if (!state.slide || !viewer.item) return null;
  const [cx, cy] = viewer.center();
  const [x0, y0, x1, y1] = viewer.viewBox();
  return { slide: state.slide.id, cx, cy, scale: viewer.scale, level: viewer.currentLevel(), box: [x0, y0, x1, y1],
           umPerPx: viewer.umPerScreenPixel(state.slide.mpp), roi: state.roi };
}
let hashTimer = null;
function scheduleHash() {   // the view and ROI in the URL (replaceState: no history entry per pan)
  clearTimeout(hashTimer);
  hashTimer = setTimeout(() => {
    const v = getView();
    if (!v) return;
    const url = HwsiUrl.build(v.slide, v, state.roi);
    history.replaceState(null, "", url);
    $("view-link").href = url;
  }, 250);
}
window.addEventListener("hashchange", () => {   // a hash typed or pasted on this page: go to that view and ROI
  const want = HwsiUrl.read();
  if (!state.slide || !viewer.item || (want.slide !== null && want.slide !== state.slide.id)) return;
  if (want.s !== null && want.cx !== null && want.cy !== null) viewer.setView(want.cx, want.cy, want.s);
  setRoi(want.roi);
});
window.addEventListener("popstate", () => {
  const want = HwsiUrl.read();
  if (want.slide && (!state.slide || want.slide !== state.slide.id)) openSlide(want.slide, want, false);
});

// ---------------------------------------------------------------------------------------------- chat
function addMessage(cls, text) {
  const d = document.createElement("div");
  d.className = `msg ${cls}`;
  d.textContent = text;
  $("messages").append(d);
  $("messages").scrollTop = $("messages").scrollHeight;
  return d;
}

function showEvidence(msg, items) {
  const box = document.createElement("div");
  box.className = "evidence";
  for (const e of items) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "evidence-item";
    b.textContent = `${e.kind} r${e.region}${e.patch >= 0 ? " p" + e.patch : ""} · ${e.score.toFixed(2)}`;
    b.addEventListener("click", () => {
      state.highlight = e;
      viewer.fitBox(e.x, e.y, e.w, e.h, e.kind === "region" ? 1.3 : 3);
    });
    box.append(b);
  }
  msg.append(box);
}

async function ask(question) {
  if (!state.slide || state.busy) return;
  state.busy = true;
  $("ask").disabled = true;
  const roi = state.roi;
  addMessage("user", roi ? `${question}\n(${HwsiRoi.describe(roi)})` : question);
  const msg = addMessage("assistant", "");
  const text = document.createElement("div");
  text.className = "answer-text";
  msg.append(text);
  document.body.dataset.chat = "streaming";
  state.shown = [];
  try {
    if (!state.session || state.session.slide !== state.slide.id) {
      const r = await api("/api/chat", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ slide_id: state.slide.id }) });
      state.session = { id: (await r.json()).session_id, slide: state.slide.id };
    }
    const sess = state.session;
    const r = await api(`/api/chat/${encodeURIComponent(sess.id)}/ask`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(roi ? { question, roi: HwsiRoi.toApi(roi) } : { question }),
    });
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl); buf = buf.slice(nl + 1);
        if (line.trim()) await handleEvent(JSON.parse(line), msg, text, sess);
      }
    }
  } catch (e) {
    msg.classList.add("error");
    text.textContent += `\n[error] ${e.message}`;
  } finally {
    state.busy = false;
    $("ask").disabled = false;
    document.body.dataset.chat = "idle";
  }
}

async function handleEvent(ev, msg, text, sess) {
  if (ev.type === "token") {
    text.textContent += ev.text;
    state.shown.push(text.textContent.length);
    state.tokenEvents++;
    document.body.dataset.tokens = String(state.tokenEvents);
  } else if (ev.type === "error") {
    msg.classList.add("error");
    text.textContent += (text.textContent ? "\n" : "") + `[error] ${ev.message}`;
  } else if (ev.type === "roi") {   // what the answer covers, as the server recorded it
    const note = document.createElement("div");
    note.className = "msg roi";
    note.textContent = ev.summary;
    msg.before(note);
  } else if (ev.type === "evidence") {
    state.evidence = ev.items;
    state.highlight = null;
    showEvidence(msg, ev.items);
    const h = await (await api(`/api/chat/${encodeURIComponent(sess.id)}/heatmap?turn=${ev.turn}`)).json();
    state.heatmap = h.scores;
    $("export-link").href = `/api/slides/${encodeURIComponent(sess.slide)}/export.geojson?session=${encodeURIComponent(sess.id)}`;
    document.body.dataset.evidence = String(ev.items.length);
    viewer.redraw();
  }
}

$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("question").value.trim();
  if (q) { $("question").value = ""; ask(q); }
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); }
});
$("zoom-in").addEventListener("click", () => viewer.zoomBy(2));
$("zoom-out").addEventListener("click", () => viewer.zoomBy(0.5));
$("zoom-home").addEventListener("click", () => viewer.home());

window.hwsi = {
  state, viewer,
  setRoi: (roi) => setRoi(roi),          // {x, y, w, h} | {polygon: [[x, y], ...]} | [[x, y], ...] | null, level-0 px
  getRoi: () => state.roi,
  getView,                                // {slide, cx, cy, scale, level, box, umPerPx, roi}
  setView: (cx, cy, scale) => viewer.setView(cx, cy, scale),
  fitBox: (x, y, w, h, margin) => viewer.fitBox(x, y, w, h, margin),
  setTool,                                // "rectangle" | "polygon" | null
  openSlide: (id) => openSlide(id, null, true),
  ask,
  ready: loadSlides().then(() => true).catch((e) => { $("status").textContent = String(e); return false; }),
};
