// A small line chart on a canvas: one line per stage, the newest sample on the right.
"use strict";
const cemiCharts = {
  colors: { capture: "#7cc4ff", denoise: "#c58cff", stitch: "#3ecf6e" },
  draw(canvas, title, unit, series) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 360, h = canvas.clientHeight || 90;
    if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    let top = 0, n = 0;
    for (const values of Object.values(series)) {
      n = Math.max(n, values.length);
      for (const v of values) if (v !== null && v > top) top = v;
    }
    top = top > 0 ? top * 1.15 : 1;
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#8b95a3";
    g.fillText(`${title} (max ${top / 1.15 >= 10 ? (top / 1.15).toFixed(0) : (top / 1.15).toFixed(2)} ${unit})`, 4, 12);
    let row = 0;
    for (const [name, values] of Object.entries(series)) {
      g.strokeStyle = cemiCharts.colors[name] || "#e6e9ee";
      g.fillStyle = g.strokeStyle;
      g.fillText(name, w - 60, 12 + 12 * row++);
      g.beginPath();
      let started = false;
      values.forEach((v, i) => {
        if (v === null || v === undefined) { started = false; return; }
        const x = n > 1 ? (i * (w - 4)) / (n - 1) + 2 : w - 2;
        const y = h - 3 - (v / top) * (h - 18);
        if (started) g.lineTo(x, y); else g.moveTo(x, y);
        started = true;
      });
      g.stroke();
    }
  },
};
