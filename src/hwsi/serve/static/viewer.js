// hwsi deep-zoom viewer: a small canvas viewer over Deep Zoom (DZI) tiles, with level-0 overlays.
// Coordinates: the view is (cx, cy) = level-0 pixel at the canvas centre, and `scale` = screen px per level-0 px.
"use strict";

class DeepZoomViewer {
  constructor(canvas, opts = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.onchange = opts.onchange || (() => {});
    this.overlays = [];          // functions (ctx, viewer) drawn after tiles, in order
    this.tiles = new Map();      // "L/c/r" -> {img, loaded, failed}
    this.maxTiles = 600;
    this.image = null;           // {width, height, tileSize, overlap, maxLevel, tileUrl(L, c, r)}
    this.cx = 0; this.cy = 0; this.scale = 1;
    this.pending = false;
    this.tilesRequested = 0; this.tilesLoaded = 0;
    this._bindEvents();
    new ResizeObserver(() => this.resize()).observe(canvas);
    this.resize();
  }

  open(image) {
    this.image = image;
    this.tiles.clear();
    this.home();
  }

  get cssWidth() { return this.canvas.clientWidth || 1; }
  get cssHeight() { return this.canvas.clientHeight || 1; }

  resize() {
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(this.cssWidth * dpr);
    this.canvas.height = Math.round(this.cssHeight * dpr);
    this.redraw();
  }

  minScale() {
    if (!this.image) return 1;
    return 0.5 * Math.min(this.cssWidth / this.image.width, this.cssHeight / this.image.height);
  }
  maxScale() { return 4; }  // 4 screen px per level-0 px

  home() {
    if (!this.image) return;
    this.scale = 0.95 * Math.min(this.cssWidth / this.image.width, this.cssHeight / this.image.height);
    this.cx = this.image.width / 2; this.cy = this.image.height / 2;
    this.redraw();
  }

  // level-0 box [x0, y0, x1, y1] currently visible
  viewBox() {
    const hw = this.cssWidth / 2 / this.scale, hh = this.cssHeight / 2 / this.scale;
    return [this.cx - hw, this.cy - hh, this.cx + hw, this.cy + hh];
  }
  toScreen(x, y) {
    return [(x - this.cx) * this.scale + this.cssWidth / 2, (y - this.cy) * this.scale + this.cssHeight / 2];
  }
  toImage(sx, sy) {
    return [(sx - this.cssWidth / 2) / this.scale + this.cx, (sy - this.cssHeight / 2) / this.scale + this.cy];
  }

  zoomBy(factor, sx, sy) {
    if (sx === undefined) { sx = this.cssWidth / 2; sy = this.cssHeight / 2; }
    const [ix, iy] = this.toImage(sx, sy);
    const s = Math.min(this.maxScale(), Math.max(this.minScale(), this.scale * factor));
    this.scale = s;
    // keep the image point under the cursor fixed
    this.cx = ix - (sx - this.cssWidth / 2) / s;
    this.cy = iy - (sy - this.cssHeight / 2) / s;
    this._clampCentre();
    this.redraw();
  }

  panBy(dxScreen, dyScreen) {
    this.cx -= dxScreen / this.scale; this.cy -= dyScreen / this.scale;
    this._clampCentre();
    this.redraw();
  }

  // show the level-0 box (x, y, w, h) with some margin
  fitBox(x, y, w, h, margin = 2.0) {
    this.cx = x + w / 2; this.cy = y + h / 2;
    const s = Math.min(this.cssWidth / (w * margin), this.cssHeight / (h * margin));
    this.scale = Math.min(this.maxScale(), Math.max(this.minScale(), s));
    this.redraw();
  }

  _clampCentre() {
    if (!this.image) return;
    this.cx = Math.min(this.image.width, Math.max(0, this.cx));
    this.cy = Math.min(this.image.height, Math.max(0, this.cy));
  }

  // DZI level whose resolution matches the screen (level downsample <= level-0 px per screen px)
  currentLevel() {
    const im = this.image;
    const dpr = window.devicePixelRatio || 1;
    const ds = 1 / (this.scale * dpr);
    const k = Math.max(0, Math.floor(Math.log2(Math.max(ds, 1))));
    return Math.max(0, Math.min(im.maxLevel, im.maxLevel - k));
  }

  umPerScreenPixel(mpp) { return mpp / this.scale; }

  redraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this._draw(); });
  }

  _levelGeom(L) {
    const im = this.image, d = Math.pow(2, im.maxLevel - L);
    const w = Math.max(1, Math.ceil(im.width / d)), h = Math.max(1, Math.ceil(im.height / d));
    return { d, w, h, cols: Math.ceil(w / im.tileSize), rows: Math.ceil(h / im.tileSize) };
  }

  _tile(L, c, r) {
    const key = `${L}/${c}/${r}`;
    let t = this.tiles.get(key);
    if (t) { this.tiles.delete(key); this.tiles.set(key, t); return t; }   // LRU order
    t = { img: new Image(), loaded: false, failed: false };
    t.img.onload = () => { t.loaded = true; this.tilesLoaded++; this.redraw(); };
    t.img.onerror = () => { t.failed = true; };
    t.img.src = this.image.tileUrl(L, c, r);
    this.tilesRequested++;
    this.tiles.set(key, t);
    while (this.tiles.size > this.maxTiles) this.tiles.delete(this.tiles.keys().next().value);
    return t;
  }

  _drawLevel(L, request) {
    const im = this.image, g = this._levelGeom(L), ts = im.tileSize, ctx = this.ctx;
    const [x0, y0, x1, y1] = this.viewBox();
    const c0 = Math.max(0, Math.floor(x0 / g.d / ts)), c1 = Math.min(g.cols - 1, Math.floor(x1 / g.d / ts));
    const r0 = Math.max(0, Math.floor(y0 / g.d / ts)), r1 = Math.min(g.rows - 1, Math.floor(y1 / g.d / ts));
    let complete = true;
    for (let r = r0; r <= r1; r++) {
      for (let c = c0; c <= c1; c++) {
        const key = `${L}/${c}/${r}`;
        const t = request ? this._tile(L, c, r) : this.tiles.get(key);
        if (!t || !t.loaded) { complete = false; continue; }
        const lx = c * ts, ly = r * ts;
        const tw = Math.min(ts, g.w - lx), th = Math.min(ts, g.h - ly);
        const [sx, sy] = this.toScreen(lx * g.d, ly * g.d);
        // +0.5 px to hide seams between tiles
        ctx.drawImage(t.img, 0, 0, tw, th, sx, sy, tw * g.d * this.scale + 0.5, th * g.d * this.scale + 0.5);
      }
    }
    return complete;
  }

  _draw() {
    const ctx = this.ctx, dpr = window.devicePixelRatio || 1;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, this.cssWidth, this.cssHeight);
    if (!this.image) return;
    const L = this.currentLevel();
    // coarser levels first as a placeholder while the current level loads
    for (let l = Math.max(0, L - 4); l < L; l++) this._drawLevel(l, l === Math.max(0, L - 4));
    this.complete = this._drawLevel(L, true);
    for (const draw of this.overlays) {
      ctx.save();
      try { draw(ctx, this); } catch (e) { console.error("overlay failed", e); }
      ctx.restore();
    }
    this.level = L;
    this.onchange(this);
  }

  _bindEvents() {
    const cv = this.canvas;
    let drag = null;
    cv.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY }; cv.setPointerCapture(e.pointerId); cv.classList.add("dragging");
    });
    cv.addEventListener("pointermove", (e) => {
      if (!drag) return;
      this.panBy(e.clientX - drag.x, e.clientY - drag.y);
      drag = { x: e.clientX, y: e.clientY };
    });
    const end = () => { drag = null; cv.classList.remove("dragging"); };
    cv.addEventListener("pointerup", end);
    cv.addEventListener("pointercancel", end);
    cv.addEventListener("wheel", (e) => {
      e.preventDefault();
      const rect = cv.getBoundingClientRect();
      this.zoomBy(Math.pow(1.0015, -e.deltaY), e.clientX - rect.left, e.clientY - rect.top);
    }, { passive: false });
    cv.addEventListener("dblclick", (e) => {
      const rect = cv.getBoundingClientRect();
      this.zoomBy(2, e.clientX - rect.left, e.clientY - rect.top);
    });
    cv.addEventListener("keydown", (e) => {
      const step = 80;
      if (e.key === "+" || e.key === "=") this.zoomBy(1.5);
      else if (e.key === "-") this.zoomBy(1 / 1.5);
      else if (e.key === "ArrowLeft") this.panBy(step, 0);
      else if (e.key === "ArrowRight") this.panBy(-step, 0);
      else if (e.key === "ArrowUp") this.panBy(0, step);
      else if (e.key === "ArrowDown") this.panBy(0, -step);
      else if (e.key === "0") this.home();
      else return;
      e.preventDefault();
    });
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

window.DeepZoomViewer = DeepZoomViewer;
window.niceScaleBar = niceScaleBar;
