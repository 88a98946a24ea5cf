// hwsi viewer: the region of interest and the page's URL, as plain functions (level-0 px everywhere).
// ROI: {x, y, w, h} (a rectangle) or {polygon: [[x, y], ...]} (open ring, >= 3 vertices).
"use strict";

const HwsiRoi = {
  // a copy with whole level-0 px; throws an Error naming what is wrong
  normalise(roi) {
    if (!roi || typeof roi !== "object") throw new Error("ROI must be {x, y, w, h} or {polygon: [[x, y], ...]}");
    if (Array.isArray(roi)) roi = { polygon: roi };
    if (roi.polygon) {
      const pts = roi.polygon.map((p) => [Math.round(Number(p[0])), Math.round(Number(p[1]))]);
      if (pts.length > 1 && pts[0][0] === pts[pts.length - 1][0] && pts[0][1] === pts[pts.length - 1][1]) pts.pop();
      if (pts.length < 3 || pts.some((p) => !Number.isFinite(p[0]) || !Number.isFinite(p[1])))
        throw new Error("ROI polygon needs at least 3 finite [x, y] vertices");
      return { polygon: pts };
    }
    const r = {};
    for (const k of ["x", "y", "w", "h"]) {
      r[k] = Math.round(Number(roi[k]));
      if (!Number.isFinite(r[k])) throw new Error(`ROI ${k} must be a number (level-0 px)`);
    }
    return r;
  },
  // the `roi` of an ask body (docs/roi.md): {x, y, w, h} or a GeoJSON Polygon with a closed ring
  toApi(roi) {
    if (roi.polygon) return { type: "Polygon", coordinates: [[...roi.polygon, roi.polygon[0]]] };
    return { x: roi.x, y: roi.y, w: roi.w, h: roi.h };
  },
  bounds(roi) {
    if (!roi.polygon) return [roi.x, roi.y, roi.w, roi.h];
    const xs = roi.polygon.map((p) => p[0]), ys = roi.polygon.map((p) => p[1]);
    const x0 = Math.min(...xs), y0 = Math.min(...ys);
    return [x0, y0, Math.max(...xs) - x0, Math.max(...ys) - y0];
  },
  describe(roi) {
    if (!roi) return "no ROI: questions are about the whole slide";
    if (roi.polygon) return `ROI: polygon of ${roi.polygon.length} vertices (level-0 px)`;
    return `ROI: x ${roi.x}..${roi.x + roi.w}, y ${roi.y}..${roi.y + roi.h} (level-0 px)`;
  },
  // hash fragment value: r:x,y,w,h or p:x,y;x,y;...
  format(roi) {
    return roi.polygon ? "p:" + roi.polygon.map((p) => p.join(",")).join(";") : `r:${roi.x},${roi.y},${roi.w},${roi.h}`;
  },
  parse(text) {
    if (text.startsWith("r:")) {
      const [x, y, w, h] = text.slice(2).split(",").map(Number);
      return HwsiRoi.normalise({ x, y, w, h });
    }
    if (text.startsWith("p:")) return HwsiRoi.normalise({ polygon: text.slice(2).split(";").map((p) => p.split(",").map(Number)) });
    throw new Error(`ROI in the URL must start with r: or p:, got ${text.slice(0, 20)}`);
  },
};

// the page's URL: ?slide=ID#cx=..&cy=..&s=..&roi=..
const HwsiUrl = {
  read() {
    const q = new URLSearchParams(location.search), h = new URLSearchParams(location.hash.slice(1));
    const num = (k) => (h.has(k) && Number.isFinite(Number(h.get(k))) ? Number(h.get(k)) : null);
    let roi = null;
    if (h.get("roi")) { try { roi = HwsiRoi.parse(h.get("roi")); } catch (e) { console.warn(e.message); } }
    return { slide: q.get("slide"), cx: num("cx"), cy: num("cy"), s: num("s"), roi };
  },
  build(slide, view, roi) {
    const h = new URLSearchParams();
    if (view) { h.set("cx", view.cx.toFixed(0)); h.set("cy", view.cy.toFixed(0)); h.set("s", view.scale.toPrecision(4)); }
    if (roi) h.set("roi", HwsiRoi.format(roi));
    return `${location.pathname}?slide=${encodeURIComponent(slide)}#${h.toString()}`;
  },
};

window.HwsiRoi = HwsiRoi;
window.HwsiUrl = HwsiUrl;
