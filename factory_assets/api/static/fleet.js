// The fleet page: polls /api/fleet every 5 s; no build step, no CDN.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const AGREE_OK = 0.98, FRAME_STALE_S = 30, POLL_MS = 5000;
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("token")) { localStorage.setItem("twinToken", params.get("token")); history.replaceState(null, "", location.pathname + location.search); }
  const token = () => localStorage.getItem("twinToken") || "";
  const state = { data: null, fetchedAt: 0 };
  const STATION_NAMES = { hbw: "high-bay warehouse", vgr: "vacuum gripper robot", mpo: "multi-processing station",
                          sld: "sorting line", dsi: "input station", dso: "output station" };

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function ago(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    if (s < 1.5) return "just now";
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " days ago";
  }
  function elapsed() { return (Date.now() - state.fetchedAt) / 1000; }
  function setConn(ok, text) {
    const c = $("conn"); c.className = "pill " + (ok ? "on" : "off");
    c.dataset.state = ok ? "live" : "retrying"; c.textContent = text;
  }
  function cell(field, label) { return el("td", { "data-field": field, "data-label": label }); }

  function row(f) {
    const tr = el("tr", { "data-factory": f.id });
    const faults = f.faults || [], frameAge = f.frame ? f.frame.age_s + elapsed() : null;
    tr.className = (faults.length ? "fault " : "") + (frameAge === null || frameAge > FRAME_STALE_S ? "stale" : "");
    // factory: the link to its twin
    const name = cell("factory", "factory");
    name.appendChild(el("a", { href: f.link, title: "open the twin of " + f.id }, f.id));
    tr.appendChild(name);
    // twin
    const twin = cell("twin", "twin");
    if (f.twin) {
      twin.appendChild(el("span", { class: "v" }, "v" + f.twin.version));
      twin.appendChild(el("span", { class: "sub", "data-age": f.twin.age_s }, ago(f.twin.age_s + elapsed())));
    } else twin.appendChild(el("span", { class: "muted" }, "no twin yet"));
    tr.appendChild(twin);
    // model
    const model = cell("model", "model");
    if (f.model) {
      model.appendChild(el("span", { class: "v ellipsis", title: f.model.version }, f.model.version));
      model.appendChild(el("span", { class: "sub" }, f.model.source || ""));
    } else model.appendChild(el("span", { class: "muted" }, "no model yet"));
    tr.appendChild(model);
    // agreement
    const agree = cell("agreement", "agreement, last hour");
    const a = f.agreement;
    if (a) {
      agree.dataset.share = a.share;
      const pct = (100 * a.share).toFixed(a.share >= 0.999 ? 0 : 1) + " %";
      agree.appendChild(el("span", { class: "v" + (a.share < AGREE_OK ? " warn" : "") }, pct));
      const bar = el("span", { class: "bar" + (a.share < AGREE_OK ? " low" : "") });
      const fill = el("span", { class: "fill" }); fill.style.width = (100 * a.share) + "%";
      bar.appendChild(fill); agree.appendChild(bar);
      const covered = a.covered_s >= 3590 ? "the hour" : "the last " + ago(a.covered_s).replace(" ago", "");
      agree.appendChild(el("span", { class: "sub" }, a.flags + (a.flags === 1 ? " flag" : " flags") + " over " + covered));
    } else agree.appendChild(el("span", { class: "muted" }, f.model ? "no camera view yet" : "no model yet"));
    if (f.disagreeing_now) agree.appendChild(el("span", { class: "sub warn" }, "⚠ disagreeing now"));
    else if (f.crane_moving) agree.appendChild(el("span", { class: "sub" }, "crane moving"));
    tr.appendChild(agree);
    // last frame
    const frame = cell("frame", "last frame");
    if (f.frame) {
      frame.appendChild(el("span", { class: "v", title: f.frame.ts || "", "data-age": f.frame.age_s }, ago(frameAge)));
      frame.appendChild(el("span", { class: "sub" }, f.frame.camera_id || ""));
    } else frame.appendChild(el("span", { class: "muted" }, "none recently"));
    tr.appendChild(frame);
    // faults
    const fc = cell("faults", "faults");
    fc.dataset.count = faults.length;
    if (!faults.length) fc.appendChild(el("span", { class: "muted" }, "none"));
    for (const x of faults) {
      const line = el("span", { class: "fault-text", "data-station": x.station },
                      (STATION_NAMES[x.station] || x.station) + ": " + (x.description || x.meaning || "code " + x.code));
      fc.appendChild(line);
      fc.appendChild(el("span", { class: "sub" }, "since " + (x.since ? new Date(x.since).toLocaleTimeString() : "–")));
    }
    tr.appendChild(fc);
    // orders
    const oc = cell("orders", "orders in progress");
    const o = f.orders || { in_progress: 0, ours: [] };
    oc.dataset.count = o.in_progress;
    oc.appendChild(el("span", { class: o.in_progress ? "v" : "muted" }, o.in_progress ? String(o.in_progress) : "none"));
    for (const x of o.ours || []) oc.appendChild(el("span", { class: "sub" }, "ours: " + x.type + " " + x.state));
    if (o.controller) oc.appendChild(el("span", { class: "sub" }, "controller: " + (o.controller.type || "") + " " + o.controller.state));
    tr.appendChild(oc);
    // clock
    const clock = cell("clock", "clock");
    const off = f.clock && f.clock.offset_s;
    clock.textContent = off === null || off === undefined ? "–" : (off >= 0 ? "+" : "−") + Math.abs(off).toFixed(1) + " s";
    tr.appendChild(clock);
    return tr;
  }

  function render() {
    const d = state.data; if (!d) return;
    const body = document.querySelector("#fleet tbody"); body.innerHTML = "";
    for (const f of d.factories) body.appendChild(row(f));
    const n = d.factories.length, faulty = d.factories.filter((f) => (f.faults || []).length).length;
    const rated = d.factories.filter((f) => f.agreement), agreeing = rated.filter((f) => f.agreement.share >= AGREE_OK).length;
    $("count").textContent = n + (n === 1 ? " factory" : " factories");
    $("faulty").textContent = faulty + " with faults"; $("faulty").className = "chip" + (faulty ? " bad" : "");
    $("agreeing").textContent = rated.length ? agreeing + " of " + rated.length + " agreeing" : "no models yet";
    document.body.dataset.factories = n;
    document.body.dataset.loaded = d.now;
  }

  function poll() {
    const headers = token() ? { Authorization: "Bearer " + token() } : {};
    fetch("/api/fleet", { headers }).then((r) => {
      if (r.status === 401) throw new Error("reads need a token: open this page as /fleet#token=fa_…");
      if (!r.ok) throw new Error("the API answered " + r.status);
      return r.json();
    }).then((d) => {
      state.data = d; state.fetchedAt = Date.now(); render();
      $("msg").hidden = true;
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      setConn(true, "live");
    }).catch((e) => {
      $("msg").hidden = false; $("msg").textContent = e.message;
      setConn(false, "retrying");
    }).finally(() => setTimeout(poll, POLL_MS));
  }
  setInterval(() => {  // the ages tick between polls
    for (const e of document.querySelectorAll("[data-age]")) e.textContent = ago(parseFloat(e.dataset.age) + elapsed());
  }, 1000);
  poll();
})();
