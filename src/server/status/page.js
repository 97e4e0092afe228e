// walcast's status page: reads server-sent events from status/events and draws
// them. Hand-written, no dependencies, no build step. Every value from the server
// goes into the page as text (textContent), never as markup.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const WINDOW_MS = 15 * 60 * 1000;
  const FEED_ROWS = 100;
  let history = [];
  let paused = false;
  let seen = 0;
  let skipped = 0;
  const held = []; // feed items that arrived while paused (bounded)

  // ── formatting ────────────────────────────────────────────────────────────
  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const d = digits === undefined ? (Math.abs(v) >= 100 || Number.isInteger(v) ? 0 : 1) : digits;
    return Number(v).toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: 0 });
  }
  function bytes(v) {
    if (v === null || v === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let x = Number(v);
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
    return num(x, i === 0 ? 0 : 1) + " " + units[i];
  }
  function secs(v) {
    if (v === null || v === undefined) return "–";
    if (v < 60) return num(v, v < 1 ? 2 : v < 10 ? 1 : 0) + " s";
    if (v < 3600) return num(v / 60, 1) + " min";
    return num(v / 3600, 1) + " h";
  }
  function ago(ms) {
    const s = Math.max(0, (Date.now() - ms) / 1000);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(1) + " d ago";
  }
  function clock(ms) {
    const d = new Date(ms);
    return d.toLocaleTimeString("en-GB", { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function fillDl(dl, pairs) {
    dl.replaceChildren();
    for (const [k, v] of pairs) { dl.append(el("dt", k), el("dd", v)); }
  }
  function fillRows(tbody, rows, empty, cols) {
    tbody.replaceChildren();
    if (!rows.length) {
      const tr = el("tr"); const td = el("td", empty, "empty"); td.colSpan = cols; tr.append(td); tbody.append(tr);
      return;
    }
    for (const cells of rows) {
      const tr = el("tr");
      for (const c of cells) tr.append(typeof c === "object" ? c : el("td", c, typeof c === "string" && /^[\d.,–]+$/.test(c) ? "n" : ""));
      tbody.append(tr);
    }
  }
  function setPill(id, text, cls) { const p = $(id); p.textContent = text; p.className = "pill " + cls; }

  // ── the plot ──────────────────────────────────────────────────────────────
  const SVGNS = "http://www.w3.org/2000/svg";
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }
  function drawPlot(svg, series, format) {
    const W = 900, H = Number(svg.getAttribute("viewBox").split(" ")[3]);
    const L = 56, R = 10, T = 8, B = 20;
    const now = Date.now(), t0 = now - WINDOW_MS;
    let max = 0;
    for (const s of series) for (const p of s.points) if (p[0] >= t0 && p[1] > max) max = p[1];
    max = niceMax(max);
    const x = (t) => L + (W - L - R) * (t - t0) / WINDOW_MS;
    const y = (v) => T + (H - T - B) * (1 - v / max);
    const nodes = [];
    for (let i = 0; i <= 4; i++) {
      const v = max * i / 4;
      nodes.push(svgEl("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e4e7ec" }));
      nodes.push(svgEl("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, format(v)));
    }
    for (const m of [15, 10, 5, 0]) {
      const t = now - m * 60000;
      nodes.push(svgEl("text", { x: x(t), y: H - 4, "text-anchor": m === 15 ? "start" : m === 0 ? "end" : "middle" }, m === 0 ? "now" : "−" + m + " min"));
    }
    for (const s of series) {
      const pts = s.points.filter((p) => p[0] >= t0).map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1));
      if (pts.length) nodes.push(svgEl("polyline", { points: pts.join(" "), fill: "none", stroke: s.color, "stroke-width": 2, "stroke-linejoin": "round" }));
    }
    svg.replaceChildren(...nodes);
  }
  function plot() {
    const ch = history.map((s) => [s.t, s.changes[0] + s.changes[1] + s.changes[2] + s.changes[3]]);
    const msg = history.map((s) => [s.t, s.messages]);
    const lag = history.map((s) => [s.t, s.lag_seconds]);
    drawPlot($("plot-rates"), [{ points: ch, color: "#2f6fde" }, { points: msg, color: "#9b51e0" }], (v) => num(v));
    drawPlot($("plot-lag"), [{ points: lag, color: "#d9822b" }], (v) => secs(v));
  }
  function addSample(s) {
    if (!s) return;
    if (history.length && history[history.length - 1].t >= s.t) return;
    history.push(s);
    const cut = Date.now() - WINDOW_MS - 10000;
    while (history.length && history[0].t < cut) history.shift();
  }

  // ── the snapshot ──────────────────────────────────────────────────────────
  function render(s) {
    document.body.dataset.level = s.level;
    setPill("level", s.level, s.level);
    const r = s.replication;
    setPill("repl-state", r.connected ? "connected" : "disconnected", r.connected ? "connected" : "disconnected");
    document.body.dataset.replication = r.connected ? "connected" : "disconnected";
    $("since").textContent = r.connected
      ? (r.since ? "since " + new Date(r.since).toLocaleString() : "")
      : "for " + secs(r.disconnected_seconds);
    $("version").textContent = "walcast " + s.version;

    $("lag-seconds").textContent = secs(r.lag_seconds);
    $("lag-bytes").textContent = bytes(r.lag_bytes) + " behind";
    const k = s.rates.by_kind;
    $("rate-changes").textContent = num(s.rates.changes_per_sec);
    $("rate-kinds").textContent = "ins " + num(k.insert) + " · upd " + num(k.update) + " · del " + num(k.delete);
    $("rate-messages").textContent = num(s.rates.messages_per_sec);
    $("rate-bytes").textContent = bytes(s.rates.bytes_per_sec) + "/s";
    $("clients-connections").textContent = num(s.clients.connections);
    $("clients-channels").textContent = num(s.clients.channels) + " channels · " + num(s.clients.subscriptions) + " subscriptions";
    $("retained").textContent = bytes(r.retained_wal_bytes);
    $("wal-status").textContent = "wal_status " + (r.wal_status || "–");

    fillRows($("checks").tBodies[0], s.checks.map((c) => {
      const lvl = el("td", c.level, "lvl " + c.level);
      const f = c.name === "lag_bytes" ? bytes : /seconds$/.test(c.name) ? secs : c.name === "replication_connected" ? (v) => (v ? "yes" : "no") : (v) => num(v);
      const v = typeof c.value === "number" ? f(c.value) : String(c.value);
      const t = (x) => (x === undefined ? "" : f(x));
      return [c.name.replace(/_/g, " "), el("td", v, "n"), el("td", t(c.warning), "n"), el("td", t(c.critical), "n"), lvl];
    }), "no checks", 5);
    $("blocked").textContent = r.blocked ? r.blocked.reason + ": " + r.blocked.message : "";

    fillDl($("replication"), [
      ["state", r.connected ? "connected" : "disconnected"],
      ["since", r.since ? new Date(r.since).toLocaleString() + " (" + ago(r.since) + ")" : "–"],
      ["server", r.server_version ? "PostgreSQL " + r.server_version : "–"],
      ["slot", r.slot + (r.slot_exists === false ? " (missing!)" : "")],
      ["publication", r.publication],
      ["confirmed LSN", r.confirmed_lsn],
      ["received LSN", r.received_lsn],
      ["lag", secs(r.lag_seconds) + " · " + bytes(r.lag_bytes)],
      ["retained WAL", bytes(r.retained_wal_bytes)],
      ["wal_status", r.wal_status || "–"],
      ["transactions", num(r.transactions)],
      ["reconnects", num(r.reconnects)],
      ["gaps", num(r.gaps) + (r.last_gap ? " (last " + r.last_gap.from + " → " + r.last_gap.to + ")" : "")],
    ]);

    fillRows($("tables").tBodies[0], s.rates.by_table.map((t) => [t.table, el("td", num(t.insert), "n"), el("td", num(t.update), "n"), el("td", num(t.delete), "n"), el("td", num(t.truncate), "n")]),
      "no changes since this page opened", 5);

    const c = s.clients;
    const join = (o) => Object.entries(o).map(([k2, v]) => k2 + " " + num(v)).join(" · ");
    fillDl($("clients"), [
      ["connections", num(c.connections) + " open · " + num(c.connections_total) + " accepted"],
      ["channels", num(c.channels)],
      ["subscriptions", num(c.subscriptions)],
      ["drops", join(c.drops)],
      ["disconnects", join(c.disconnects)],
      ["auth failures", join(c.auth_failures)],
    ]);
    fillRows($("subs").tBodies[0], c.subscriptions_by_table.map((t) => [t.table, el("td", num(t.count), "n")]), "no subscriptions", 2);

    // RLS mode: how each (table, role) seen so far is enforced.
    $("rls-card").hidden = !s.rls;
    if (s.rls) {
      fillRows($("rls").tBodies[0], s.rls.map((p) => [p.table, el("td", p.role), el("td", p.path), el("td", p.why)]), "no table judged yet", 4);
    }

    const rl = s.replay_log;
    fillDl($("replay"), rl ? [
      ["state", rl.writable ? "writing" : "cannot write: nothing is confirmed to PostgreSQL"],
      ["transactions", num(rl.transactions)],
      ["changes", num(rl.changes)],
      ["syncs", num(rl.syncs)],
      ["errors", num(rl.errors)],
      ["resets", num(rl.resets)],
      ["size", rl.bytes == null ? "not open yet" : bytes(rl.bytes) + " in " + num(rl.segments) + " segments"],
      ["oldest", rl.oldest_lsn == null ? "-" : rl.oldest_lsn + " · " + secs(rl.oldest_age_seconds) + " old"],
      ["newest", rl.newest_lsn == null ? "-" : rl.newest_lsn],
      ["replays", num(rl.replays) + " done · " + num(rl.replay_gaps) + " gaps · " + num(rl.replayed_changes) + " changes read"],
    ] : [["state", "off ([log] dir = \"\")"]]);

    addSample(s.sample);
    plot();
  }

  // ── the feed ──────────────────────────────────────────────────────────────
  function showChange(c) {
    const tbody = $("feed-rows");
    const tr = el("tr");
    const key = c.key.length ? c.key.map(([k2, v]) => k2 + "=" + (v === null ? "∅" : v)).join(", ") : "–";
    tr.append(el("td", clock(c.time)), el("td", c.table), el("td", c.kind, "k-" + c.kind), el("td", c.lsn), el("td", key));
    tbody.prepend(tr);
    while (tbody.rows.length > FEED_ROWS) tbody.deleteRow(tbody.rows.length - 1);
  }
  function feedCount() {
    $("feed-count").textContent = seen + " changes seen" + (paused ? " · paused, " + held.length + " held" : "");
    $("feed-skipped").textContent = skipped ? skipped + " skipped (the page fell behind)" : "";
  }
  $("feed-pause").addEventListener("click", () => {
    paused = !paused;
    $("feed-pause").textContent = paused ? "Resume" : "Pause";
    $("feed-pause").setAttribute("aria-pressed", String(paused));
    if (!paused) { for (const c of held.splice(0)) showChange(c); }
    feedCount();
  });

  // ── the stream ────────────────────────────────────────────────────────────
  const es = new EventSource("status/events" + location.search);
  es.addEventListener("open", () => setPill("live", "live", "live"));
  es.addEventListener("error", () => setPill("live", "reconnecting", "down"));
  es.addEventListener("hello", (e) => {
    const d = JSON.parse(e.data);
    history = d.history || [];
    render(d.snapshot);
  });
  es.addEventListener("snapshot", (e) => render(JSON.parse(e.data)));
  es.addEventListener("change", (e) => {
    const c = JSON.parse(e.data);
    seen++;
    if (paused) { held.push(c); if (held.length > FEED_ROWS) { held.shift(); skipped++; } } else showChange(c);
    feedCount();
  });
  es.addEventListener("skipped", (e) => { skipped += JSON.parse(e.data).count; feedCount(); });
  setInterval(plot, 10000); // keep the time axis moving when nothing arrives
})();
