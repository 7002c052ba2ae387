"""Shared fixtures of the Python package's tests: the repository's committed models, ONNX
Runtime, and the commands to compare (the installed `onnx-repvgg`, `python -m onnx_repvgg`, and
the Rust binary of the same checkout when ONNX_REPVGG_BIN names it)."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "testdata" / "models" / "tiny"
INLINE = TINY / "ts_fold_op17.onnx"
EXTERNAL = TINY / "dynamo_op18.onnx"
TRAINING = TINY / "ts_train_op17.onnx"
# Blocks that cannot fold: AveragePool with count_include_pad=0 (QARepVGGv2).
UNFOLDABLE = ROOT / "testdata" / "families" / "qarepvggv2_nopad" / "ts_fold_op17.onnx"
TINY_BLOCKS = 7
# PyTorch's output against ONNX Runtime's, relative to the output's magnitude (float32).
TOLERANCE = 1e-4


def tensor(path):
    proto = onnx.TensorProto()
    proto.ParseFromString(pathlib.Path(path).read_bytes())
    return numpy_helper.to_array(proto)


def run_model(model):
    """ONNX Runtime's first output on the stored input; `model` is a ModelProto or a path."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: tensor(TINY / "input.pb")}
    return session.run(None, feed)[0]


def assert_matches_pytorch(model):
    """The model gives PyTorch's stored output (the training structure's, by construction)."""
    got = run_model(model)
    want = tensor(TINY / "output.pb")
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= TOLERANCE * scale


def op_counts(model):
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture
def command():
    """The installed console script."""
    path = shutil.which("onnx-repvgg", path=os.path.dirname(sys.executable))
    assert path, "the onnx-repvgg command is not installed beside this Python"
    return [path]


@pytest.fixture
def rust_binary():
    """The Rust binary of the same checkout (CI: target/debug/onnx-repvgg)."""
    path = os.environ.get("ONNX_REPVGG_BIN")
    if not path:
        pytest.skip("ONNX_REPVGG_BIN is not set")
    return [str(pathlib.Path(path).resolve())]


def run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, **kwargs)
