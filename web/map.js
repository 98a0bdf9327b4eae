// A map drawn on a canvas, with no tiles and no network: a grid at a round
// distance (500 m at the apps' default zoom), a scale bar, and markers. Positions are WGS84 degrees; the view is
// an equirectangular projection around its centre (fine for a city).
// With `interactive`, the wheel zooms and a drag pans (a click without a drag
// is still a click).

const METRES_PER_DEGREE = 111_195;

export class CityMap {
  constructor(canvas, { centre = { lat: 52.52, lon: 13.405 }, widthM = 6000, interactive = false } = {}) {
    this.canvas = canvas;
    this.centre = centre;
    this.widthM = widthM;
    this.markers = new Map();
    this.lines = [];
    // Extra drawing, between the grid and the markers: functions (g, map).
    this.layers = [];
    this.onClick = null;
    this.dragged = false;
    this.pending = false;
    canvas.addEventListener("click", (e) => {
      if (this.dragged) return;
      const r = canvas.getBoundingClientRect();
      const at = this.toLatLon(e.clientX - r.left, e.clientY - r.top);
      if (this.onClick) this.onClick(at);
    });
    if (interactive) this.interact();
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  interact() {
    const c = this.canvas;
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = c.getBoundingClientRect();
      const under = this.toLatLon(e.clientX - r.left, e.clientY - r.top);
      const factor = Math.exp(e.deltaY * 0.001);
      this.widthM = Math.min(200_000, Math.max(200, this.widthM * factor));
      // Keep the point under the cursor where it is.
      const moved = this.toLatLon(e.clientX - r.left, e.clientY - r.top);
      this.centre = { lat: this.centre.lat + under.lat - moved.lat, lon: this.centre.lon + under.lon - moved.lon };
      this.redraw();
    }, { passive: false });
    let from = null;
    c.addEventListener("pointerdown", (e) => {
      from = { x: e.clientX, y: e.clientY, centre: { ...this.centre } };
      this.dragged = false;
    });
    c.addEventListener("pointermove", (e) => {
      if (!from || !(e.buttons & 1)) return;
      const dx = e.clientX - from.x;
      const dy = e.clientY - from.y;
      if (Math.abs(dx) + Math.abs(dy) > 4) this.dragged = true;
      if (!this.dragged) return;
      const k = Math.cos((from.centre.lat * Math.PI) / 180);
      const mpp = this.metresPerPixel();
      this.centre = {
        lat: from.centre.lat + (dy * mpp) / METRES_PER_DEGREE,
        lon: from.centre.lon - (dx * mpp) / (METRES_PER_DEGREE * k),
      };
      this.redraw();
    });
    c.addEventListener("pointerup", () => { from = null; });
  }

  /** Centres the view on positions `points` (with a margin). */
  fit(points) {
    if (!points.length) return;
    let [s, n, w, e] = [90, -90, 180, -180];
    for (const p of points) {
      s = Math.min(s, p.lat); n = Math.max(n, p.lat);
      w = Math.min(w, p.lon); e = Math.max(e, p.lon);
    }
    this.centre = { lat: (s + n) / 2, lon: (w + e) / 2 };
    const k = Math.cos((this.centre.lat * Math.PI) / 180);
    const spanM = Math.max((e - w) * METRES_PER_DEGREE * k, ((n - s) * METRES_PER_DEGREE * this.canvas.clientWidth) / Math.max(1, this.canvas.clientHeight));
    this.widthM = Math.min(200_000, Math.max(2000, spanM * 1.15));
    this.redraw();
  }

  /** Draws on the next animation frame, once however often it is asked. */
  redraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  metresPerPixel() {
    return this.widthM / Math.max(1, this.canvas.clientWidth);
  }

  /** The projection as numbers, for drawing many points without an object
   * each: x = (lon - lon0) * ax + x0, y = (lat - lat0) * ay + y0. */
  projection() {
    const k = Math.cos((this.centre.lat * Math.PI) / 180);
    const mpp = this.metresPerPixel();
    return {
      lon0: this.centre.lon, lat0: this.centre.lat,
      ax: (METRES_PER_DEGREE * k) / mpp, ay: -METRES_PER_DEGREE / mpp,
      x0: this.canvas.clientWidth / 2, y0: this.canvas.clientHeight / 2,
    };
  }

  /** A round distance in metres that is at least `px` pixels long. */
  niceStep(px) {
    const want = px * this.metresPerPixel();
    for (const m of [100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000]) if (m >= want) return m;
    return 100_000;
  }

  toXY({ lat, lon }) {
    const k = Math.cos((this.centre.lat * Math.PI) / 180);
    const mpp = this.metresPerPixel();
    const x = ((lon - this.centre.lon) * METRES_PER_DEGREE * k) / mpp + this.canvas.clientWidth / 2;
    const y = -((lat - this.centre.lat) * METRES_PER_DEGREE) / mpp + this.canvas.clientHeight / 2;
    return { x, y };
  }

  toLatLon(x, y) {
    const k = Math.cos((this.centre.lat * Math.PI) / 180);
    const mpp = this.metresPerPixel();
    const lon = this.centre.lon + ((x - this.canvas.clientWidth / 2) * mpp) / (METRES_PER_DEGREE * k);
    const lat = this.centre.lat - ((y - this.canvas.clientHeight / 2) * mpp) / METRES_PER_DEGREE;
    return { lat: round(lat), lon: round(lon) };
  }

  /** Puts (or moves) marker `id` at `at`; `null` removes it. */
  mark(id, at, { colour = "#333", label = "", size = 6 } = {}) {
    if (at) this.markers.set(id, { at, colour, label, size });
    else this.markers.delete(id);
    this.draw();
  }

  /** Lines between pairs of positions (e.g. a driver and a pickup). */
  setLines(lines) {
    this.lines = lines;
    this.draw();
  }

  draw() {
    const c = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    if (c.width !== c.clientWidth * ratio || c.height !== c.clientHeight * ratio) {
      c.width = c.clientWidth * ratio;
      c.height = c.clientHeight * ratio;
    }
    const g = c.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.fillStyle = "#f6f6f2";
    g.fillRect(0, 0, c.clientWidth, c.clientHeight);
    // A grid through the centre, at a round distance at least 60 px apart.
    const step = this.niceStep(60) / this.metresPerPixel();
    g.strokeStyle = "#e0e0d8";
    g.lineWidth = 1;
    const cx = c.clientWidth / 2;
    const cy = c.clientHeight / 2;
    for (let x = cx % step; x < c.clientWidth; x += step) line(g, x, 0, x, c.clientHeight);
    for (let y = cy % step; y < c.clientHeight; y += step) line(g, 0, y, c.clientWidth, y);
    g.strokeStyle = "#c8c8bc";
    line(g, cx, 0, cx, c.clientHeight);
    line(g, 0, cy, c.clientWidth, cy);
    g.strokeStyle = "#4a7";
    g.lineWidth = 2;
    for (const [a, b] of this.lines) {
      const p = this.toXY(a);
      const q = this.toXY(b);
      line(g, p.x, p.y, q.x, q.y);
    }
    for (const layer of this.layers) layer(g, this);
    for (const { at, colour, label, size } of this.markers.values()) {
      const { x, y } = this.toXY(at);
      g.fillStyle = colour;
      g.beginPath();
      g.arc(x, y, size, 0, 2 * Math.PI);
      g.fill();
      if (label) {
        g.fillStyle = "#222";
        g.font = "12px system-ui, sans-serif";
        g.fillText(label, x + size + 3, y + 4);
      }
    }
    // Scale bar: a round distance of 100 px or more.
    const barM = this.niceStep(100);
    const km = barM / this.metresPerPixel();
    g.strokeStyle = "#222";
    g.lineWidth = 2;
    const y0 = c.clientHeight - 16;
    line(g, 12, y0, 12 + km, y0);
    line(g, 12, y0 - 4, 12, y0 + 4);
    line(g, 12 + km, y0 - 4, 12 + km, y0 + 4);
    g.fillStyle = "#222";
    g.font = "12px system-ui, sans-serif";
    g.fillText(barM >= 1000 ? `${barM / 1000} km` : `${barM} m`, 16, y0 - 6);
  }
}

function line(g, x1, y1, x2, y2) {
  g.beginPath();
  g.moveTo(x1, y1);
  g.lineTo(x2, y2);
  g.stroke();
}

function round(x) {
  return Math.round(x * 1e6) / 1e6;
}

/** Great-circle distance in metres. */
export function distanceM(a, b) {
  const rad = Math.PI / 180;
  const dLat = (b.lat - a.lat) * rad;
  const dLon = (b.lon - a.lon) * rad;
  const h = Math.sin(dLat / 2) ** 2 + Math.cos(a.lat * rad) * Math.cos(b.lat * rad) * Math.sin(dLon / 2) ** 2;
  return 2 * 6_371_008.8 * Math.asin(Math.sqrt(h));
}
