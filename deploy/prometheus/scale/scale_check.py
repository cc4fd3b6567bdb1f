#!/usr/bin/env python3
"""Scale check of the fleet OOM rules on a real Prometheus TSDB.

Simulates HOSTS sensors for HOURS hours at one sample a minute: every host exports
sensor_build_info; 10% of hosts start with an old OOM-killed workload series; in each hour a
different 1% of the hosts has one OOM kill (in the old series where the host has one, else in a
new series, the case increase() cannot see). The series are written as OpenMetrics, backfilled
with `promtool tsdb create-blocks-from openmetrics`, and a real `prometheus` serves that TSDB on a
free loopback port. The expressions of sensor-rules.yml (the per-host rule inlined into the
fleet rules, since backfilled data has no recording-rule output) are evaluated at the end of
every full hour through the HTTP API and must give exactly HOSTS/100 hosts and a ratio of 0.01.

Prints a JSON summary (--json) or writes a Markdown report (--report FILE); exits 1 when a
number is wrong.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
RULES = os.path.join(HERE, "..", "sensor-rules.yml")
STEP = 60  # seconds between samples, as a 1m scrape interval


def rule_exprs():
    """record name -> expr, from sensor-rules.yml (no YAML dependency: the file's own layout)."""
    text = open(RULES).read()
    out = {}
    for m in re.finditer(r"- record: (\S+)\n\s+expr: (\|\n((?:\s{10,}.*\n)+)|(.*)\n)", text):
        expr = m.group(3) if m.group(3) else m.group(4)
        out[m.group(1)] = " ".join(l.strip() for l in expr.strip().splitlines())
    return out


def generate(path, hosts, hours, end):
    start = end - hours * 3600
    per_hour = hosts // 100
    n = 0
    with open(path, "w") as f:
        f.write("# HELP sensor_build_info Sensor build.\n# TYPE sensor_build_info gauge\n")
        ts = range(start, end + 1, STEP)
        for h in range(hosts):
            lbl = f'instance="host-{h:05d}",kernel="6.1.0",version="0.1.0"'
            f.writelines(f"sensor_build_info{{{lbl}}} 1 {t}\n" for t in ts)
            n += len(ts)
        f.write("# HELP sensor_oom_kills OOM kills.\n# TYPE sensor_oom_kills counter\n")
        # kills[h] = (time, hour) of host h's kill; hour k hits hosts [k*per_hour, (k+1)*per_hour)
        # shifted so consecutive hours hit different hosts.
        kills = {}
        for k in range(hours):
            for j in range(per_hour):
                h = (k * per_hour * 37 + j) % hosts
                kills[h] = start + k * 3600 + 300 + (j * 3001) % 3000  # minute 5..55 of hour k
        for h in range(hosts):
            ns = f"ns-{h % 50}"
            inst = f'instance="host-{h:05d}"'
            old = h % 10 == 0
            kt = kills.get(h)
            if old:
                lbl = f'{inst},namespace="{ns}",scope="memcg",cgroup="/kubepods/old-{h}",container_id="",pod_uid=""'
                for t in ts:
                    f.write(f"sensor_oom_kills_total{{{lbl}}} {2 if kt is not None and t >= kt else 1} {t}\n")
                    n += 1
            elif kt is not None:
                lbl = f'{inst},namespace="{ns}",scope="memcg",cgroup="/kubepods/new-{h}",container_id="",pod_uid=""'
                for t in ts:
                    if t >= kt:
                        f.write(f"sensor_oom_kills_total{{{lbl}}} 1 {t}\n")
                        n += 1
        f.write("# EOF\n")
    return start, n


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def query(port, expr, at):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": at})
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = json.load(r)
    dt = time.monotonic() - t0
    if body.get("status") != "success":
        raise SystemExit(f"query failed: {expr}: {body}")
    return body["data"]["result"], dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=10000)
    ap.add_argument("--hours", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--report")
    a = ap.parse_args()
    if a.hosts % 100:
        raise SystemExit("--hosts must be a multiple of 100")
    work = tempfile.mkdtemp(prefix="sensor-scale-")
    prom = None
    try:
        # End a few minutes ago on a minute boundary, so retention keeps it and queries see it.
        end = (int(time.time()) // 60) * 60 - 300
        t0 = time.monotonic()
        om = os.path.join(work, "data.om")
        start, samples = generate(om, a.hosts, a.hours, end)
        t_gen = time.monotonic() - t0
        data = os.path.join(work, "data")
        t0 = time.monotonic()
        subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", om, data],
                       check=True, stdout=subprocess.DEVNULL)
        t_backfill = time.monotonic() - t0
        os.remove(om)
        port = free_port()
        t0 = time.monotonic()
        log = open(os.path.join(work, "prometheus.log"), "w")
        cfg = os.path.join(work, "prometheus.yml")
        open(cfg, "w").write("global: {scrape_interval: 1m}\n")
        prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={data}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=30d",
                                 "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=log)
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("prometheus did not become ready: " + open(log.name).read())
        t_ready = time.monotonic() - t0

        rules = rule_exprs()
        inst = rules["instance:sensor_oom_kills:increase1h"]
        inline = lambda e: e.replace("instance:sensor_oom_kills:increase1h", f"({inst})")
        exprs = {
            "instance:sensor_oom_kills:increase1h (hosts > 0)": f"count(({inst}) > 0)",
            "fleet:sensor_hosts_with_oom_kills:ratio1h": inline(rules["fleet:sensor_hosts_with_oom_kills:ratio1h"]),
            "fleet:sensor_oom_kills:rate1h": inline(rules["fleet:sensor_oom_kills:rate1h"]),
            "namespace:sensor_oom_kills:increase1h (sum)": f"sum({rules['namespace:sensor_oom_kills:increase1h']})",
        }
        hours = []
        ok = True
        for k in range(1, a.hours):  # hour k is (start + k h, start + (k+1) h]; needs 1h of history
            at = start + (k + 1) * 3600
            row = {"hour": k, "times_ms": {}}
            for name, e in exprs.items():
                res, dt = query(port, e, at)
                row["times_ms"][name] = round(dt * 1000, 1)
                row[name] = float(res[0]["value"][1]) if res else None
            want_hosts = a.hosts // 100
            row["ok"] = (row["instance:sensor_oom_kills:increase1h (hosts > 0)"] == want_hosts
                         and row["fleet:sensor_hosts_with_oom_kills:ratio1h"] == 0.01
                         # increase() extrapolates to the window's edges: within 5% of 1 kill/host.
                         and abs(row["fleet:sensor_oom_kills:rate1h"] * 3600 / want_hosts - 1) < 0.05
                         and abs(row["namespace:sensor_oom_kills:increase1h (sum)"] / want_hosts - 1) < 0.05)
            ok &= row["ok"]
            hours.append(row)
        summary = {"hosts": a.hosts, "hours": a.hours, "samples": samples, "generate_s": round(t_gen, 1),
                   "backfill_s": round(t_backfill, 1), "prometheus_ready_s": round(t_ready, 1),
                   "hours_checked": hours, "ok": ok}
        if a.json:
            print(json.dumps(summary, indent=1))
        if a.report:
            write_report(a.report, summary, exprs)
        return 0 if ok else 1
    finally:
        if prom:
            prom.terminate()
            prom.wait()
        shutil.rmtree(work, ignore_errors=True)


def write_report(path, s, exprs):
    ver = subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    lines = [
        "# Fleet OOM rules at scale",
        "",
        f"Generated by `cargo xtask scale-check` (deploy/prometheus/scale/scale_check.py) with {ver}.",
        "",
        f"{s['hosts']:,} simulated hosts, {s['hours']} hours at one sample per minute "
        f"({s['samples']:,} samples):",
        "every host exports `sensor_build_info`; 10% start with an old OOM-killed workload",
        "series; each hour a different 1% of hosts has one kill (in the old",
        "series where there is one, else in a new series). Backfilled with `promtool tsdb",
        "create-blocks-from openmetrics` into a real TSDB served by `prometheus`; the rule",
        "expressions of sensor-rules.yml (per-host rule inlined into the fleet rules) evaluated at",
        "the end of each full hour through the HTTP API.",
        "",
        f"- generate OpenMetrics: {s['generate_s']} s; backfill: {s['backfill_s']} s; "
        f"Prometheus ready on the TSDB: {s['prometheus_ready_s']} s",
        "",
        "| hour | hosts with kills | ratio1h | kills/h (rate1h x 3600) | namespace sum | query ms (hosts / ratio / rate / namespace) | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in s["hours_checked"]:
        t = r["times_ms"]
        lines.append(
            f"| {r['hour']} | {r['instance:sensor_oom_kills:increase1h (hosts > 0)']:.0f} | "
            f"{r['fleet:sensor_hosts_with_oom_kills:ratio1h']} | {r['fleet:sensor_oom_kills:rate1h'] * 3600:.2f} | "
            f"{r['namespace:sensor_oom_kills:increase1h (sum)']:.2f} | "
            + " / ".join(f"{v:.0f}" for v in t.values()) + f" | {'yes' if r['ok'] else 'NO'} |")
    lines += [
        "",
        "The host count and the ratio must be exact. kills/h may differ slightly from the host count",
        "in general, as `increase()` extrapolates when samples do not sit on the window's edges;",
        "the check allows 5% there (here the samples are on the minute, so it is exact too).",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
