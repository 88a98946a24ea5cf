// hwsi slide view: OpenSeadragon over the server's Deep Zoom (DZI) tiles, a 2-D canvas for the level-0 overlays
// (drawn after every viewport change), and Annotorious for drawing a region of interest.
// Coordinates: every overlay and ROI is in level-0 pixels of the slide (the DZI image's pixels); `scale` is screen
// px per level-0 px (OpenSeadragon's "image zoom").
"use strict";

class SlideView {
  constructor(element, opts = {}) {
    this.element = element;
    this.onchange = opts.onchange || (() => {});
    this.onroi = opts.onroi || (() => {});
    this.overlays = [];          // functions (ctx, view) drawn in order after each viewport change
    this.image = null;           // {width, height, maxLevel}
    this.tilesLoaded = 0;
    this.osd = OpenSeadragon({
      element,
      showNavigationControl: false,   // the page's own buttons (#zoom-controls)
      showNavigator: true, navigatorPosition: "TOP_RIGHT", navigatorAutoFade: false,
      prefixUrl: "/static/vendor/openseadragon/images/",
      drawer: "canvas",               // 2-D canvas drawer: same pixels in headless test browsers as on screens
      maxZoomPixelRatio: 4, visibilityRatio: 0.5, minZoomImageRatio: 0.5,
      crossOriginPolicy: false, imageSmoothingEnabled: true,
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
    });
    this.canvas = document.createElement("canvas");
    this.canvas.id = "overlay";
    this.osd.canvas.appendChild(this.canvas);
    this.ctx = this.canvas.getContext("2d");
    this.pending = false;
    for (const ev of ["update-viewport", "resize", "open"]) this.osd.addHandler(ev, () => this.redraw());
    this.osd.addHandler("tile-loaded", () => { this.tilesLoaded++; });
    this.anno = AnnotoriousOSD.createOSDAnnotator(this.osd, {
      drawingEnabled: false, drawingMode: "drag",
      style: { stroke: "#ff1744", strokeWidth: 2, fill: "#ff1744", fillOpacity: 0.08 },
    });
    this.anno.on("createAnnotation", (a) => this._fromAnnotation(a));
    this.anno.on("updateAnnotation", (a) => this._fromAnnotation(a));
  }

  // ------------------------------------------------------------------------------------------- slide and view
  open(image, dziUrl) {
    this.image = image;
    this.tilesLoaded = 0;
    this.anno.clearAnnotations();
    return new Promise((resolve, reject) => {
      const ok = () => { this.osd.removeHandler("open-failed", bad); resolve(); };
      const bad = (e) => { this.osd.removeHandler("open", ok); reject(new Error(`cannot open ${dziUrl}: ${e.message}`)); };
      this.osd.addOnceHandler("open", ok);
      this.osd.addOnceHandler("open-failed", bad);
      this.osd.open(dziUrl);
    });
  }

  get item() { return this.osd.world.getItemAt(0); }
  get scale() { return this.item ? this.item.viewportToImageZoom(this.osd.viewport.getZoom(true)) : 1; }
  get fullyLoaded() { return !!this.item && this.item.getFullyLoaded(); }
  // every tile in view drawn and no zoom/pan animation running (tests wait for it before comparing pictures)
  get settled() {
    const vp = this.osd.viewport;
    return this.fullyLoaded && vp.getZoom(true) === vp.getZoom(false) && vp.getCenter(true).equals(vp.getCenter(false));
  }

  center() {
    const p = this.item.viewportToImageCoordinates(this.osd.viewport.getCenter(true));
    return [p.x, p.y];
  }
  // level-0 box [x0, y0, x1, y1] currently visible
  viewBox() {
    const r = this.item.viewportToImageRectangle(this.osd.viewport.getBounds(true));
    return [r.x, r.y, r.x + r.width, r.y + r.height];
  }
  // DZI level whose resolution matches the screen
  currentLevel() {
    const dpr = window.devicePixelRatio || 1;
    const k = Math.max(0, Math.floor(Math.log2(Math.max(1 / (this.scale * dpr), 1))));
    return Math.max(0, Math.min(this.image.maxLevel, this.image.maxLevel - k));
  }
  umPerScreenPixel(mpp) { return mpp / this.scale; }

  setView(cx, cy, scale, immediately = true) {
    const vp = this.osd.viewport;
    vp.zoomTo(this.item.imageToViewportZoom(scale), null, immediately);
    vp.panTo(this.item.imageToViewportCoordinates(cx, cy), immediately);
    vp.applyConstraints(immediately);
  }
  zoomBy(factor) { this.osd.viewport.zoomBy(factor); this.osd.viewport.applyConstraints(); }
  home() { this.osd.viewport.goHome(); }
  // show the level-0 box (x, y, w, h) with `margin` times its size around it
  fitBox(x, y, w, h, margin = 2.0) {
    const mw = w * margin, mh = h * margin;
    const r = this.item.imageToViewportRectangle(x + w / 2 - mw / 2, y + h / 2 - mh / 2, mw, mh);
    this.osd.viewport.fitBounds(r, true);
  }

