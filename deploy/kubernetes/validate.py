#!/usr/bin/env python3
"""Validates the manifests offline: every resource of deploy/kubernetes (and of each overlay,
with its JSON patches applied) against the Kubernetes JSON schemas that the PyPI package
kubernetes-validate bundles, in strict mode (unknown fields fail), for the oldest and newest
Kubernetes versions it knows. CRD kinds are checked against schemas/. Any kind without a schema
fails. Prints one line per resource and version; exits 1 on any failure.

Usage: validate.py [DIR]   (default: this file's directory)
"""
import copy
import json
import os
import sys

import jsonschema
import yaml
import kubernetes_validate.utils as kv

HERE = os.path.dirname(os.path.abspath(__file__))
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
}


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def apply_json_patch(doc, ops):
    """RFC 6902 `add` and `replace` (all the overlays use), on object keys and list indexes."""
    for op in ops:
        if op["op"] not in ("add", "replace"):
            raise SystemExit(f"unsupported patch op {op['op']}")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        last = parts[-1]
        if isinstance(node, list):
            if last == "-":
                node.append(op["value"])
            elif op["op"] == "add":
                node.insert(int(last), op["value"])
            else:
                node[int(last)] = op["value"]
        else:
            if op["op"] == "replace" and last not in node:
                raise SystemExit(f"replace of missing path {op['path']}")
            node[last] = op["value"]


def generate_configmap(kdir, gen):
    """A configMapGenerator's ConfigMap (`files`, without the name hash: validation only)."""
    data = {}
    for f in gen.get("files", []):
        key, _, path = f.partition("=") if "=" in f else (os.path.basename(f), "", f)
        with open(os.path.join(kdir, path)) as fh:
            data[key] = fh.read()
    meta = {"name": gen["name"]}
    if "namespace" in gen:
        meta["namespace"] = gen["namespace"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def build(kdir):
    """Resources of a kustomization: its files, its bases, its generated ConfigMaps, then its
    patches."""
    k = load_all(os.path.join(kdir, "kustomization.yaml"))[0]
    out = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(kdir, r))
        out += build(p) if os.path.isdir(p) else load_all(p)
    out += [generate_configmap(kdir, g) for g in k.get("configMapGenerator", [])]
    for patch in k.get("patches", []):
        t = patch["target"]
        hits = [d for d in out if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]]
        if len(hits) != 1:
            raise SystemExit(f"{kdir}: patch target {t} matches {len(hits)} resources")
        apply_json_patch(hits[0], yaml.safe_load(patch["patch"]))
    return out


def validate(label, res, versions):
    key = (res.get("apiVersion"), res.get("kind"))
    name = f"{label} {res.get('kind')}/{res.get('metadata', {}).get('name')}"
    if key in CRD_SCHEMAS:
        with open(os.path.join(HERE, "schemas", CRD_SCHEMAS[key])) as f:
            schema = json.load(f)
        try:
            jsonschema.Draft202012Validator(schema).validate(res)
        except jsonschema.ValidationError as e:
            print(f"FAIL {name}: {'.'.join(map(str, e.path))}: {e.message}")
            return False
        print(f"OK {name} (schemas/ CRD subset)")
        return True
    ok = True
    for v in versions:
        try:
            kv.validate(res, v, strict=True)
            print(f"OK {name} (Kubernetes {kv.major_minor(v)}, strict)")
        except kv.ValidationError as e:
            print(f"FAIL {name} (Kubernetes {e.version}): {'.'.join(map(str, e.path))}: {e.message}")
            ok = False
        except kv.SchemaNotFoundError as e:
            print(f"FAIL {name}: no schema: {e.message}")
            ok = False
    return ok


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else HERE
    all_v = kv.all_versions()
    versions = [all_v[0], all_v[-1]]
    ok = True
    trees = [("base", root)]
    overlays = os.path.join(root, "overlays")
    if os.path.isdir(overlays):
        trees += [(f"overlays/{o}", os.path.join(overlays, o)) for o in sorted(os.listdir(overlays))]
    for label, kdir in trees:
        for res in build(kdir):
            ok &= validate(label, copy.deepcopy(res), versions)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
