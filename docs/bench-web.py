#!/usr/bin/env python3
"""Size of the web view and the daemon CPU one refresh costs (docs/benchmarks-web.md).

Usage: bench-web.py SENSOR_BINARY [--checks N] [--probes]
Starts `sensor run` on loopback, lets it settle, then measures the daemon's CPU time
(utime + stime from /proc/PID/stat) over an idle period and over a period in which a client
refreshes like the page does (GET /api/v1/summary and one page of /api/v1/checks with its
charts) every 2.1 s (just past the summary's 2 s cache); the difference divided by the refreshes is the cost of one refresh.
Only loopback traffic.
"""
import http.server, json, os, socket, socketserver, subprocess, sys, tempfile, threading, time, urllib.request

TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *a):
        pass


def main():
    binary = sys.argv[1]
    n = int(sys.argv[sys.argv.index("--checks") + 1]) if "--checks" in sys.argv else 2
    probes = "--probes" in sys.argv
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Ok)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    up = srv.server_address[1]
    closed = free_port()
    lines = ["alerting: {window: 2m, min_samples: 3}", "checks:"]
    for i in range(n):
        target = f"http://127.0.0.1:{up}/" if i % 2 == 0 else f"http://127.0.0.1:{closed}/"
        lines.append(f"  - {{name: check-{i:04d}, type: http, url: '{target}', interval: 30s, timeout: 2s}}")
    if not probes:
        lines.insert(0, "probes: {oom: {enabled: false}, memcg: {enabled: false}, tcp: {enabled: false}}")
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write("\n".join(lines) + "\n")
    cfg.close()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    d = subprocess.Popen([binary, "run", "--listen", f"127.0.0.1:{port}", "--config", cfg.name],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        get = lambda p: urllib.request.urlopen(base + p, timeout=10).read()
        sizes = {p: len(get(p)) for p in ["/", "/assets/app.js", "/assets/app.css"]}
        time.sleep(35)  # every check has run once
        page = "/api/v1/checks?offset=0&limit=25&series=10m&alerts=100"
        sizes["/api/v1/summary"] = len(get("/api/v1/summary"))
        sizes[page] = len(get(page))
        sizes["/api/v1/checks (all, as sensor top)"] = len(get("/api/v1/checks"))
        period, every = 90.0, 2.1
        c0 = cpu(d.pid)
        time.sleep(period)
        idle = cpu(d.pid) - c0
        c0, t0, k = cpu(d.pid), time.time(), 0
        while time.time() - t0 < period:
            t = time.time()
            get("/api/v1/summary")
            get(page)
            k += 1
            time.sleep(max(0.0, every - (time.time() - t)))
        busy = cpu(d.pid) - c0
        # One more pass, timed from the client, for the latency of a refresh.
        t = time.time()
        get("/api/v1/summary"); get(page)
        latency = time.time() - t
        print(json.dumps({"checks": n, "probes": probes, "sizes": sizes, "idle_cpu_s": idle,
                          "busy_cpu_s": busy, "refreshes": k,
                          "cpu_ms_per_refresh": (busy - idle) / k * 1000,
                          "refresh_latency_ms": latency * 1000}, indent=1))
    finally:
        d.terminate()
        d.wait()
        os.unlink(cfg.name)


main()