  // ------------------------------------------------------------------------------------------- overlays
  toScreen(x, y) {
    const p = this.item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    return [p.x, p.y];
  }
  redraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this._draw(); });
  }
  _draw() {
    const cv = this.canvas, dpr = window.devicePixelRatio || 1;
    const w = this.osd.canvas.clientWidth || 1, h = this.osd.canvas.clientHeight || 1;
    if (cv.width !== Math.round(w * dpr) || cv.height !== Math.round(h * dpr)) {
      cv.width = Math.round(w * dpr); cv.height = Math.round(h * dpr);
    }
    const ctx = this.ctx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, cv.width, cv.height);
    if (!this.image || !this.item) return;
    // one affine map level-0 -> screen per frame (no rotation): origin and scale from OpenSeadragon
    const [ox, oy] = this.toScreen(0, 0), s = this.scale;
    this.frame = { ox, oy, s, box: this.viewBox() };
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    for (const draw of this.overlays) {
      ctx.save();
      try { draw(ctx, this); } catch (e) { console.error("overlay failed", e); }
      ctx.restore();
    }
    this.level = this.currentLevel();
    this.onchange(this);
  }
  rectScreen(x, y, w, h) {
    const f = this.frame;
    return [f.ox + x * f.s, f.oy + y * f.s, w * f.s, h * f.s];
  }
  pointScreen(x, y) { const f = this.frame; return [f.ox + x * f.s, f.oy + y * f.s]; }
  inView(x, y, w, h) {
    const [x0, y0, x1, y1] = this.frame.box;
    return x + w >= x0 && x <= x1 && y + h >= y0 && y <= y1;
  }

  // ------------------------------------------------------------------------------------------- ROI (Annotorious)
  // tool: "rectangle" (press, drag, release) | "polygon" (click the corners, click the first one or double-click to
  // close) | null (navigation). A double click closes a polygon instead of zooming while a tool is on.
  setTool(tool) {
    if (tool) {
      this.anno.setDrawingMode(tool === "polygon" ? "click" : "drag");
      this.anno.setDrawingTool(tool);
      this.anno.setDrawingEnabled(true);
    } else {
      this.anno.cancelDrawing();
      this.anno.setDrawingEnabled(false);
    }
    this.osd.gestureSettingsMouse.dblClickToZoom = !tool;
  }
  // ROI {x, y, w, h} or {polygon: [[x, y], ...]} in level-0 px, shown as the one Annotorious annotation
  showRoi(roi) {
    this.anno.clearAnnotations();
    if (!roi) return;
    let selector;
    if (roi.polygon) {
      const xs = roi.polygon.map((p) => p[0]), ys = roi.polygon.map((p) => p[1]);
      selector = { type: "POLYGON", geometry: { points: roi.polygon,
        bounds: { minX: Math.min(...xs), minY: Math.min(...ys), maxX: Math.max(...xs), maxY: Math.max(...ys) } } };
    } else {
      selector = { type: "RECTANGLE", geometry: { x: roi.x, y: roi.y, w: roi.w, h: roi.h,
        bounds: { minX: roi.x, minY: roi.y, maxX: roi.x + roi.w, maxY: roi.y + roi.h } } };
    }
    this.anno.addAnnotation({ id: "hwsi-roi", bodies: [], target: { annotation: "hwsi-roi", selector } });
  }
  _fromAnnotation(a) {
    const sel = a.target && a.target.selector;
    if (!sel) return;
    const g = sel.geometry;
    let roi = null;
    if (sel.type === "RECTANGLE") roi = { x: g.x, y: g.y, w: g.w, h: g.h };
    else if (sel.type === "POLYGON") roi = { polygon: g.points.map((p) => [p[0], p[1]]) };
    for (const other of this.anno.getAnnotations()) if (other.id !== a.id) this.anno.removeAnnotation(other.id);
    this.setTool(null);
    if (roi) this.onroi(roi, "drawn");
  }
}

// "nice" scale-bar length in µm for a bar of about `targetPx` screen px
function niceScaleBar(umPerPx, targetPx = 120) {
  const um = umPerPx * targetPx;
  const p = Math.pow(10, Math.floor(Math.log10(um)));
  let nice = p;
  for (const m of [1, 2, 5, 10]) if (m * p <= um) nice = m * p;
  const label = nice >= 1000 ? `${nice / 1000} mm` : (nice >= 1 ? `${nice} µm` : `${nice.toPrecision(1)} µm`);
  return { um: nice, px: nice / umPerPx, label };
}

window.SlideView = SlideView;
window.niceScaleBar = niceScaleBar;
