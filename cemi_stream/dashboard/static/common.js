// cemi-stream dashboard: helpers shared by the pages (plain JavaScript, no build step).
"use strict";
const cemi = {
  // JSON request to the daemon's API; the cookie carries the token, the header proves
  // the request comes from a page of this origin (writes need it).
  async api(method, path, body) {
    const init = { method, headers: { "X-CEMI-CSRF": "1" }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) throw new Error((data && data.error) || `${method} ${path}: HTTP ${r.status}`);
    return data;
  },
  el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  },
  time(t) { return t ? new Date(t * 1000).toLocaleString() : ""; },
  num(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits || 0); },
};
