"""Paired, alternating runs of two variants of one fusion: does a mechanism pay?

Runs `BINARY fuse -q MODEL OUT` PAIRS times in each of two environments, A and B, alternating
which goes first from pair to pair, with the input in the page cache and a fresh output each run.
Prints the median wall time of each, the median of the paired differences (B - A) with its
spread (the 25th to 75th percentile of the differences), and how many pairs had B slower: a
mechanism pays only if switching it off makes B slower beyond the run-to-run noise.

This is how the machinery of the writer path was judged (README, *Performance*): a build whose
every mechanism could be switched off by an environment variable (`ONNX_REPVGG_OFF=renice`,
`fallocate`, `mallopt`, `avx2`, `release`; the switches were not kept) ran as A with nothing off
and as B with one mechanism off.

Usage: python scripts/paired.py [--pairs N] [--no-verify] BINARY MODEL.onnx [VAR=VALUE ...]
(the VAR=VALUE assignments make environment B; A is the environment as it is).
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time


def run(cmd, env, out):
    for f in (out, out + ".data"):
        if os.path.exists(f):
            os.remove(f)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binary")
    ap.add_argument("model")
    ap.add_argument("assignments", nargs="*", metavar="VAR=VALUE")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    model = os.path.abspath(args.model)
    for f in (model, model + ".data"):
        if os.path.exists(f):
            subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)
    env_a = dict(os.environ)
    env_b = dict(os.environ)
    for assignment in args.assignments:
        key, value = assignment.split("=", 1)
        env_b[key] = value
    with tempfile.TemporaryDirectory(dir=os.path.dirname(model)) as tmp:
        out = os.path.join(tmp, "out.onnx")
        cmd = [args.binary, "fuse", "-q", *(["--no-verify"] if args.no_verify else []), model, out]
        run(cmd, env_a, out)  # warm up
        a, b = [], []
        for i in range(args.pairs):
            first, second = ((env_a, a), (env_b, b)) if i % 2 == 0 else ((env_b, b), (env_a, a))
            for env, samples in (first, second):
                samples.append(run(cmd, env, out))
    diffs = sorted(y - x for x, y in zip(a, b))
    q = statistics.quantiles(diffs, n=4)
    slower = sum(d > 0 for d in diffs)
    label = " ".join(args.assignments) or "(same)"
    print(
        f"{os.path.basename(model)} {label}: A {statistics.median(a) * 1e3:.1f} ms, "
        f"B {statistics.median(b) * 1e3:.1f} ms, B-A median {statistics.median(diffs) * 1e3:+.1f} ms "
        f"(IQR {q[0] * 1e3:+.1f} .. {q[2] * 1e3:+.1f}), B slower in {slower}/{len(diffs)} pairs",
        flush=True,
    )


if __name__ == "__main__":
    main()
