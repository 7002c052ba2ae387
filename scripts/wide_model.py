"""Writes a RepVGG-style training-structure model bigger than protobuf's 2 GiB limit, with its
weights in an external `.onnx.data` file, and checks that `onnx-repvgg fuse` round-trips it.

The model: BLOCKS blocks of WIDTH channels (3x3 Conv+BN, 1x1 Conv+BN, identity BN, Add, Relu),
random weights and statistics from a fixed seed, built with onnx.helper (PyTorch cannot export a
single file this size). With the defaults (4 blocks of 4096 channels) the weights are 2.6 GB.

Then: `onnx-repvgg fuse` (timed with /usr/bin/time, beside `cp` of the same files), the output's
data must be in OUT.data with 4 KiB-aligned offsets, and ONNX Runtime must give the same output as
on the original within 1e-4 relative.

Usage: python scripts/wide_model.py OUTDIR [--width 4096] [--blocks 4]
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(width, blocks, rng):
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def bn(x, name):
        c = width
        args = [x, init(f"{name}.weight", rng.uniform(0.5, 1.5, c)), init(f"{name}.bias", rng.normal(0, 0.3, c)),
                init(f"{name}.running_mean", rng.normal(0, 0.5, c)), init(f"{name}.running_var", rng.uniform(0.5, 2.0, c))]
        nodes.append(helper.make_node("BatchNormalization", args, [f"{name}.out"], name=name, epsilon=1e-5))
        return f"{name}.out"

    def conv(x, name, k):
        scale = 1.0 / np.sqrt(width * k * k)
        w = init(f"{name}.weight", rng.standard_normal((width, width, k, k), dtype=np.float32) * scale)
        nodes.append(helper.make_node("Conv", [x, w], [f"{name}.out"], name=name, kernel_shape=[k, k],
                                      pads=[k // 2] * 4, strides=[1, 1]))
        return f"{name}.out"

    x = "input"
    for b in range(blocks):
        p = f"stage.{b}"
        dense = bn(conv(x, f"{p}.rbr_dense.conv", 3), f"{p}.rbr_dense.bn")
        point = bn(conv(x, f"{p}.rbr_1x1.conv", 1), f"{p}.rbr_1x1.bn")
        ident = bn(x, f"{p}.rbr_identity")
        nodes.append(helper.make_node("Add", [dense, point], [f"{p}.add0"], name=f"/{p}/Add"))
        nodes.append(helper.make_node("Add", [f"{p}.add0", ident], [f"{p}.add1"], name=f"/{p}/Add_1"))
        nodes.append(helper.make_node("Relu", [f"{p}.add1"], [f"{p}.relu"], name=f"/{p}/Relu"))
        x = f"{p}.relu"
    graph = helper.make_graph(
        nodes, "wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, width, 8, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width, 8, 8])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def timed(cmd):
    r = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True, check=True)
    wall, rss = r.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss) * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--blocks", type=int, default=4)
    args = ap.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    src = os.path.join(args.outdir, "wide.onnx")
    rng = np.random.default_rng(0)
    if not os.path.exists(src):
        model = build(args.width, args.blocks, rng)
        onnx.save(model, src, save_as_external_data=True, location="wide.onnx.data", size_threshold=1024)
    size = os.path.getsize(src) + os.path.getsize(src + ".data")
    print(f"model: {size / 2**30:.2f} GiB ({args.blocks} blocks of {args.width} channels)")
    binary = os.path.join(HERE, "target", "release", "onnx-repvgg")
    out = os.path.join(args.outdir, "wide-deploy.onnx")
    copy = os.path.join(args.outdir, "copy.onnx")
    subprocess.run(["cat", src, src + ".data"], stdout=subprocess.DEVNULL, check=True)
    cp = timed(["sh", "-c", f"cp {src} {copy} && cp {src}.data {copy}.data"])
    t0 = time.time()
    fuse = timed([binary, "fuse", src, out])
    print(f"cp: {cp[0]:.2f} s; fuse: {fuse[0]:.2f} s ({fuse[0] / cp[0]:.2f}× cp), peak RSS {fuse[1] / 2**20:.0f} MiB "
          f"({fuse[1] / size:.3f}× the model)")
    for f in (copy, copy + ".data"):
        os.remove(f)
    fused = onnx.load(out, load_external_data=False)
    offsets = [int(e.value) for t in fused.graph.initializer for e in t.external_data if e.key == "offset"]
    locations = {e.value for t in fused.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"wide-deploy.onnx.data"}, locations
    assert offsets and all(o % 4096 == 0 for o in offsets), "unaligned offsets"
    ops = sorted({n.op_type for n in fused.graph.node})
    assert ops == ["Conv", "Relu"], ops
    x = rng.standard_normal((1, args.width, 8, 8), dtype=np.float32)
    want, got = run(src, x), run(out, x)
    rel = float(np.max(np.abs(want - got)) / np.max(np.abs(want)))
    print(f"fused: {len(fused.graph.node)} nodes, data in {sorted(locations)}, ONNX Runtime relative error {rel:.2e}")
    assert rel < 1e-4
    print(f"ok ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
