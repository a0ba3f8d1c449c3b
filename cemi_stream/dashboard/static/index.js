// The run list and the start form (GET /).
"use strict";
(function () {
  const tbody = document.querySelector("#runs tbody");
  async function refresh() {
    try {
      const data = await cemi.api("GET", "/api/runs");
      const runs = data.runs.slice().reverse();  // newest first
      tbody.replaceChildren(...runs.map((run) => {
        const c = run.counts || {};
        const link = cemi.el("a", { href: `/runs/${run.id}`, text: run.id });
        return cemi.el("tr", { "data-run": run.id },
          cemi.el("td", {}, link), cemi.el("td", { text: run.name || "" }),
          cemi.el("td", { class: "state " + run.state, text: run.state }),
          cemi.el("td", { text: String(c.placed ?? "") }), cemi.el("td", { text: String(c.predicted ?? "") }),
          cemi.el("td", { text: String(c.skipped ?? "") }),
          cemi.el("td", { text: (run.options && run.options.source) || "" }),
          cemi.el("td", { text: cemi.time(run.started || run.created) }));
      }));
      document.getElementById("no-runs").hidden = runs.length > 0;
      const h = await cemi.api("GET", "/api/health");
      document.getElementById("health").textContent = `daemon ${h.version}, up ${Math.round(h.uptime_s)} s`;
    } catch (e) {
      document.getElementById("health").textContent = String(e.message || e);
    }
  }
  document.getElementById("start").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = document.getElementById("start-result");
    const options = {};
    for (const [k, v] of new FormData(ev.target).entries()) {
      if (v === "" ) continue;
      options[k] = ["keyframe_overlap", "pixel_size_um"].includes(k) ? Number(v) : v;
    }
    try {
      const run = await cemi.api("POST", "/api/runs", options);
      out.textContent = `started ${run.id}`;
      window.location.href = `/runs/${run.id}`;
    } catch (e) {
      out.textContent = String(e.message || e);
    }
  });
  refresh();
  setInterval(refresh, 2000);
})();
