"""The server's read-only web port (``[server] metrics_port``): Prometheus ``/metrics``, the
fleet as JSON on ``/api/fleet``, and a small dashboard page on ``/`` that draws it (fleet
status, each device's reported perplexity per round, the latest refusals). No external assets;
device ids reach the page as text only (never as markup)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleetune.edge_sdk.errors import ConfigError

log = logging.getLogger(__name__)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fleetune</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
.cards { display: flex; gap: 1em; } .card { border: 1px solid #ccc; padding: .6em 1em; }
.card b { display: block; font-size: 1.6em; } table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #ddd; padding: .2em .6em; text-align: left; }
svg { border: 1px solid #ccc; background: #fff; } .legend span { margin-right: 1em; }
</style></head>
<body>
<h1>fleetune: <span id="fleet"></span></h1>
<div class="cards">
  <div class="card">adapter version<b id="version">-</b></div>
  <div class="card">devices online<b id="online">-</b></div>
  <div class="card">devices offline<b id="offline">-</b></div>
  <div class="card">rounds closed<b id="rounds">-</b></div>
  <div class="card">updates refused<b id="refused">-</b></div>
</div>
<h2>Held-out perplexity per round</h2>
<p>as each device reported it with its update, after local tuning (log scale)</p>
<svg id="plot" width="720" height="300"></svg>
<div class="legend" id="legend"></div>
<h2>Latest refusals</h2>
<table><thead><tr><th>round</th><th>device</th><th>reason</th></tr></thead>
<tbody id="refusals"></tbody></table>
<script>
const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];
function el(tag, attrs, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function plot(series) {
  const svg = document.getElementById("plot"), legend = document.getElementById("legend");
  svg.replaceChildren(); legend.replaceChildren();
  const points = Object.values(series).flat();
  if (!points.length) { svg.appendChild(el("text", {x: 20, y: 30}, "no perplexity yet")); return; }
  const W = 720, H = 300, L = 50, B = 30;
  const rs = points.map(p => p[0]), ps = points.map(p => Math.log(p[1]));
  const r0 = Math.min(...rs), r1 = Math.max(...rs, r0 + 1);
  const p0 = Math.min(...ps), p1 = Math.max(...ps, p0 + 1e-6);
  const x = r => L + (r - r0) / (r1 - r0) * (W - L - 20);
  const y = p => 10 + (p1 - Math.log(p)) / (p1 - p0) * (H - B - 10);
  svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - 10, y2: H - B, stroke: "#999"}));
  svg.appendChild(el("line", {x1: L, y1: 10, x2: L, y2: H - B, stroke: "#999"}));
  svg.appendChild(el("text", {x: W - 60, y: H - 2}, "round"));
  const step = Math.max(1, Math.ceil((r1 - r0) / 12));
  for (let r = r0; r <= r1; r += step) {
    svg.appendChild(el("text", {x: x(r) - 4, y: H - B + 14, "font-size": 11}, r));
  }
  svg.appendChild(el("text", {x: 2, y: 20}, Math.exp(p1).toFixed(1)));
  svg.appendChild(el("text", {x: 2, y: H - B}, Math.exp(p0).toFixed(1)));
  Object.keys(series).sort().forEach((device, i) => {
    const color = COLORS[i % COLORS.length];
    const line = el("polyline", {fill: "none", stroke: color, "stroke-width": 2,
      points: series[device].map(([r, p]) => x(r) + "," + y(p)).join(" ")});
    line.dataset.device = device;
    svg.appendChild(line);
    for (const [r, p] of series[device]) {
      svg.appendChild(el("circle", {cx: x(r), cy: y(p), r: 3, fill: color}));
    }
    const key = document.createElement("span");
    key.style.color = color; key.textContent = "\\u25A0 " + device;
    legend.appendChild(key);
  });
}
async function refresh() {
  const fleet = await (await fetch("api/fleet")).json();
  const states = Object.values(fleet.devices).map(d => d.state);
  document.getElementById("fleet").textContent = fleet.fleet + " (" + fleet.mode + ")";
  document.getElementById("version").textContent = fleet.adapter_version;
  document.getElementById("online").textContent = states.filter(s => s === "online").length;
  document.getElementById("offline").textContent = states.filter(s => s !== "online").length;
  document.getElementById("rounds").textContent = fleet.rounds.filter(r => r.closed).length;
  document.getElementById("refused").textContent = fleet.refused_total;
  plot(fleet.perplexity);
  const body = document.getElementById("refusals");
  body.replaceChildren(...fleet.refusals.slice().reverse().map(r => {
    const row = document.createElement("tr");
    for (const v of [r.round, r.device, r.reason]) {
      const cell = document.createElement("td"); cell.textContent = v; row.appendChild(cell);
    }
    return row;
  }));
  document.body.dataset.loaded = "1";
}
refresh(); setInterval(refresh, 5000);
</script></body></html>
"""


class Dashboard:
    """Serves ``/metrics``, ``/api/fleet`` (``snapshot()`` as JSON) and ``/`` on a daemon
    thread."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: CollectorRegistry,
        snapshot: Callable[[], dict],
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(metrics))
                elif path == "/api/fleet":
                    body = json.dumps(snapshot()).encode()
                    self._send(200, "application/json", body)
                elif path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", PAGE.encode())
                else:
                    self._send(404, "text/plain", b"not found\\n")

            def _send(self, code: int, kind: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("dashboard: " + format, *args)

        try:
            self._http = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise ConfigError(f"[server] metrics_port {port} on {host}: {err}") from err
        self._http.daemon_threads = True
        self.url = f"http://{host}:{self._http.server_address[1]}/"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        log.info("dashboard on %s, metrics on %smetrics", self.url, self.url)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
