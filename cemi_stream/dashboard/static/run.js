// The run page (GET /runs/{id}): the growing mosaic, counts, charts, alerts, keyframes.
// State comes from the run's event feed (server-sent events): a snapshot first, then
// numbered events; the browser's EventSource reconnects with Last-Event-ID, and the
// daemon sends what was missed (or a new snapshot), so nothing is lost.
"use strict";
(function () {
  const runId = decodeURIComponent(location.pathname.split("/")[2] || "");
  const TILE = 512;
  const state = {
    run: null, frames: new Map(), frameShape: null, pixelUm: null,
    unit: 1024, chunks: new Map(), mosaicState: "none",
    history: [], alerts: [], keyframes: [], lastSeq: 0, events: 0,
    // When things happened, for the benchmark and the tests (ms since navigation;
    // chunkLog: [receipt epoch ms, cx, cy, version] of the last chunk notices).
    snapshotAt: null, tilesLoadedAt: null, chunkLog: [],
  };
  window.cemiRun = state;  // for the browser tests and for curious users
  document.getElementById("title").textContent = runId;
  document.title = `cemi-stream ${runId}`;

  // ---- the mosaic viewer ------------------------------------------------------------
  const viewer = OpenSeadragon({
    id: "viewer", prefixUrl: "/static/vendor/openseadragon/images/",
    drawer: "canvas", imageSmoothingEnabled: false, showNavigator: true,
    maxZoomPixelRatio: 16, visibilityRatio: 0.2, crossOriginPolicy: false,
    gestureSettingsMouse: { clickToZoom: false }, immediateRender: true,
    preserveImageSizeOnResize: true,
  });
  window.cemiViewer = viewer;
  let world = null;   // {x0, y0, w, h, maxK, bounds}
  let reopenPending = false, resetPending = false;

  function chunkBounds() {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const key of state.chunks.keys()) {
      const [cx, cy] = key.split(",").map(Number);
      x0 = Math.min(x0, cx * state.unit); y0 = Math.min(y0, cy * state.unit);
      x1 = Math.max(x1, (cx + 1) * state.unit); y1 = Math.max(y1, (cy + 1) * state.unit);
    }
    return x0 === Infinity ? null : [x0, y0, x1, y1];
  }
  function tileVersion(k, tx, ty) {
    const span = TILE * 2 ** k, u = state.unit;
    const cx0 = Math.floor((tx * span) / u), cy0 = Math.floor((ty * span) / u);
    const cx1 = Math.ceil(((tx + 1) * span) / u), cy1 = Math.ceil(((ty + 1) * span) / u);
    let v = 0;
    if ((cx1 - cx0) * (cy1 - cy0) <= state.chunks.size) {
      for (let cy = cy0; cy < cy1; cy++) for (let cx = cx0; cx < cx1; cx++) {
        const got = state.chunks.get(cx + "," + cy);
        if (got > v) v = got;
      }
    } else {
      for (const [key, got] of state.chunks) {
        const [cx, cy] = key.split(",").map(Number);
        if (cx >= cx0 && cx < cx1 && cy >= cy0 && cy < cy1 && got > v) v = got;
      }
    }
    return v;
  }
  function makeWorld(b) {
    const side = Math.max(b[2] - b[0], b[3] - b[1]);
    const maxK = Math.max(0, Math.ceil(Math.log2(side / TILE)));
    const span = TILE * 2 ** maxK;
    const x0 = Math.floor(b[0] / span) * span, y0 = Math.floor(b[1] / span) * span;
    return { x0, y0, w: b[2] - x0, h: b[3] - y0, maxK, bounds: b };
  }
  function openWorld() {
    reopenPending = false;
    const b = chunkBounds();
    if (!b) return;
    const next = makeWorld(b);
    if (world && next.x0 === world.x0 && next.y0 === world.y0 && next.w === world.w &&
        next.h === world.h && next.maxK === world.maxK) return;
    // Keep what the user looks at, in mosaic pixels, across the change of world.
    let keep = null;
    if (world && viewer.world.getItemCount() > 0) {
      const r = viewer.viewport.viewportToImageRectangle(viewer.viewport.getBounds(true));
      keep = { x: r.x + world.x0, y: r.y + world.y0, w: r.width, h: r.height };
    }
    const w = next;
    world = next;
    document.getElementById("mosaic-empty").hidden = true;
    viewer.open({
      width: w.w, height: w.h, tileSize: TILE, tileOverlap: 0, minLevel: 0, maxLevel: w.maxK,
      getTileUrl(level, x, y) {
        const k = w.maxK - level;
        const span = TILE * 2 ** k;
        const tx = w.x0 / span + x, ty = w.y0 / span + y;
        // A function: the viewer asks for the URL at every load, so a tile reloaded
        // after a change of its chunks gets their new version (and the unchanged
        // ones come from the browser's cache).
        return () => `/runs/${runId}/tiles/${k}/${tx}/${ty}.png?v=${tileVersion(k, tx, ty)}`;
      },
    });
    viewer.addOnceHandler("open", () => {
      const item = viewer.world.getItemAt(0);
      item.addHandler("fully-loaded-change", (e) => {
        if (e.fullyLoaded && state.tilesLoadedAt === null) state.tilesLoadedAt = performance.now();
      });
      const vp = viewer.viewport;
      const fit = (r) => vp.fitBounds(vp.imageToViewportRectangle(r.x - w.x0, r.y - w.y0, r.w, r.h), true);
      const b = w.bounds;
      vp.getHomeBounds = () => vp.imageToViewportRectangle(b[0] - w.x0, b[1] - w.y0, b[2] - b[0], b[3] - b[1]);
      if (keep) fit(keep); else vp.goHome(true);
      drawOverlay();
    });
  }
  function refreshTiles() {
    resetPending = false;
    const item = viewer.world.getItemAt(0);
    if (item) { item.reset(); viewer.forceRedraw(); }
  }
  function onChunks(rows, unit, mstate) {
    state.unit = unit || state.unit;
    state.mosaicState = mstate || state.mosaicState;
    let grew = false;
    if (state.chunkLog.length > 20000) state.chunkLog.splice(0, 10000);
    const now = Date.now();
    for (const [cx, cy, v] of rows) {
      state.chunkLog.push([now, cx, cy, v]);
      const key = cx + "," + cy;
      if (!state.chunks.has(key)) grew = true;
      state.chunks.set(key, v);
    }
    if (grew || !world) { if (!reopenPending) { reopenPending = true; setTimeout(openWorld, world ? 300 : 0); } }
    else if (!resetPending) { resetPending = true; setTimeout(refreshTiles, 250); }
  }

  // ---- frame outlines, scale bar, frame details -------------------------------------
  const overlay = document.getElementById("overlay");
  const colors = { placed: "#3ecf6e", predicted: "#ff9f1a", skipped: "#8b95a3" };
  function drawOverlay() {
    const dpr = window.devicePixelRatio || 1;
    const W = overlay.clientWidth, H = overlay.clientHeight;
    if (overlay.width !== Math.round(W * dpr)) { overlay.width = Math.round(W * dpr); overlay.height = Math.round(H * dpr); }
    const g = overlay.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, W, H);
    if (!world || viewer.world.getItemCount() === 0) return;
    const vp = viewer.viewport;
    const toScreen = (x, y) => vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(x - world.x0, y - world.y0));
    if (state.frameShape && state.frames.size) {
      const [fh, fw] = state.frameShape;
      g.lineWidth = 1;
      for (const f of state.frames.values()) {
        const a = toScreen(f[1], f[2]), b = toScreen(f[1] + fw, f[2] + fh);
        if (b.x < 0 || b.y < 0 || a.x > W || a.y > H) continue;
        g.strokeStyle = colors[f[3]] || "#e6e9ee";
        g.globalAlpha = f[3] === "placed" ? 0.35 : 0.9;
        g.strokeRect(a.x + 0.5, a.y + 0.5, b.x - a.x, b.y - a.y);
      }
      g.globalAlpha = 1;
    }
    // Scale bar: a round length of about 120 screen pixels.
    const p0 = toScreen(0, 0), p1 = toScreen(1000, 0);
    const screenPerPx = (p1.x - p0.x) / 1000;
    if (screenPerPx > 0) {
      const umPerScreen = state.pixelUm ? state.pixelUm / screenPerPx : null;
      const perScreen = umPerScreen || 1 / screenPerPx;
      const target = 120 * perScreen;
      const mag = 10 ** Math.floor(Math.log10(target));
      const nice = [1, 2, 5, 10].map((m) => m * mag).filter((v) => v <= target).pop() || mag;
      const len = nice / perScreen;
      const label = umPerScreen ? (nice >= 1000 ? `${nice / 1000} mm` : `${nice} µm`) : `${nice} px`;
      g.fillStyle = "rgba(0,0,0,.6)"; g.fillRect(10, H - 34, len + 20, 26);
      g.fillStyle = "#fff"; g.fillRect(20, H - 16, len, 4);
      g.font = "12px system-ui, sans-serif"; g.fillText(label, 20, H - 20);
    }
  }
  viewer.addHandler("update-viewport", drawOverlay);
  window.addEventListener("resize", drawOverlay);
  viewer.addHandler("canvas-click", (ev) => {
    if (!ev.quick || !world || !state.frameShape) return;
    const p = viewer.viewport.viewerElementToImageCoordinates(ev.position);
    const x = p.x + world.x0, y = p.y + world.y0;
    const [fh, fw] = state.frameShape;
    // Frames overlap: the one whose centre is nearest the click.
    let hit = null, best = Infinity;
    for (const f of state.frames.values()) {
      if (x < f[1] || x >= f[1] + fw || y < f[2] || y >= f[2] + fh) continue;
      const d = (x - f[1] - fw / 2) ** 2 + (y - f[2] - fh / 2) ** 2;
      if (d < best) { best = d; hit = f; }
    }
    if (hit) showFrame(hit);
  });
  // Where the centre of frame `seq` is on the viewer, in element pixels (tests, tools).
  window.cemiFramePoint = (seq) => {
    const f = state.frames.get(seq);
    if (!f || !world || !state.frameShape) return null;
    const p = viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(
      f[1] + state.frameShape[1] / 2 - world.x0, f[2] + state.frameShape[0] / 2 - world.y0));
    return [p.x, p.y];
  };
  function hasDenoise() { return !!(state.run && state.run.stages && state.run.stages.denoise); }
  function showFrame(f) {
    document.getElementById("frame-panel").hidden = false;
    document.getElementById("frame-seq").textContent = String(f[0]);
    document.getElementById("frame-info").textContent =
      `${f[3]}, registration score ${Number(f[4]).toFixed(3)}, at (${f[1].toFixed(1)}, ${f[2].toFixed(1)}) px`;
    const imgs = [cemi.el("img", { src: `/runs/${runId}/frames/${f[0]}/raw.png`, alt: `frame ${f[0]} raw`, title: "raw" })];
    if (hasDenoise()) imgs.push(cemi.el("img", { src: `/runs/${runId}/frames/${f[0]}/denoised.png`, alt: `frame ${f[0]} denoised`, title: "denoised" }));
    document.getElementById("frame-images").replaceChildren(...imgs);
  }

  // ---- side panel -------------------------------------------------------------------
  let keyframesShown = "";
  function renderRun() {
    const run = state.run;
    if (!run) return;
    const st = document.getElementById("state");
    st.textContent = run.state + (run.reason ? `: ${run.reason}` : "");
    st.className = "state " + run.state;
    document.getElementById("stop").disabled = !["starting", "running"].includes(run.state);
    const stages = run.stages || {};
    const cap = stages.capture || {};
    const c = run.counts || {};
    const dropped = Object.entries(cap.dropped || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "none";
    const rows = [["read", cap.frames_in], ["kept", cap.frames_out], ["placed", c.placed],
      ["predicted", c.predicted], ["skipped", c.skipped], ["dropped", dropped],
      ["mosaic", run.mosaic_shape ? `${run.mosaic_shape[1]} × ${run.mosaic_shape[0]} px` : "growing"]];
    document.querySelector("#counts tbody").replaceChildren(...rows.map(([k, v]) =>
      cemi.el("tr", { "data-count": k }, cemi.el("td", { text: k }), cemi.el("td", { text: v === undefined || v === null ? "–" : String(v) }))));
    const stageRows = Object.entries(stages).map(([name, s]) => {
      const cells = [name, s.state, s.pid ?? "", s.restarts, s.frames_in ?? "", s.frames_out ?? "",
        cemi.num(s.frames_per_s, 1), s.queue_depth ?? ""];
      return cemi.el("tr", { "data-stage": name }, ...cells.map((v) => cemi.el("td", { text: String(v) })));
    });
    document.querySelector("#stages tbody").replaceChildren(...stageRows);
    renderProgress();
  }
  function renderProgress() {
    const last = state.history[state.history.length - 1];
    const cap = last && last.stages.capture;
    const bar = document.getElementById("progress-bar"), text = document.getElementById("progress-text");
    const run = state.run || {};
    if (run.state === "finished") { bar.style.width = "100%"; text.textContent = "finished"; return; }
    if (cap && cap.total) {
      const frac = Math.min(1, (cap.in || 0) / cap.total);
      bar.style.width = `${(100 * frac).toFixed(1)}%`;
      const eta = cap.fps > 0 ? (cap.total - (cap.in || 0)) / cap.fps : null;
      text.textContent = `${cap.in || 0} of ${cap.total} frames read` + (eta !== null ? `, about ${Math.ceil(eta)} s left` : "");
    } else if (cap) {
      bar.style.width = "100%"; bar.style.opacity = 0.4;
      text.textContent = `${cap.in || 0} frames read (live source)`;
    }
  }
  function renderCharts() {
    const names = new Set();
    for (const s of state.history) for (const n of Object.keys(s.stages)) names.add(n);
    const series = (field) => Object.fromEntries([...names].map((n) => [n, state.history.map((s) => (s.stages[n] ? s.stages[n][field] ?? null : null))]));
    cemiCharts.draw(document.getElementById("chart-fps"), "frames/s", "/s", series("fps"));
    cemiCharts.draw(document.getElementById("chart-queue"), "queue depth", "frames", series("queue"));
    cemiCharts.draw(document.getElementById("chart-ms"), "processing time", "ms", series("ms"));
  }
  function renderAlerts() {
    document.getElementById("alerts").replaceChildren(...state.alerts.slice().reverse().map((a) =>
      cemi.el("li", { class: a.kind, "data-kind": a.kind, text: `${new Date(a.t * 1000).toLocaleTimeString()} ${a.message}` })));
  }
  function renderKeyframes() {
    // The feed's strip (its keyframes events), not this page's choice: every open page
    // then asks for the same thumbnails, the daemon makes each once, and each update
    // brings one new one (the others come from the browser's cache).
    const seqs = state.keyframes.slice(-3).reverse();
    const key = seqs.join(",") + (hasDenoise() ? "d" : "");
    if (key === keyframesShown) return;
    keyframesShown = key;
    document.getElementById("keyframes").replaceChildren(...seqs.map((s) => {
      const pair = cemi.el("div", { class: "pair" }, cemi.el("img", { src: `/runs/${runId}/frames/${s}/raw.png?w=384`, alt: `frame ${s} raw`, title: `frame ${s} raw` }));
      if (hasDenoise()) pair.append(cemi.el("img", { src: `/runs/${runId}/frames/${s}/denoised.png?w=384`, alt: `frame ${s} denoised`, title: `frame ${s} denoised` }));
      return pair;
    }));
  }
  let drawPending = false;
  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => { drawPending = false; drawOverlay(); });
  }

  // ---- the event feed ---------------------------------------------------------------
  function setFrames(rows, replace) {
    if (replace) state.frames.clear();
    for (const f of rows) state.frames.set(f[0], f);
    scheduleDraw();
  }
  const handlers = {
    snapshot(d) {
      state.run = d.run; state.frameShape = d.frame_shape; state.pixelUm = d.pixel_size_um;
      state.history = d.history; state.alerts = d.alerts; state.keyframes = d.keyframes || [];
      state.chunks.clear();
      setFrames(d.frames, true);
      onChunks(d.mosaic.chunks, d.mosaic.unit_px, d.mosaic.state);
      renderRun(); renderCharts(); renderAlerts(); renderKeyframes(); renderAnalysis(d.analysis);
      if (state.snapshotAt === null) state.snapshotAt = performance.now();
    },
    run(d) { state.run = d; renderRun(); renderKeyframes(); },  // denoised ones appear with their stage
    frames(d) { setFrames(d.frames, d.replace); },
    keyframes(d) { state.keyframes = d.frames; renderKeyframes(); },
    tiles(d) {
      if (d.frame_shape) state.frameShape = d.frame_shape;
      if (d.pixel_size_um) state.pixelUm = d.pixel_size_um;
      onChunks(d.chunks, d.unit_px, d.state);
    },
    stats(d) {
      state.history.push(d);
      if (state.history.length > 480) state.history.shift();
      renderCharts(); renderProgress();
    },
    alert(d) { state.alerts.push(d); renderAlerts(); },
    analysis(d) { renderAnalysis(d); },
  };
  // The analysis stage's maps (RUN_DIR/analysis), refetched when their version changes.
  const analysisShown = {};
  function renderAnalysis(a) {
    if (!a || !a.images || !a.images.length) return;
    document.getElementById("analysis").hidden = false;
    const s = a.summary || {};
    const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)} %`);
    document.getElementById("analysis-state").textContent = s.final ? "(final)" : "(filling in)";
    document.getElementById("analysis-summary").textContent =
      `${s.tiles ?? 0} tiles · phase ${pct(s.mean_phase_fraction)} · lamellar ${pct(s.mean_lamellar_fraction)}`;
    const box = document.getElementById("analysis-images");
    for (const im of a.images) {
      if (analysisShown[im.name] === im.v) continue;
      analysisShown[im.name] = im.v;
      const url = `/runs/${runId}/analysis/${encodeURIComponent(im.name)}.png?v=${im.v}`;
      let link = box.querySelector(`a[data-name="${CSS.escape(im.name)}"]`);
      if (!link) {
        link = document.createElement("a");
        link.dataset.name = im.name; link.target = "_blank"; link.className = "analysis-map";
        const img = document.createElement("img");
        img.alt = im.name.replace(/_/g, " "); img.title = img.alt;
        link.appendChild(img); box.appendChild(link);
      }
      link.href = url; link.querySelector("img").src = url;
    }
  }
  function connect() {
    const source = new EventSource(`/api/runs/${runId}/events`);
    const conn = document.getElementById("conn");
    source.onopen = () => { conn.textContent = ""; };
    source.onerror = () => { conn.textContent = "reconnecting…"; };
    for (const [kind, handle] of Object.entries(handlers)) {
      source.addEventListener(kind, (ev) => {
        state.lastSeq = Number(ev.lastEventId) || state.lastSeq;
        state.events += 1;
        handle(JSON.parse(ev.data));
      });
    }
    state.source = source;
  }
  document.getElementById("stop").addEventListener("click", async () => {
    const button = document.getElementById("stop");
    button.disabled = true;
    try { state.run = await cemi.api("POST", `/api/runs/${runId}/stop`); renderRun(); }
    catch (e) { document.getElementById("conn").textContent = String(e.message || e); button.disabled = false; }
  });
  connect();
})();
