// hwsi viewer overlays, drawn over the slide in this order after every viewport change (level-0 px to screen through
// SlideView): tissue mask, relevance heatmap, region/patch grid, SPF-selected patches, nuclei by type (high zoom only,
// fetched for the box in view), answer evidence, the ROI outline. Checkbox #ov-<name> switches each one; `state` is
// the page's (app.js).
"use strict";

function installOverlays(viewer, state, api) {
  const $ = (id) => document.getElementById(id);
  const on = (id) => $(id).checked;
  const rectScreen = (x, y, w, h) => viewer.rectScreen(x, y, w, h);
  const inView = (x, y, w, h) => viewer.inView(x, y, w, h);
  for (const id of ["ov-tissue", "ov-grid", "ov-spf", "ov-heatmap", "ov-nuclei", "ov-evidence"]) {
    $(id).addEventListener("change", () => { if (id === "ov-nuclei") scheduleNuclei(); viewer.redraw(); });
  }

  viewer.overlays.push((ctx) => {   // tissue mask
    if (!on("ov-tissue") || !state.tissue || !state.tissue.complete) return;
    const s = state.slide;
    const [sx, sy, sw, sh] = rectScreen(0, 0, s.width, s.height);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(state.tissue, sx, sy, sw, sh);
  });

  function heatColour(v) {  // 0..1 -> blue..yellow..red
    const r = Math.round(255 * Math.min(1, 2 * v)), g = Math.round(255 * Math.min(1, 2 * (1 - v))), b = Math.round(255 * Math.max(0, 1 - 3 * v));
    return `rgba(${r},${g},${b},0.45)`;
  }

  viewer.overlays.push((ctx) => {   // heatmap of the latest answer
    if (!on("ov-heatmap") || !state.heatmap || !state.grid) return;
    const g = state.grid, p = g.patch_size_level0;
    state.heatmap.forEach((row, r) => {
      const [rx, ry] = g.regions[r];
      if (!inView(rx, ry, g.region_size_level0, g.region_size_level0)) return;
      row.forEach((v, i) => {
        if (v === null) return;
        const x = rx + (i % g.grid_side) * p, y = ry + Math.floor(i / g.grid_side) * p;
        ctx.fillStyle = heatColour(v);
        ctx.fillRect(...rectScreen(x, y, p, p));
      });
    });
  });

  viewer.overlays.push((ctx) => {   // region and patch grid
    if (!on("ov-grid") || !state.grid) return;
    const g = state.grid, p = g.patch_size_level0, showPatches = p * viewer.frame.s >= 6;
    g.regions.forEach(([rx, ry], r) => {
      if (!inView(rx, ry, g.region_size_level0, g.region_size_level0)) return;
      if (showPatches) {
        ctx.strokeStyle = "rgba(255,255,255,0.35)"; ctx.lineWidth = 1;
        const t = g.patch_tissue[r];
        for (let i = 0; i < t.length; i++) {
          const x = rx + (i % g.grid_side) * p, y = ry + Math.floor(i / g.grid_side) * p;
          ctx.setLineDash(t[i] === "1" ? [] : [2, 3]);
          ctx.strokeRect(...rectScreen(x, y, p, p));
        }
        ctx.setLineDash([]);
      }
      ctx.strokeStyle = "rgba(0,230,255,0.9)"; ctx.lineWidth = 2;
      ctx.strokeRect(...rectScreen(rx, ry, g.region_size_level0, g.region_size_level0));
    });
  });

  viewer.overlays.push((ctx) => {   // SPF-selected patches
    if (!on("ov-spf") || !state.spf) return;
    const p = state.spf.patch_size_level0, e = 2 / viewer.frame.s;
    ctx.strokeStyle = "#00a0ff"; ctx.lineWidth = 2;
    for (const s of state.spf.patches) if (inView(s.x, s.y, p, p)) ctx.strokeRect(...rectScreen(s.x + e, s.y + e, p - 2 * e, p - 2 * e));
  });

  viewer.overlays.push((ctx) => {   // nuclei coloured by type
    if (!on("ov-nuclei") || !state.nuclei || !nucleiZoom()) return;
    const n = state.nuclei, colours = {};
    for (const t of n.types) colours[t.index] = t.colour;
    ctx.lineWidth = 1.5;
    for (let i = 0; i < n.x.length; i++) {
      const [sx, sy] = viewer.pointScreen(n.x[i], n.y[i]);
      ctx.strokeStyle = colours[n.type[i]] || "#fff";
      ctx.beginPath();
      ctx.arc(sx, sy, Math.max(2, n.radius[i] * viewer.frame.s), 0, 2 * Math.PI);
      ctx.stroke();
    }
  });

  viewer.overlays.push((ctx) => {   // evidence of the latest answer
    if (!on("ov-evidence")) return;
    ctx.font = "12px system-ui";
    for (const e of state.evidence) {
      const hl = state.highlight === e;
      ctx.strokeStyle = e.kind === "region" ? "#ff8c00" : "#ffd700";
      ctx.lineWidth = hl ? 4 : 2;
      const [sx, sy, sw, sh] = rectScreen(e.x, e.y, e.w, e.h);
      ctx.strokeRect(sx, sy, sw, sh);
      ctx.fillStyle = ctx.strokeStyle;
      ctx.fillText(`${e.kind} r${e.region}${e.patch >= 0 ? " p" + e.patch : ""}`, sx + 3, sy - 4);
    }
  });

  viewer.overlays.push((ctx) => {   // the ROI (also shown, editable, by Annotorious): a dashed outline
    const r = state.roi;
    if (!r) return;
    ctx.strokeStyle = "#ffffff"; ctx.lineWidth = 1; ctx.setLineDash([6, 4]);
    if (r.polygon) {
      ctx.beginPath();
      r.polygon.forEach(([x, y], i) => { const [sx, sy] = viewer.pointScreen(x, y); i ? ctx.lineTo(sx, sy) : ctx.moveTo(sx, sy); });
      ctx.closePath(); ctx.stroke();
    } else ctx.strokeRect(...rectScreen(r.x, r.y, r.w, r.h));
  });

  // nuclei are fetched only at high zoom, only for the box in view (debounced)
  function nucleiZoom() { return state.slide && viewer.umPerScreenPixel(state.slide.mpp) <= 1.0; }
  function scheduleNuclei() {
    clearTimeout(state.nucleiTimer);
    state.nucleiTimer = setTimeout(fetchNuclei, 150);
  }
  async function fetchNuclei() {
    const s = state.slide;
    if (!s || !s.overlays.nuclei || !on("ov-nuclei")) { $("nuclei-status").textContent = ""; return; }
    if (!nucleiZoom()) { $("nuclei-status").textContent = "zoom in to see nuclei"; return; }
    const [x0, y0, x1, y1] = viewer.viewBox().map(Math.round);
    const b = state.nucleiBox;
    if (b && x0 >= b[0] && y0 >= b[1] && x1 <= b[2] && y1 <= b[3]) return;   // view inside what we have
    const w = x1 - x0, h = y1 - y0, box = [x0 - w / 2, y0 - h / 2, x1 + w / 2, y1 + h / 2].map(Math.round);
    const sid = s.id;
    const r = await api(`/api/slides/${encodeURIComponent(sid)}/overlays/nuclei?x0=${box[0]}&y0=${box[1]}&x1=${box[2]}&y1=${box[3]}`);
    const data = await r.json();
    if (!state.slide || state.slide.id !== sid) return;
    state.nuclei = data; state.nucleiBox = box;
    $("nuclei-status").textContent = `${data.x.length} nuclei loaded around the view${data.truncated ? " (truncated)" : ""}`;
    document.body.dataset.nuclei = String(data.x.length);
    viewer.redraw();
  }

  return { viewChanged: () => { if (on("ov-nuclei")) scheduleNuclei(); } };
}

window.installOverlays = installOverlays;
