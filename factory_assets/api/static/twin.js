// The live twin page: follows /api/factories/{id}/twin/events (SSE), no build step, no CDN.
"use strict";
(function () {
  const COLOURS = ["blue", "red", "white"];
  const SLOTS = ["A1", "A2", "A3", "B1", "B2", "B3", "C1", "C2", "C3"];
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("token")) { localStorage.setItem("twinToken", params.get("token")); history.replaceState(null, "", location.pathname + location.search); }
  const state = { factory: new URLSearchParams(location.search).get("factory") || "factory-1", twin: null,
                  es: null, frameId: null, evidence: null, lastSlots: {} };
  const token = () => $("token").value.trim() || localStorage.getItem("twinToken") || "";
  $("token").value = localStorage.getItem("twinToken") || "";
  $("token").addEventListener("change", () => localStorage.setItem("twinToken", $("token").value.trim()));

  function authQuery() { const t = token(); return t ? "?token=" + encodeURIComponent(t) : ""; }
  function api(path, opts) {
    opts = opts || {};
    opts.headers = Object.assign({}, opts.headers || {});
    if (token()) opts.headers["Authorization"] = "Bearer " + token();
    return fetch(path, opts);
  }
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function time(ts) { return ts ? new Date(ts).toLocaleTimeString() : "–"; }
  const STATION_NAMES = { hbw: "high-bay warehouse", vgr: "vacuum gripper robot", mpo: "multi-processing station",
                          sld: "sorting line", dsi: "input station", dso: "output station" };
  // what delta flags (persisting disagreements, outside the crane's settle time): colours and slots
  function flaggedKeys(delta) {
    delta = delta || {};
    return Object.keys(delta).filter((k) => k !== "slots").concat(Object.keys(delta.slots || {}));
  }
  function signed(s) { return (s >= 0 ? "+" : "−") + Math.abs(s).toFixed(Math.abs(s) >= 10 ? 0 : 1) + " s"; }
  function counts(slots) {
    const c = { blue: 0, red: 0, white: 0 };
    for (const s in slots || {}) { const t = (slots[s] || "").toLowerCase(); if (t in c) c[t]++; }
    return c;
  }

  for (const c of COLOURS) {  // one order button per colour: ship one piece of it out of the warehouse
    const b = el("button", { "data-order": c, title: "ship one " + c + " workpiece to the output station" });
    b.appendChild(el("span", { class: "dot " + c })); b.appendChild(document.createTextNode("ship one " + c));
    b.addEventListener("click", () => order(c));
    $("order-buttons").appendChild(b);
  }

  function setConn(ok, text) {
    const c = $("conn");
    c.className = "pill " + (ok ? "on" : "off");
    c.dataset.state = ok ? "live" : "reconnecting";
    c.textContent = text;
  }

  // -- rendering ---------------------------------------------------------------------------
  function render(twin) {
    state.twin = twin;
    document.body.dataset.version = twin.version;
    $("version").textContent = "version " + twin.version;
    const obs = twin.observed || {}, rep = twin.reported || {}, delta = twin.delta || {};
    const transit = twin.in_transit || {}, moving = transit.active ? transit : {};
    $("model").textContent = "model " + (obs.model_version ? obs.model_version.slice(0, 12) : "–");
    // rack
    const rack = $("rack"); rack.innerHTML = "";
    const slots = rep.slots || {};
    for (const s of SLOTS) {
      const t = slots[s] || "";
      const status = (delta.slots || {})[s] ? "disagree" : (moving.slots || {})[s] ? "transit" : "";
      const d = el("div", { class: "slot " + t + (state.lastSlots[s] !== undefined && state.lastSlots[s] !== t ? " changed" : "")
                            + (status ? " " + status : ""), "data-slot": s, "data-type": t || "EMPTY", "data-status": status || "ok" });
      d.appendChild(el("span", {}, t ? t.toLowerCase() : "empty"));
      d.appendChild(el("span", { class: "name" }, s));
      rack.appendChild(d);
    }
    state.lastSlots = Object.assign({}, ...SLOTS.map((s) => ({ [s]: slots[s] || "" })));
    $("reported-ts").textContent = rep.ts ? "reported " + time(rep.ts) : "no stock report yet";
    // colours
    const tbody = document.querySelector("#colours tbody"); tbody.innerHTML = "";
    const rc = counts(slots), desired = (twin.desired || {}).stock || {};
    for (const c of COLOURS) {
      const o = obs[c] || {};
      const tr = el("tr", { "data-colour": c, class: delta[c] ? "disagree" : (moving.colours || {})[c] ? "transit" : "" });
      const name = el("td"); name.appendChild(el("span", { class: "dot " + c })); name.appendChild(document.createTextNode(c)); tr.appendChild(name);
      tr.appendChild(el("td", { class: o.present ? "yes" : "no" }, o.present === undefined ? "–" : (o.present ? "present" : "absent")));
      const p = el("td"); const bar = el("span", { class: "bar" });
      const fill = el("span", { class: "fill" }); fill.style.width = Math.round(100 * (o.probability || 0)) + "%";
      const thr = el("span", { class: "thr" }); thr.style.left = Math.round(100 * (o.threshold || 0.5)) + "%";
      bar.appendChild(fill); bar.appendChild(thr); p.appendChild(bar);
      p.appendChild(document.createTextNode(o.probability === undefined ? " –" : ` ${o.probability.toFixed(2)} / ${(o.threshold || 0.5).toFixed(2)}`));
      tr.appendChild(p);
      const r = (rep.present || {})[c];
      tr.appendChild(el("td", { class: r ? "yes" : "no" }, r === undefined ? "–" : `${r ? "present" : "absent"} (${rc[c]})`));
      tr.appendChild(el("td", {}, desired[c] === undefined ? "–" : String(desired[c])));
      tbody.appendChild(tr);
    }
    renderAgreement(twin);
    renderController(twin);
    // the frame behind the state
    if (obs.frame_id) {
      $("twin-frame").textContent = obs.frame_id + " at " + time(obs.frame_ts);
      if (!state.frameId) showFrame({ id: obs.frame_id, ts: obs.frame_ts, url: "/api/frames/" + obs.frame_id + ".jpg" });
    }
  }

  // camera vs controller: only what persisted outside the crane's settle time is a disagreement
  function renderAgreement(twin) {
    const obs = twin.observed || {}, rep = twin.reported || {}, transit = twin.in_transit || {};
    const flagged = flaggedKeys(twin.delta);
    const moving = transit.active ? Object.keys(transit.colours || {}).concat(Object.keys(transit.slots || {})) : [];
    let st, cls, text;
    if (!obs.model_version) { st = "no-model"; cls = "muted"; text = "no model yet: the camera's view appears once the first model is deployed"; }
    else if (!rep.ts) { st = "no-report"; cls = "muted"; text = "no stock report from the controller yet"; }
    else if (flagged.length) { st = "disagree"; cls = "err"; text = "camera and controller disagree on " + flagged.join(", "); }
    else if (moving.length) {
      st = "in-transit"; cls = "warn";
      text = `crane moving: ${moving.join(", ")} in transit until ${time(transit.until)} (the controller reports before its crane moves)`;
    } else { st = "agree"; cls = "okmsg"; text = "camera and controller agree"; }
    const note = $("delta-note"); note.innerHTML = ""; note.dataset.state = st;
    note.appendChild(el("span", { class: cls }, text));
    const ul = $("delta-slots"); ul.innerHTML = "";
    for (const [s, d] of Object.entries((twin.delta || {}).slots || {}))
      ul.appendChild(el("li", { class: "err", "data-slot": s }, `${d.message} (since ${time(d.since)}, ${d.frames} frames)`));
    if (transit.active) for (const [s, d] of Object.entries(transit.slots || {}))
      ul.appendChild(el("li", { class: "warn", "data-slot": s }, `${d.message}: in transit`));
  }

  // the stations' states (a fault prominently), the controller's order state, its clock
  function renderController(twin) {
    const rep = twin.reported || {}, stations = rep.stations || {}, faults = [];
    const ul = $("stations"); ul.innerHTML = "";
    for (const name of Object.keys(STATION_NAMES)) {
      const s = stations[name]; if (!s) continue;
      const li = el("li", { "data-station": name, "data-code": String(s.code), class: s.fault ? "fault" : "" });
      li.appendChild(el("span", { class: "v" }, name));
      li.appendChild(document.createTextNode(`${STATION_NAMES[name]}: ${s.meaning}` + (s.description ? " — " + s.description : "")
        + (s.active ? " (working)" : "") + "  " + time(s.ts)));
      ul.appendChild(li);
      if (s.fault) faults.push([name, s]);
    }
    if (!ul.children.length) ul.appendChild(el("li", { class: "muted" }, "no station state reported yet"));
    const banner = $("faults"); banner.innerHTML = ""; banner.hidden = !faults.length;
    document.body.dataset.faults = faults.map(([n]) => n).join(",");
    for (const [name, s] of faults)
      banner.appendChild(el("div", { "data-station": name }, `⚠ ${STATION_NAMES[name]} fault (code ${s.code}): `
        + (s.description || s.meaning) + ` — since ${time(s.ts)}; it needs a person at the factory`));
    const o = rep.order;
    $("controller-order").textContent = o ? `controller's order: ${String(o.state).replace(/_/g, " ").toLowerCase()}`
      + (o.type && o.type !== "NONE" ? " " + o.type.toLowerCase() : "") + " at " + time(o.ts) : "";
    const c = twin.clock, clock = $("clock");
    clock.dataset.offset = c && c.offset_s != null ? String(c.offset_s) : "";
    clock.textContent = c && c.offset_s != null ? "controller clock " + signed(c.offset_s) : "controller clock –";
    if (c && c.offset_s != null) clock.title = `the controller's clock minus ours: ${signed(c.offset_s)}, estimated from ${c.samples} messages`
      + (c.spread_s != null ? ` (spread ${(1000 * c.spread_s).toFixed(0)} ms)` : "");
  }

  function showFrame(frame) {
    state.frameId = frame.id;
    const img = $("frame");
    img.onload = () => { $("no-frame").style.display = "none"; document.body.dataset.frame = frame.id; };
    img.src = frame.url + authQuery();
    $("frame-ts").textContent = time(frame.ts);
    loadEvidence(frame.id);
  }

  function loadEvidence(id) {
    if (!$("show-evidence").checked) { drawEvidence(null); return; }
    api("/api/frames/" + id + "/evidence").then((r) => r.ok ? r.json() : null).then((ev) => {
      if (state.frameId === id) { state.evidence = ev; drawEvidence(ev); }
    }).catch(() => {});
  }

  function drawEvidence(ev) {
    const cv = $("evidence"), g = cv.getContext("2d");
    g.clearRect(0, 0, cv.width, cv.height);
    if (!ev || !$("show-evidence").checked) return;
    const rgb = { blue: "61,139,253", red: "229,72,77", white: "255,255,255" };
    const cw = cv.width / ev.width, ch = cv.height / ev.height;
    for (const c of COLOURS) {
      const grid = ev.colours[c];
      for (let y = 0; y < ev.height; y++) for (let x = 0; x < ev.width; x++) {
        const v = grid[y][x];
        if (v < 0.35) continue;
        g.strokeStyle = `rgba(${rgb[c]},${Math.min(1, 0.3 + v)})`; g.lineWidth = 2;
        g.strokeRect(x * cw + 1, y * ch + 1, cw - 2, ch - 2);
      }
    }
  }
  $("show-evidence").addEventListener("change", () => drawEvidence($("show-evidence").checked ? state.evidence : null));
  if (state.frameId) loadEvidence(state.frameId);

  function describe(h) {
    if (h.kind === "reported") return "controller: " + (h.changed || []).map((s) => `${s}=${((h.slots || {})[s] || "empty").toLowerCase()}`).join(", ");
    const flags = (h.flagged || []).length ? "; disagree on " + h.flagged.join(", ") : "";
    const cleared = (h.cleared || []).length ? "; agree again on " + h.cleared.join(", ") : "";
    if (h.kind === "observed") return "camera: " + (h.changed || []).map((c) => `${c} ${(h.present || {})[c] ? "seen" : "gone"}`).join(", ") + flags + cleared;
    if (h.kind === "discrepancy") return "camera vs controller" + (flags + cleared).replace(/^;/, ":");
    if (h.kind === "controller") return "stations: " + (h.changed || []).map((n) => n === "order"
      ? "order " + String((h.order || {}).state || "").replace(/_/g, " ").toLowerCase()
      : `${n} ${((h.stations || {})[n] || {}).meaning || ""}` + (((h.stations || {})[n] || {}).description ? " (" + h.stations[n].description + ")" : "")).join(", ");
    if (h.kind === "desired") return "desired: " + JSON.stringify(h.desired || {});
    if (h.kind === "order") return "order: " + (h.orders || []).map((o) => `${o.type} ${o.state}${o.reason ? " (" + o.reason + ")" : ""}`).join(", ");
    return h.kind || "change";
  }
  function addTimeline(h, fresh) {
    const ul = $("timeline");
    if (ul.querySelector(`[data-version="${h.version}"]`)) return;
    const li = el("li", { "data-version": h.version, class: fresh ? "fresh" : "" });
    li.appendChild(el("span", { class: "v" }, "v" + h.version));
    li.appendChild(document.createTextNode(`${time(h.at)}  ${describe(h)}` + (flaggedKeys(h.delta).length ? "  ⚠ " + flaggedKeys(h.delta).join(",") : "")));
    ul.insertBefore(li, ul.firstChild);
    while (ul.children.length > 50) ul.removeChild(ul.lastChild);
  }

  // -- orders: ship one piece out; the list follows each order's state ---------------------------
  const ORDER_TIMES = ["sent_at", "ordered_at", "in_process_at", "shipped_at", "failed_at"];
  function orderButtons(stock) {  // a colour with nothing left after what is on order cannot be shipped
    const avail = (stock || {}).available || {}, rep = (stock || {}).reported || {}, on = (stock || {}).on_order || {};
    for (const c of COLOURS) {
      const b = document.querySelector(`button[data-order="${c}"]`);
      const none = avail[c] === 0;
      b.disabled = none || b.dataset.busy === "1";
      b.title = none ? `no ${c} piece to ship: the controller reports ${rep[c] || 0}, ${on[c] || 0} already on order (pieces come in at the input station)`
        : `ship one ${c} workpiece to the output station (${avail[c] === undefined ? "?" : avail[c]} left)`;
    }
  }
  function loadOrders() {
    api(`/api/factories/${state.factory}/orders?limit=10`).then((r) => r.ok ? r.json() : { items: [] }).then((d) => {
      const ul = $("orders"); ul.innerHTML = "";
      for (const o of d.items) {
        const li = el("li", { "data-order-id": o.id, "data-state": o.state || "legacy" });
        li.appendChild(el("span", { class: "v" }, (o.state || "legacy").replace("_", " ")));
        const last = ORDER_TIMES.filter((k) => o[k]).pop();
        li.appendChild(document.createTextNode(`${o.type || ""}  placed ${time(o.created_at)}` +
          (last ? `, ${last.replace("_at", "").replace("_", " ")} ${time(o[last])}` : "") + (o.reason ? " — " + o.reason : "")));
        ul.appendChild(li);
      }
      const f = d.factory || {}, queued = d.items.some((o) => o.state === "queued");
      $("order-wait").textContent = !d.sending ? "orders are queued, not sent: this API has no --mqtt broker"
        : (queued && f.waiting_for ? "queued orders wait: " + f.waiting_for : "");
      if (d.stock) orderButtons(d.stock);
    }).catch(() => {});
  }

  function newKey() {  // one Idempotency-Key per click: a retried request cannot ship a second piece
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2);
  }
  function order(colour) {
    const msg = $("order-msg"), b = document.querySelector(`button[data-order="${colour}"]`);
    b.dataset.busy = "1"; b.disabled = true;
    api(`/api/factories/${state.factory}/orders`, {
      method: "POST", headers: { "Content-Type": "application/json", "Idempotency-Key": newKey() },
      body: JSON.stringify({ type: colour.toUpperCase() }),
    }).then((r) => r.json().then((o) => [r.status, o])).then(([status, o]) => {
      msg.className = "small " + (status === 201 ? "okmsg" : "err");
      msg.textContent = status === 201 ? `shipping one ${colour}: order ${o.id} ${o.state}` : `${status} ${o.error}: ${o.message}`;
    }).catch((e) => { msg.className = "small err"; msg.textContent = String(e); })
      .finally(() => { b.dataset.busy = ""; b.disabled = false; loadOrders(); });
  }

  // -- the live stream ----------------------------------------------------------------------
  function connect() {
    if (state.es) state.es.close();
    const es = new EventSource(`/api/factories/${state.factory}/twin/events${authQuery()}`);
    state.es = es;
    es.onopen = () => setConn(true, "live");
    es.onerror = () => setConn(false, "reconnecting…");  // EventSource resumes with Last-Event-ID
    es.addEventListener("snapshot", (e) => { const m = JSON.parse(e.data); render(m.twin); loadOrders(); });
    es.addEventListener("change", (e) => addTimeline(JSON.parse(e.data).change, true));
    es.addEventListener("update", (e) => {
      const m = JSON.parse(e.data);
      for (const h of m.changes) addTimeline(h, true);
      render(m.twin);
      if (m.changes.length) loadOrders();
    });
    es.addEventListener("frame", (e) => showFrame(JSON.parse(e.data).frame));
  }

  function start() {
    api("/api/factories").then((r) => r.json()).then((d) => {
      const sel = $("factory"); sel.innerHTML = "";
      for (const f of d.factories) sel.appendChild(el("option", { value: f.id }, f.id));
      sel.value = state.factory;
    }).catch(() => {});
    api(`/api/factories/${state.factory}/twin/history?limit=20`).then((r) => r.ok ? r.json() : { items: [] })
      .then((d) => { for (const h of d.items.slice().reverse()) addTimeline(h, false); });
    api(`/api/frames/latest?factory=${state.factory}`).then((r) => r.ok ? r.json() : null)
      .then((f) => { if (f && !state.frameId) showFrame(f); });
    connect();
  }
  $("factory").addEventListener("change", () => { location.search = "?factory=" + encodeURIComponent($("factory").value); });
  start();
})();
