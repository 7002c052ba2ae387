"""Times `onnx-repvgg fuse` against `cp` and the ONNX tools people use, on the same files.

For each model, every tool runs RUNS times, the tools alternating run by run; the table gives
the median wall time (timed around the process, to the millisecond) and the median peak RSS
(`/usr/bin/time -f %M`), and what the output keeps of the blocks (Conv / BatchNormalization / Add
nodes). Inputs are read once beforehand so every tool starts from the page cache.

Tools: cp (the floor: copying the file, and its .data sidecar), onnx-repvgg (release build, with
and without --no-verify), ONNX Runtime's offline optimizer (ORT_ENABLE_EXTENDED, saved with
optimized_model_filepath), onnxsim and onnxoptimizer (fuse_bn_into_conv and friends).

Models come from `python testdata/generate.py --full DIR --models RepVGG-B3 ...`.

Usage: python scripts/bench.py [--runs N] [--tools a,b] [--settle] MODEL.onnx...
Needs: pip install onnx onnxruntime onnxsim onnxoptimizer (see scripts/requirements-bench.txt).
"""

import argparse
import collections
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent.parent
BINARY = HERE / "target" / "release" / "onnx-repvgg"
PY = sys.executable

SAVE = (
    "import onnx, os\n"
    "def save(m, out, src):\n"
    "    ext = os.path.exists(src + '.data')\n"
    "    onnx.save(m, out, save_as_external_data=ext, location=os.path.basename(out) + '.data')\n"
)


def tools(src, out):
    has_data = os.path.exists(src + ".data")
    return {
        "cp": ["sh", "-c", f"cp {src} {out}" + (f" && cp {src}.data {out}.data" if has_data else "")],
        "onnx-repvgg": [str(BINARY), "fuse", "-q", src, out],
        "onnx-repvgg --no-verify": [str(BINARY), "fuse", "-q", "--no-verify", src, out],
        "onnxruntime offline": [PY, "-c", (
            "import onnxruntime as ort\n"
            "so = ort.SessionOptions()\n"
            "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED\n"
            f"so.optimized_model_filepath = {out!r}\n"
            f"ort.InferenceSession({src!r}, so, providers=['CPUExecutionProvider'])\n")],
        "onnxsim": [PY, "-c", SAVE + (
            "import onnxsim\n"
            f"m, ok = onnxsim.simplify(onnx.load({src!r}))\n"
            f"save(m, {out!r}, {src!r})\n")],
        "onnxoptimizer": [PY, "-c", SAVE + (
            "import onnxoptimizer\n"
            "passes = ['fuse_bn_into_conv', 'fuse_add_bias_into_conv', 'eliminate_identity']\n"
            f"m = onnxoptimizer.optimize(onnx.load({src!r}), passes)\n"
            f"save(m, {out!r}, {src!r})\n")],
    }


def timed(cmd):
    """Wall time (measured here, to the millisecond: /usr/bin/time rounds to 10 ms, too coarse
    for the smaller models) and peak RSS (from /usr/bin/time) of one run."""
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {result.stderr.strip()[-400:]}")
    _, rss = result.stderr.strip().splitlines()[-1].split()
    return wall, int(rss) * 1024


def block_ops(path):
    import onnx
    m = onnx.load(path, load_external_data=False)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    return f"{ops['Conv']}/{ops['BatchNormalization']}/{ops['Add']}"


def size(path):
    return os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tools", help="comma-separated subset")
    ap.add_argument("--settle", action="store_true",
                    help="run `sync` before every timed run, so that no tool pays for the writeback "
                         "of the files written before it")
    args = ap.parse_args()
    print("| model | size | tool | wall (median) | × cp | peak RSS (median) | × size | Conv/BN/Add after |")
    print("|---|---|---|---|---|---|---|---|")
    for src in args.models:
        src = os.path.abspath(src)
        for f in (src, src + ".data"):
            if os.path.exists(f):
                subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(src)) as tmp:
            out = os.path.join(tmp, "out.onnx")
            table = tools(src, out)
            names = args.tools.split(",") if args.tools else list(table)
            samples = {n: [] for n in names}
            after = {}
            for _ in range(args.runs):
                for n in names:
                    if args.settle:
                        subprocess.run(["sync"], check=True)
                    try:
                        samples[n].append(timed(table[n]))
                        after[n] = block_ops(out)
                    except Exception as e:  # noqa: BLE001 - a tool that fails is reported
                        after[n] = f"failed: {e}"[:80]
                    for f in (out, out + ".data"):
                        if os.path.exists(f):
                            os.remove(f)
            floor = statistics.median(w for w, _ in samples["cp"]) if samples.get("cp") else None
            for n in names:
                if not samples[n]:
                    print(f"| {os.path.basename(src)} | | {n} | – | | – | | {after.get(n, '')} |")
                    continue
                wall = statistics.median(w for w, _ in samples[n])
                rss = statistics.median(r for _, r in samples[n])
                ratio = f"{wall / floor:.2f}" if floor else ""
                print(f"| {os.path.basename(src)} | {size(src) / 1e6:.0f} MB | {n} | {wall:.3f} s | {ratio} "
                      f"| {rss / 1e6:.0f} MB | {rss / size(src):.2f} | {after.get(n, '')} |", flush=True)


if __name__ == "__main__":
    main()
