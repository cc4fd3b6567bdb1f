#!/usr/bin/env python3
"""Writes deploy/seccomp/sensor.json: a container runtime's default seccomp profile, resolved
for the sensor's container (x86_64, the DaemonSet's capabilities), plus `bpf` and
`perf_event_open`.

Source: Podman's default profile, /usr/share/containers/seccomp.json of Debian 12's
golang-github-containers-common 0.50.1 (the containers/common profile, itself derived from
Docker's). It allows `bpf` and `perf_event_open` only with CAP_SYS_ADMIN and answers EPERM
otherwise, so the least-privilege sensor (CAP_BPF, CAP_PERFMON) cannot load anything under it.

The output is plain OCI runtime-spec seccomp (`architectures`, `syscalls[].names/action/args`),
without the Docker/containers-common extensions (`archMap`, `includes`, `excludes`): every
runtime reads that form, while containerd's loader (Kubernetes `Localhost` profiles) ignores the
extensions and would then apply capability-conditional rules unconditionally. So the
conditions are resolved here, for the capabilities the DaemonSet adds (read from
deploy/kubernetes/daemonset.yaml) and for both image architectures (amd64 and arm64: the image
is one manifest list, so one profile serves a mixed cluster): a rule is kept when it applies to
either, and a syscall name one architecture lacks is ignored there by the runtime. The kernel
still checks CAP_BPF and CAP_PERFMON for the two added calls; the profile only stops denying them.

  python3 deploy/seccomp/generate.py            # rewrite sensor.json
  python3 deploy/seccomp/generate.py --check    # exit 1 when sensor.json is not current
"""

import argparse
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = pathlib.Path("/usr/share/containers/seccomp.json")
ADDED = ["bpf", "perf_event_open"]
# Go architecture name -> (libseccomp main architecture, its sub-architectures' source key).
ARCHES = {"amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64"}


def daemonset_caps():
    """`capabilities.add` of the DaemonSet, as CAP_ names."""
    text = (HERE.parent / "kubernetes/daemonset.yaml").read_text()
    block = text.split("capabilities:", 1)[1]
    add = block.split("add:", 1)[1]
    caps = []
    for line in add.splitlines()[1:]:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = re.fullmatch(r"- ([A-Z_]+)", s)
        if not m:
            break
        caps.append("CAP_" + m.group(1))
    return caps


def applies(rule, caps, arch):
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps") and not all(c in caps for c in inc["caps"]):
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if exc.get("caps") and any(c in caps for c in exc["caps"]):
        return False
    if exc.get("arches") and arch in exc["arches"]:
        return False
    return True


def generate(source, caps, arches):
    architectures = []
    for arch in arches:
        main = ARCHES[arch]
        sub = next(a["subArchitectures"] for a in source["archMap"] if a["architecture"] == main)
        architectures += [main] + sub
    syscalls = []
    for rule in source["syscalls"]:
        if not any(applies(rule, caps, arch) for arch in arches):
            continue
        names = [n for n in rule["names"] if n not in ADDED]
        if not names:
            continue
        out = {"names": names, "action": rule["action"]}
        if rule.get("errnoRet") is not None:
            out["errnoRet"] = rule["errnoRet"]
        if rule.get("args"):
            out["args"] = [
                {k: a[k] for k in ("index", "value", "valueTwo", "op")} for a in rule["args"]
            ]
        syscalls.append(out)
    syscalls.append({"names": ADDED, "action": "SCMP_ACT_ALLOW"})
    profile = {
        "defaultAction": source["defaultAction"],
        "defaultErrnoRet": source["defaultErrnoRet"],
        "architectures": architectures,
        "syscalls": syscalls,
    }
    return json.dumps(profile, indent=2) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--source", type=pathlib.Path, default=SOURCE)
    ap.add_argument("--arch", default="all", choices=sorted(ARCHES) + ["all"])
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "sensor.json")
    args = ap.parse_args()
    caps = daemonset_caps()
    arches = sorted(ARCHES) if args.arch == "all" else [args.arch]
    text = generate(json.loads(args.source.read_text()), caps, arches)
    if args.check:
        if args.out.read_text() != text:
            print(f"{args.out} is not what {args.source} gives for {caps}: rerun generate.py")
            return 1
        print(f"{args.out} is current ({args.source}, {args.arch}, {' '.join(caps)})")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out} from {args.source} for {args.arch}, {' '.join(caps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
