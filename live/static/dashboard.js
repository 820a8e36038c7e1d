// The balancer dashboard: reads /dashboard/events (one JSON snapshot a second) and draws it.
// Everything a backend or node can influence (ids, addresses, texts) is put in the page with
// textContent or drawn on a canvas, never parsed as HTML.
"use strict";
(() => {
  const HISTORY = 60;               // points kept per series: one per snapshot, so about 60 s
  const CHART_SERIES = 10;          // backends drawn in the big charts at most
  const PALETTE = ["#2563eb", "#d9480f", "#2f9e44", "#9c36b5", "#c2255c", "#0c8599", "#e67700", "#5c7cfa",
                   "#862e9c", "#495057"];
  const KIND_LABELS = {
    no_healthy_backend: "503 no healthy backend (balancer)",
    failed: "502/504 failed at the balancer",
    "429": "429 from nodes (rate limited)",
    "500": "500 from nodes (node error)",
    "502": "502 from nodes",
    "503": "503 from nodes (queue full or breaker open)",
    "504": "504 from nodes",
  };
  const KIND_COLORS = { no_healthy_backend: "#343a40", failed: "#e67700", "429": "#0c8599", "500": "#c92a2a",
                        "503": "#5c7cfa" };
  const BREAKER = {                 // state -> [text, style]
    CLOSED: ["closed", "ok"], HALF_OPEN: ["half-open", "warn"], OPEN: ["open", "bad"],
  };
  const EJECTOR = { CLOSED: ["in rotation", "ok"], HALF_OPEN: ["probing", "warn"], OPEN: ["ejected", "bad"] };

  const $ = (id) => document.getElementById(id);
  const rows = new Map();           // backend id -> {tr, cells}
  const colors = new Map();         // backend or kind -> colour, stable while the page is open
  const hist = { points: 0, rate: new Map(), p50: new Map(), p95: new Map(), rejections: new Map() };
  let lastMessage = 0;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    return value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
  }

  function colorOf(key) {
    if (!colors.has(key)) colors.set(key, PALETTE[colors.size % PALETTE.length]);
    return colors.get(key);
  }

  // A state badge: the text shown, one of a fixed set of styles, the raw state for scripts and tests.
  function badge(cell, text, style, raw) {
    let span = cell.firstChild;
    if (!span) { span = el("span"); cell.appendChild(span); }
    span.className = "state " + (["ok", "bad", "warn", "off"].includes(style) ? style : "off");
    span.textContent = text;
    cell.dataset.state = raw;
  }

  function detail(cell, text) {
    let span = cell.querySelector(".detail");
    if (!span) { span = el("span", "detail"); cell.appendChild(span); }
    span.textContent = text;
    span.title = text;  // the whole of a long reason, on hover
  }

  // -- series ------------------------------------------------------------------------------------
  function push(map, key, value) {
    let series = map.get(key);
    if (!series) { series = new Array(hist.points).fill(null); map.set(key, series); }
    series.push(value === undefined ? null : value);
  }

  function trim(map, present) {
    for (const [key, series] of map) {
      if (!present.has(key)) series.push(null);
      while (series.length > HISTORY) series.shift();
      if (series.every((v) => v === null)) map.delete(key);
    }
  }

  function record(snap) {
    const ids = new Set();
    for (const b of snap.backends) {
      ids.add(b.id);
      push(hist.rate, b.id, b.per_s);
      push(hist.p50, b.id, b.p50_ms);
      push(hist.p95, b.id, b.p95_ms);
    }
    const kinds = new Set();
    for (const [kind, r] of Object.entries(snap.rejections)) {
      if (r.total > 0 || hist.rejections.has(kind)) { kinds.add(kind); push(hist.rejections, kind, r.per_s); }
    }
    hist.points = Math.min(HISTORY, hist.points + 1);
    trim(hist.rate, ids); trim(hist.p50, ids); trim(hist.p95, ids); trim(hist.rejections, kinds);
  }

  // -- charts --------------------------------------------------------------------------------------
  // The smallest of 1, 2, 2.5, 5 times a power of ten that is >= value (1 for nothing to show).
  function niceStep(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 2, 2.5, 5, 10]) if (value <= m * power * (1 + 1e-9)) return m * power;
    return 10 * power;
  }

  function niceMax(value) { return niceStep(value); }

  function decimals(step) {
    for (let d = 0; d < 6; d++) if (Math.abs(step * Math.pow(10, d) - Math.round(step * Math.pow(10, d))) < 1e-6) return d;
    return 6;
  }

  function fitCanvas(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const h = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return [ctx, canvas.clientWidth, canvas.clientHeight];
  }

  function line(ctx, values, x0, y0, w, h, top, color, width) {
    const step = w / (HISTORY - 1);
    const offset = HISTORY - values.length;
    ctx.strokeStyle = color; ctx.lineWidth = width; ctx.beginPath();
    let drawing = false;
    values.forEach((v, i) => {
      if (v === null) { drawing = false; return; }
      const x = x0 + (offset + i) * step, y = y0 + h - (Math.min(v, top) / top) * h;
      if (drawing) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      drawing = true;
    });
    ctx.stroke();
  }

  // A line chart of the last HISTORY points: y from 0, ticks with the unit, x in seconds ago.
  function chart(canvas, legend, series, unit, note) {
    const [ctx, W, H] = fitCanvas(canvas);
    ctx.clearRect(0, 0, W, H);
    const left = 58, right = 10, topPad = 8, bottom = 22;
    const w = W - left - right, h = H - topPad - bottom;
    let max = 0;
    for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
    const step = niceStep(max / 4), top = 4 * step, digits = decimals(step);  // four gridlines at round values
    ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#5f6b7a"; ctx.strokeStyle = "#e3e7ec"; ctx.lineWidth = 1;
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = topPad + h - (i / 4) * h;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + w, y); ctx.stroke();
      ctx.fillText(fmt(step * i, digits) + " " + unit, left - 6, y);
    }
    ctx.textBaseline = "top";
    const ticks = [[0, "60 s ago"], [0.5, "30 s ago"], [1, "now"]];
    for (const [f, text] of ticks) {
      ctx.textAlign = f === 0 ? "left" : f === 1 ? "right" : "center";
      ctx.fillText(text, left + f * w, topPad + h + 5);
    }
    // Earlier series thicker, drawn first: a series hidden under an equal one still shows at its edges.
    series.forEach((s, i) => line(ctx, s.values, left, topPad, w, h, top, s.color, Math.max(1.2, 3.4 - 0.7 * i)));
    if (!series.length) {
      ctx.textAlign = "center"; ctx.textBaseline = "middle";
      ctx.fillText(note || "no data yet", left + w / 2, topPad + h / 2);
    }
    legend.replaceChildren(...series.map((s) => {
      const item = el("li");
      const swatch = el("span", "swatch");
      swatch.style.background = s.color;
      item.append(swatch, document.createTextNode(s.label));
      return item;
    }));
    if (series.extra) legend.appendChild(el("li", "muted", `+${series.extra} more backends not drawn`));
  }

  function backendSeries(map) {
    const keys = [...map.keys()];
    const series = keys.slice(0, CHART_SERIES).map((k) => ({ label: k, color: colorOf(k), values: map.get(k) }));
    series.extra = Math.max(0, keys.length - CHART_SERIES);
    return series;
  }

  function sparkline(canvas, id) {
    const [ctx, W, H] = fitCanvas(canvas);
    ctx.clearRect(0, 0, W, H);
    const p50 = hist.p50.get(id) || [], p95 = hist.p95.get(id) || [];
    let max = 0;
    for (const v of p95.concat(p50)) if (v !== null && v > max) max = v;
    const top = niceMax(max);
    ctx.strokeStyle = "#e3e7ec"; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(0, H - 0.5); ctx.lineTo(W, H - 0.5); ctx.stroke();
    line(ctx, p50, 0, 2, W, H - 4, top, "#2563eb", 1.3);
    line(ctx, p95, 0, 2, W, H - 4, top, "#d9480f", 1.3);
    canvas.title = `p50 (blue) and p95 (orange) over the last 60 s; top of the box: ${fmt(top, 0)} ms`;
  }

  // -- the table of backends ------------------------------------------------------------------------
  const COLUMNS = ["id", "health", "ejector", "breaker", "queue", "inflight", "share", "rate", "p50", "p95",
                   "errors", "spark"];
  const NUMERIC = new Set(["inflight", "share", "rate", "p50", "p95", "errors"]);

  function rowFor(b) {
    let row = rows.get(b.id);
    if (row) return row;
    const tr = el("tr");
    tr.dataset.backend = b.id;
    const cells = {};
    for (const name of COLUMNS) {
      const td = el("td", NUMERIC.has(name) ? "num" : name === "id" ? "id" : "");
      td.dataset.col = name;
      cells[name] = td;
      tr.appendChild(td);
    }
    cells.id.append(el("strong", "name", b.id));
    if (b.url !== b.id) cells.id.append(el("span", "url", b.url));
    const canvas = el("canvas");
    cells.spark.appendChild(canvas);
    row = { tr, cells, canvas };
    rows.set(b.id, row);
    $("backends").tBodies[0].appendChild(tr);
    return row;
  }

  function nodeCells(row, node) {
    const { breaker, queue } = row.cells;
    if (node.reach !== "ok") {
      badge(breaker, node.reach, "bad", "unreachable"); detail(breaker, "");
      badge(queue, node.reach, "bad", "unreachable"); detail(queue, "");
      return;
    }
    const br = node.breaker;
    if (br && typeof br === "object") {
      const [text, style] = BREAKER[br.state] || ["unknown", "off"];
      badge(breaker, text, style, br.state);
      const parts = [];
      if (br.consecutive_failures) parts.push(`${br.consecutive_failures} failures in a row`);
      if (br.retry_after_s) parts.push(`retry in ${fmt(br.retry_after_s, 1)} s`);
      detail(breaker, parts.join(", "));
    } else {
      badge(breaker, br || "–", "off", br === "off" ? "off" : "unknown"); detail(breaker, "");
    }
    const q = node.queue;
    if (q && typeof q === "object") {
      const full = q.max && q.current >= q.max;
      badge(queue, `${fmt(q.current, 0)} / ${fmt(q.max, 0)}`, full ? "bad" : "ok", full ? "full" : "ok");
      detail(queue, `${fmt(q.waiting_for_worker, 0)} waiting, ${fmt(q.rejected, 0)} refused`);
    } else {
      badge(queue, q || "–", "off", q === "off" ? "off" : "unknown"); detail(queue, "");
    }
  }

  function updateRow(b) {
    const row = rowFor(b);
    const c = row.cells;
    badge(c.health, b.healthy ? "up" : "down", b.healthy ? "ok" : "bad", b.healthy ? "up" : "down");
    detail(c.health, b.healthy ? "" : `last check: ${b.last_check}`);
    if (b.ejector === null) badge(c.ejector, "off", "off", "off");
    else {
      const [text, style] = EJECTOR[b.ejector] || ["unknown", "off"];
      badge(c.ejector, text, style, b.ejector);
    }
    nodeCells(row, b.node);
    c.inflight.textContent = fmt(b.in_flight, 0);
    c.share.textContent = b.share === null ? "–" : fmt(100 * b.share, 0) + " %";
    c.rate.textContent = fmt(b.per_s, 1);
    c.p50.textContent = fmt(b.p50_ms, 1);
    c.p95.textContent = fmt(b.p95_ms, 1);
    c.errors.textContent = fmt(b.errors, 0);
    sparkline(row.canvas, b.id);
  }

  // -- one snapshot ---------------------------------------------------------------------------------
  function update(snap) {
    lastMessage = Date.now();
    setConn("live", "live, updated " + new Date().toLocaleTimeString("en-GB"));
    $("lb-id").textContent = snap.balancer.id;
    $("lb-strategy").textContent = "strategy: " + snap.balancer.strategy;
    $("sum-requests").textContent = fmt(snap.balancer.requests, 0);
    $("sum-rate").textContent = fmt(snap.balancer.per_s, 1);
    $("sum-inflight").textContent = fmt(snap.balancer.in_flight, 0);
    $("sum-available").textContent = `${snap.membership.available} of ${snap.membership.members}`;
    $("sum-nohealthy").textContent = fmt(snap.rejections.no_healthy_backend.total, 0);
    for (const span of document.querySelectorAll(".window-s")) span.textContent = fmt(snap.window_s, 0);
    $("shown").textContent = snap.shown < snap.total ? `(the first ${snap.shown} of ${snap.total})` : `(${snap.total})`;

    record(snap);
    const present = new Set(snap.backends.map((b) => b.id));
    for (const [id, row] of rows) if (!present.has(id)) { row.tr.remove(); rows.delete(id); }
    snap.backends.forEach(updateRow);

    chart($("chart-rate"), $("legend-rate"), backendSeries(hist.rate), "/s");
    chart($("chart-p95"), $("legend-p95"), backendSeries(hist.p95), "ms");
    const kinds = [...hist.rejections.keys()].map((k) => ({ label: KIND_LABELS[k] || `${k} from nodes`,
                                                           color: KIND_COLORS[k] || colorOf("kind:" + k), values: hist.rejections.get(k) }));
    chart($("chart-rejections"), $("legend-rejections"), kinds, "/s", "no rejections");

    const body = $("rejections").tBodies[0];
    body.replaceChildren(...Object.entries(snap.rejections).map(([kind, r]) => {
      const tr = el("tr");
      tr.dataset.kind = kind;
      tr.append(el("td", "", KIND_LABELS[kind] || `${kind} from nodes`), el("td", "num", fmt(r.total, 0)),
                el("td", "num", fmt(r.per_s, 1)));
      return tr;
    }));
    const m = snap.membership;
    const facts = [["Source", m.source === "registry" ? `registry ${m.registry}` : "--nodes (static)"],
                   ["Members", `${m.members} (at most ${m.max_backends})`], ["Healthy", String(m.healthy)],
                   ["Available (healthy, not ejected)", String(m.available)],
                   ["Left out past the cap", String(m.left_out)], ["Refused addresses", String(m.refused)]];
    $("membership").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v)]));
  }

  // -- the stream -----------------------------------------------------------------------------------
  function setConn(state, text) {
    const conn = $("conn");
    conn.dataset.state = state;
    conn.textContent = text;
  }

  let source = null;
  function connect() {
    setConn("connecting", "connecting…");
    source = new EventSource("/dashboard/events");
    source.onmessage = (event) => {
      let snap;
      try { snap = JSON.parse(event.data); } catch (err) { return; }
      update(snap);
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (too many viewers: 503) or the balancer is gone: try again later ourselves.
        setConn("down", "disconnected; trying again in 5 s");
        source.close();
        setTimeout(connect, 5000);
      } else {
        setConn("down", "connection lost; reconnecting…");
      }
    };
  }
  setInterval(() => {
    if (lastMessage && Date.now() - lastMessage > 3000 && $("conn").dataset.state === "live") {
      setConn("down", "no update for " + Math.round((Date.now() - lastMessage) / 1000) + " s");
    }
  }, 1000);
  connect();
})();
