#!/usr/bin/env python3
"""The libtorch parity fixtures through `tessera infer` on a device.

Each fixture (written by `TESSERA_FIXTURES_OUT=DIR cargo test --features
torch-oracle --test torch_parity_models`) holds a model's weights, a batch,
its class targets, and libtorch's logits, loss and gradients. This runs
`tessera infer` on the device and compares as the parity test does: for
every tensor, max |tessera - torch| / max |torch| at most the case's bound;
a gradient that is exactly zero in theory (both sides below zero_grad times
the model's largest gradient) passes on that bound.

Pure Python (no numpy): safetensors is an 8-byte header length, a JSON
header, then the raw little-endian data.

Usage: parity.py TESSERA FIXTURES_DIR DEVICE OUT_JSON
"""
import array
import json
import os
import struct
import subprocess
import sys


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {info['dtype']}, expected F32")
        start, end = info["data_offsets"]
        a = array.array("f")
        a.frombytes(data[start:end])
        if sys.byteorder != "little":
            a.byteswap()
        out[name] = (info["shape"], a)
    return out


def compare(case_dir, tessera, device):
    case = json.load(open(os.path.join(case_dir, "case.json")))
    out_path = os.path.join(case_dir, f"out-{device.replace(':', '_')}.safetensors")
    cmd = [tessera, "infer", f"config={case['config']}", *case["overrides"],
           "--weights", os.path.join(case_dir, "weights.safetensors"), "--weights-format", "tessera",
           "--input", os.path.join(case_dir, "input.safetensors"),
           "--target", os.path.join(case_dir, "target.safetensors"),
           "--output", out_path, "--device", device]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"case": os.path.basename(case_dir), "ok": False, "error": (r.stderr or r.stdout)[-2000:]}
    got = read_safetensors(out_path)
    want = read_safetensors(os.path.join(case_dir, "expected.safetensors"))
    largest_grad = max((max(abs(v) for v in a) for n, (_, a) in want.items() if n.startswith("grad.") and len(a)), default=0.0)
    problems, worst = [], (0.0, "")
    for name, (shape, e) in want.items():
        if name not in got:
            problems.append(f"{name}: missing from tessera's output")
            continue
        gshape, g = got[name]
        if list(gshape) != list(shape):
            problems.append(f"{name}: shape {gshape}, libtorch {shape}")
            continue
        max_e = max((abs(v) for v in e), default=0.0)
        max_g = max((abs(v) for v in g), default=0.0)
        diff = max((abs(a - b) for a, b in zip(g, e)), default=0.0)
        rel = diff / max_e if max_e > 0 else diff
        if name.startswith("grad.") and max(max_e, max_g) <= case["zero_grad"] * largest_grad:
            continue
        if rel != rel or rel > case["max_rel"]:
            problems.append(f"{name}: relative error {rel:.3e} > {case['max_rel']:.0e}")
        if rel > worst[0]:
            worst = (rel, name)
    return {"case": os.path.basename(case_dir), "ok": not problems, "problems": problems,
            "worst_rel": worst[0], "worst": worst[1], "tensors": len(want)}


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    tessera, fixtures, device, out_json = sys.argv[1:]
    results = []
    for d in sorted(os.listdir(fixtures)):
        path = os.path.join(fixtures, d)
        if os.path.isfile(os.path.join(path, "case.json")):
            r = compare(path, tessera, device)
            results.append(r)
            status = "ok" if r["ok"] else "FAILED"
            detail = f"worst {r.get('worst_rel', float('nan')):.2e} ({r.get('worst', '')})" if r["ok"] else "; ".join(r.get("problems", [])[:3]) or r.get("error", "")
            print(f"  parity {r['case']}: {status} {detail}", flush=True)
    json.dump(results, open(out_json, "w"), indent=1)
    sys.exit(0 if results and all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
