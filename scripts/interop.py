"""Interop check: fixtures of testdata/ fused by the onnx-repvgg binary, then validated by tools
we did not write.

For every fixture of each FIXTURE_ROOT/manifest.json:
- `onnx.checker.check_model(full_check=True)` on the fused model;
- the graph inputs a caller feeds and the graph outputs unchanged;
- `expect` = fused (or no expect and fusable): the op histogram equal to the PyTorch deploy
  export's (`deploy_ops_same_export`); for the linear folds (`bn_min` in the manifest) exactly
  `bn_min` BatchNormalization nodes left and no operator more often than in the deploy export;
- refused: nothing fused means a byte-identical copy; training mode means exit 1, nothing written;
- ONNX Runtime's outputs on the stored input equal to the original model's within a tolerance
  relative to the output magnitude (1e-4 float32, 2e-2 float16), where ORT runs the model.

Then every model of ONNX's own backend test corpus (shipped in the `onnx` package,
`onnx/backend/test/data/`, a corpus we did not write) must pass through `fuse` byte-identical:
nothing in it is a re-parameterizable block (its "light" models generate their weights with
ConstantOfShape, which stays as it is).

Usage: python scripts/interop.py BINARY [FIXTURE_ROOT ...]  (default: testdata testdata/families
testdata/linear)
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
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: feed})


def signature(model):
    """Graph inputs a caller feeds (not the initializers IR < 4 had to list) and outputs."""
    g = model.graph
    weights = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in weights]
    return [(v.name, v.type.SerializeToString()) for v in inputs + list(g.output)]


def expectation(fx):
    if "expect" in fx:
        return fx["expect"].split(":")[0]
    return "fused" if fx["fusable"] else "refused"


def check(binary, root, fx, dst):
    src = root / fx["path"]
    result = subprocess.run([binary, "fuse", "--json", str(src), str(dst)], capture_output=True, text=True)
    if fx.get("expect", "").startswith("refused: training") or (not fx["fusable"] and "expect" not in fx):
        # BatchNormalization in training mode is an error unless allowed: exit 1, nothing written.
        assert result.returncode == 1, f"exit {result.returncode}"
        assert "training mode" in result.stderr, result.stderr
        assert not dst.exists(), "an output was written"
        return "refused (training mode), nothing written"
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr.strip()}"
    summary = json.loads(result.stdout)["summary"]
    fused_blocks, folds = summary["fused"], summary["folds"]
    expect = expectation(fx)
    if fused_blocks + folds == 0:
        assert expect != "fused" or fx.get("bn_before", 0) == fx.get("bn_min", 0), "nothing fused"
        if fx.get("external_data"):
            # The sidecar takes the output's name: compare with the data loaded in.
            same = onnx.load(str(src)).SerializeToString() == onnx.load(str(dst)).SerializeToString()
        else:
            same = src.read_bytes() == dst.read_bytes()
        assert same, "nothing fused, yet the output differs"
        return "unchanged"
    onnx.checker.check_model(str(dst), full_check=True)
    original, fused = onnx.load(str(src)), onnx.load(str(dst))
    assert signature(original) == signature(fused), "graph inputs/outputs changed"
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    deploy = collections.Counter(fx["deploy_ops_same_export"])
    if "bn_min" in fx:
        # Linear folds: every BatchNormalization that can fold folds, and no operator is left
        # more often than in the library's own deploy model.
        assert ops["BatchNormalization"] == fx["bn_min"], f"{ops['BatchNormalization']} BatchNormalization left"
        if expect == "fused":
            assert all(n <= deploy[op] for op, n in ops.items()), f"ops {dict(ops)}"
    elif expect == "fused":
        assert ops == deploy, f"ops {dict(ops)}"
    if not fx.get("ort_runs", True):
        return f"{fused_blocks} blocks, {folds} folds, checker only (ONNX Runtime cannot run {fx['dtype']})"
    feed = numpy_helper.to_array(onnx.load_tensor(str(root / fx["input"])))
    want, got = run(src, feed), run(dst, feed)
    worst = 0.0
    for w, g in zip(want, got):
        rel = float(np.max(np.abs(w.astype(np.float64) - g)) / max(np.max(np.abs(w)), 1e-12))
        worst = max(worst, rel)
        assert rel <= TOLERANCE[fx["dtype"]], f"relative error {rel:.3g}"
    return f"{fused_blocks} blocks, {folds} folds, {sum(ops.values())} nodes, relative error {worst:.2e}"


def main():
    binary = sys.argv[1]
    roots = [pathlib.Path(r) for r in sys.argv[2:]] or [
        pathlib.Path(r) for r in ("testdata", "testdata/families", "testdata/linear")
    ]
    failures, checked = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for root in roots:
            for fx in json.loads((root / "manifest.json").read_text()):
                if fx.get("deploy_structure"):
                    continue
                label = f'{fx["model"]}/{fx["form"]}'
                dst = pathlib.Path(tmp) / f'{fx["model"]}_{fx["form"]}.onnx'
                try:
                    print(f"ok    {label:<40} {check(binary, root, fx, dst)}")
                    checked += 1
                except Exception as e:  # noqa: BLE001 - report every fixture
                    failures.append(label)
                    print(f"FAIL  {label}: {e}")
        corpus = pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data"
        models = sorted(corpus.rglob("*.onnx"))
        unchanged = 0
        for src in models:
            dst = pathlib.Path(tmp) / "corpus.onnx"
            result = subprocess.run([binary, "fuse", str(src), str(dst)], capture_output=True, text=True)
            if result.returncode == 0 and dst.read_bytes() == src.read_bytes():
                unchanged += 1
            else:
                failures.append(str(src.relative_to(corpus)))
                print(f"FAIL  corpus {src.relative_to(corpus)}: exit {result.returncode} {result.stderr.strip()}")
        print(f"ok    ONNX backend test corpus: {unchanged} of {len(models)} models unchanged")
        checked += unchanged
    print(f"interop: {checked} passed, {len(failures)} failed")
    sys.exit(1 if failures or checked == 0 else 0)


if __name__ == "__main__":
    main()
