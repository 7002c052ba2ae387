"""Interop check: every fusable fixture of testdata/manifest.json is fused by the onnx-repvgg
binary, then validated by tools we did not write.

For each fixture: `onnx.checker.check_model(full_check=True)` on the fused model, graph inputs and
outputs unchanged, the op histogram equal to the PyTorch deploy export's (`deploy_ops_same_export`),
and ONNX Runtime's outputs on the stored input equal to the original model's within a tolerance
relative to the output magnitude (1e-4 for float32; 2e-2 for float16).

Usage: python scripts/interop.py BINARY [FIXTURE_ROOT]
"""

import collections
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


def run(path, feed):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: feed})


def signature(model):
    """Graph inputs a caller feeds (not the initializers IR < 4 had to list) and outputs."""
    g = model.graph
    weights = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in weights]
    return [(v.name, v.type.SerializeToString()) for v in inputs + list(g.output)]


def main():
    binary = sys.argv[1]
    root = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "testdata")
    manifest = json.loads((root / "manifest.json").read_text())
    failures, checked, worst = [], 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for fx in manifest:
            if not fx["fusable"] or fx.get("deploy_structure"):
                continue
            src = root / fx["path"]
            dst = pathlib.Path(tmp) / f'{fx["model"]}_{fx["form"]}.onnx'
            subprocess.run([binary, "fuse", str(src), str(dst)], check=True, capture_output=True)
            label = f'{fx["model"]}/{fx["form"]}'
            try:
                onnx.checker.check_model(str(dst), full_check=True)
                original, fused = onnx.load(str(src)), onnx.load(str(dst))
                assert signature(original) == signature(fused), "graph inputs/outputs changed"
                ops = collections.Counter(n.op_type for n in fused.graph.node)
                assert ops == collections.Counter(fx["deploy_ops_same_export"]), f"ops {dict(ops)}"
                feed = numpy_helper.to_array(onnx.load_tensor(str(root / fx["input"])))
                want, got = run(src, feed), run(dst, feed)
                errors = []
                for w, g in zip(want, got):
                    rel = float(np.max(np.abs(w.astype(np.float64) - g)) / max(np.max(np.abs(w)), 1e-12))
                    worst = max(worst, rel)
                    errors.append(rel)
                    assert rel <= TOLERANCE[fx["dtype"]], f"relative error {rel:.3g}"
                checked += 1
                print(f"ok    {label:<32} {sum(ops.values()):>4} nodes, relative error {max(errors):.2e}")
            except Exception as e:  # noqa: BLE001 - report every fixture
                failures.append(label)
                print(f"FAIL  {label}: {e}")
    print(f"interop: {checked} passed, {len(failures)} failed (worst relative error {worst:.2e})")
    sys.exit(1 if failures or checked == 0 else 0)


if __name__ == "__main__":
    main()
