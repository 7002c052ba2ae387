"""The Python API's contract: fuse, fuse_file and inspect on the committed fixtures, checked in
ONNX Runtime; reports equal to the command line's JSON; errors; the input never touched; the
interpreter lock released while a model is folded."""

import hashlib
import importlib.metadata
import json
import pathlib
import random
import re
import sys
import threading
import time
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_repvgg
from conftest import (
    EXTERNAL,
    INLINE,
    ROOT,
    TINY_BLOCKS,
    TRAINING,
    UNFOLDABLE,
    assert_matches_pytorch,
    op_counts,
    run,
)


def digest(*paths):
    return [hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in paths]


def keys(value):
    """The shape of a JSON value: its keys, recursively (block lists by their first item)."""
    if isinstance(value, dict):
        return {k: keys(v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [keys(value[0])]
    return None


def cli_json(argv):
    done = run([sys.executable, "-m", "onnx_repvgg", *argv])
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


# --- version ---------------------------------------------------------------------------------


def test_version_is_the_crates():
    cargo = (ROOT / "Cargo.toml").read_text()
    crate = re.search(r'^version = "([^"]+)"', cargo, re.M).group(1)
    assert onnx_repvgg.__version__ == crate
    assert importlib.metadata.version("onnx-repvgg") == crate
    printed = run([sys.executable, "-m", "onnx_repvgg", "--version"]).stdout.decode()
    assert printed.split()[:2] == ["onnx-repvgg", crate]


def test_onnx_is_not_a_hard_dependency():
    requires = importlib.metadata.requires("onnx-repvgg") or []
    assert all("extra ==" in r for r in requires), requires
    # Without onnx importable, bytes still work and anything else is refused with Error.
    script = f"""
import sys
sys.modules["onnx"] = None
import onnx_repvgg
data = open({str(INLINE)!r}, "rb").read()
deploy, report = onnx_repvgg.fuse(data)
assert isinstance(deploy, bytes) and report["summary"]["fused"] == {TINY_BLOCKS}
assert onnx_repvgg.inspect(data)["summary"]["blocks"] == {TINY_BLOCKS}
try:
    onnx_repvgg.fuse(object())
except onnx_repvgg.Error:
    print("ok")
"""
    done = run([sys.executable, "-c", script])
    assert done.stdout.decode().strip() == "ok", done.stderr.decode()


# --- fuse --------------------------------------------------------------------------------------


def test_fuse_bytes_computes_the_same_outputs():
    data = INLINE.read_bytes()
    deploy, report = onnx_repvgg.fuse(data)
    assert isinstance(deploy, bytes)
    assert data == INLINE.read_bytes()
    summary = report["summary"]
    assert summary["fused"] == TINY_BLOCKS and summary["skipped"] == 0
    assert [b["name"] for b in report["fused"]][0] == "stage0"
    model = onnx.load_from_string(deploy)
    onnx.checker.check_model(model, full_check=True)
    assert op_counts(model).get("BatchNormalization", 0) == 0
    assert op_counts(model)["Conv"] == TINY_BLOCKS
    assert_matches_pytorch(model)


def test_fuse_model_proto_round_trip_leaves_the_input_alone():
    model = onnx.load(str(INLINE))
    before = model.SerializeToString()
    deploy, report = onnx_repvgg.fuse(model)
    assert isinstance(deploy, onnx.ModelProto) and deploy is not model
    assert model.SerializeToString() == before
    assert report["summary"]["fused"] == TINY_BLOCKS
    assert_matches_pytorch(model)
    assert_matches_pytorch(deploy)
    # The same bytes as fusing the file's bytes.
    assert deploy.SerializeToString() == onnx_repvgg.fuse(INLINE.read_bytes())[0]


def test_fuse_bytearray_gives_a_bytearray():
    deploy, _ = onnx_repvgg.fuse(bytearray(INLINE.read_bytes()))
    assert isinstance(deploy, bytearray)


def test_fuse_model_proto_with_external_data_loaded():
    model = onnx.load(str(EXTERNAL))  # reads dynamo_op18.onnx.data into the tensors
    deploy, report = onnx_repvgg.fuse(model)
    assert report["summary"]["fused"] == TINY_BLOCKS
    assert_matches_pytorch(deploy)


def test_fuse_model_proto_with_external_references_is_refused():
    model = onnx.load(str(EXTERNAL), load_external_data=False)
    with pytest.raises(onnx_repvgg.Error, match="external data"):
        onnx_repvgg.fuse(model)


def test_fuse_report_has_the_cli_schema(tmp_path):
    _, report = onnx_repvgg.fuse(INLINE.read_bytes())
    cli = cli_json(["fuse", "--json", str(INLINE), str(tmp_path / "out.onnx")])
    assert keys(report) == keys(cli)
    assert report["input"] == report["output"] == "<memory>"
    assert report["dry_run"] is False
    for ours, theirs in zip(report["fused"], cli["fused"]):
        assert ours == theirs


def test_fuse_options():
    _, report = onnx_repvgg.fuse(INLINE.read_bytes(), verify=False)
    assert report["summary"]["worst"] is None
    assert all(b["deviation"] is None for b in report["fused"])
    with pytest.raises(onnx_repvgg.Error, match="failed verification"):
        onnx_repvgg.fuse(INLINE.read_bytes(), tolerance=1e-30)
    for bad in (0, -1.0, float("nan"), float("inf"), "1e-5", True):
        with pytest.raises(onnx_repvgg.Error, match="tolerance"):
            onnx_repvgg.fuse(INLINE.read_bytes(), tolerance=bad)
    _, report = onnx_repvgg.fuse(INLINE.read_bytes(), tolerance=1e-3, strict=True)
    assert report["summary"]["fused"] == TINY_BLOCKS


def test_training_mode_is_an_error_unless_allowed(tmp_path):
    data = TRAINING.read_bytes()
    with pytest.raises(onnx_repvgg.Error, match="training mode"):
        onnx_repvgg.fuse(data)
    out = tmp_path / "out.onnx"
    with pytest.raises(onnx_repvgg.Error, match="training mode"):
        onnx_repvgg.fuse_file(TRAINING, out)
    assert not out.exists()
    with pytest.warns(UserWarning, match="training mode"):
        _, report = onnx_repvgg.fuse(data, allow_training=True)
    assert report["summary"]["fused"] == TINY_BLOCKS
    assert report["summary"]["training_bn_folded"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        onnx_repvgg.fuse(INLINE.read_bytes())


def test_strict_fails_when_a_candidate_is_not_fused(tmp_path):
    # QARepVGGv2 with count_include_pad=0: its blocks cannot fold (not a convolution at the
    # borders); without strict they are reported as skipped, with it nothing is written.
    data = UNFOLDABLE.read_bytes()
    deploy, report = onnx_repvgg.fuse(data)
    assert report["summary"]["skipped"] > 0
    assert all("count_include_pad" in b["reason"] for b in report["skipped"])
    with pytest.raises(onnx_repvgg.Error, match="strict"):
        onnx_repvgg.fuse(data, strict=True)
    out = tmp_path / "out.onnx"
    with pytest.raises(onnx_repvgg.Error, match="strict"):
        onnx_repvgg.fuse_file(UNFOLDABLE, out, strict=True)
    assert not out.exists()


# --- fuse_file ---------------------------------------------------------------------------------


def test_fuse_file_with_external_data(tmp_path):
    data = pathlib.Path(str(EXTERNAL) + ".data")
    before = digest(EXTERNAL, data)
    out = tmp_path / "deploy.onnx"
    report = onnx_repvgg.fuse_file(EXTERNAL, out)  # os.PathLike
    assert digest(EXTERNAL, data) == before
    assert report["summary"]["fused"] == TINY_BLOCKS
    assert report["input"] == str(EXTERNAL) and report["output"] == str(out)
    assert (tmp_path / "deploy.onnx.data").exists()
    model = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    assert op_counts(model)["Conv"] == TINY_BLOCKS
    assert_matches_pytorch(out)
    # And through a ModelProto: onnx.load reads the fused model's own external data.
    again, second = onnx_repvgg.fuse(model)
    assert second["summary"]["fused"] == 0
    assert_matches_pytorch(again)


def test_fuse_file_report_equals_the_cli(tmp_path):
    ours = onnx_repvgg.fuse_file(str(INLINE), str(tmp_path / "a.onnx"))
    cli = cli_json(["fuse", "--json", str(INLINE), str(tmp_path / "b.onnx")])
    assert keys(ours) == keys(cli)
    for report in (ours, cli):
        report["summary"].pop("seconds")
        report.pop("output")
    assert ours == cli
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_fuse_file_path_safety(tmp_path):
    copy = tmp_path / "train.onnx"
    copy.write_bytes(INLINE.read_bytes())
    before = digest(copy)
    with pytest.raises(onnx_repvgg.Error) as error:
        onnx_repvgg.fuse_file(copy, copy)
    assert digest(copy) == before
    cli = run([sys.executable, "-m", "onnx_repvgg", "fuse", str(copy), str(copy)])
    assert cli.returncode == 1
    assert cli.stderr.decode().strip() == f"onnx-repvgg: {error.value}"
    # Never over the input's external data either.
    data = pathlib.Path(str(EXTERNAL) + ".data")
    before = digest(data)
    with pytest.raises(onnx_repvgg.Error):
        onnx_repvgg.fuse_file(EXTERNAL, data)
    assert digest(data) == before


def test_fuse_file_failure_writes_nothing(tmp_path):
    out = tmp_path / "out.onnx"
    with pytest.raises(onnx_repvgg.Error, match="failed verification"):
        onnx_repvgg.fuse_file(INLINE, out, tolerance=1e-30)
    assert list(tmp_path.iterdir()) == []


def test_fuse_file_rejects_what_is_not_a_path(tmp_path):
    with pytest.raises(onnx_repvgg.Error, match="input"):
        onnx_repvgg.fuse_file(INLINE.read_bytes(), tmp_path / "out.onnx")
    with pytest.raises(onnx_repvgg.Error, match="output"):
        onnx_repvgg.fuse_file(INLINE, None)


# --- inspect -----------------------------------------------------------------------------------


def test_inspect_path_bytes_and_model_proto_agree_with_the_cli():
    cli = cli_json(["inspect", "--json", str(INLINE)])
    assert onnx_repvgg.inspect(str(INLINE)) == cli
    assert onnx_repvgg.inspect(INLINE) == cli
    assert onnx_repvgg.inspect(INLINE.read_bytes()) == cli
    assert onnx_repvgg.inspect(onnx.load(str(INLINE))) == cli
    assert cli["summary"]["blocks"] == TINY_BLOCKS
    assert onnx_repvgg.inspect(EXTERNAL)["summary"]["fusable"] == TINY_BLOCKS


def test_inspect_options():
    cli = cli_json(["inspect", "--json", "--int8", "--input-size", "64x48", str(INLINE)])
    for size in ("64x48", (64, 48), [64, 48]):
        assert onnx_repvgg.inspect(INLINE, int8=True, input_size=size) == cli
    assert cli["blocks"][0]["int8"] is not None
    square = onnx_repvgg.inspect(INLINE, input_size=64)
    assert square["summary"]["input_shape"] == [1, 3, 64, 64]
    for bad in (0, -3, "64x", "axb", "²", (64, 0), [], True, 2.5, 2**64, ""):
        with pytest.raises(onnx_repvgg.Error, match="input_size"):
            onnx_repvgg.inspect(INLINE, input_size=bad)


# --- errors ------------------------------------------------------------------------------------


def test_errors_are_the_cli_line(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 100)
    cli = run([sys.executable, "-m", "onnx_repvgg", "fuse", str(garbage), str(tmp_path / "o")])
    assert cli.returncode == 1
    with pytest.raises(onnx_repvgg.Error) as error:
        onnx_repvgg.fuse_file(garbage, tmp_path / "o")
    assert cli.stderr.decode().strip() == f"onnx-repvgg: {error.value}"
    assert "\n" not in str(error.value)
    with pytest.raises(onnx_repvgg.Error, match="No such file"):
        onnx_repvgg.inspect(tmp_path / "missing.onnx")
    with pytest.raises(onnx_repvgg.Error, match="not a valid ONNX model"):
        onnx_repvgg.fuse(b"\xff" * 100)
    with pytest.raises(onnx_repvgg.Error, match="expected an onnx.ModelProto"):
        onnx_repvgg.fuse("train.onnx")
    assert issubclass(onnx_repvgg.Error, Exception)
    assert onnx_repvgg.Error.__module__ == "onnx_repvgg"


def test_a_panic_becomes_error():
    with pytest.raises(onnx_repvgg.Error, match="internal error.*boom"):
        onnx_repvgg._native._panic_for_tests("boom")


def test_mangled_models_raise_error_only():
    """Truncated, bit-flipped and random inputs: Error or a result, never anything else."""
    data = INLINE.read_bytes()
    rng = random.Random(16)
    inputs = [b"", b"\x00", bytes(rng.randrange(256) for _ in range(4096))]
    inputs += [data[: rng.randrange(len(data))] for _ in range(20)]
    for _ in range(20):
        mangled = bytearray(data)
        for _ in range(8):
            mangled[rng.randrange(len(mangled))] ^= 1 << rng.randrange(8)
        inputs.append(bytes(mangled))
    for bad in inputs:
        for call in (onnx_repvgg.fuse, onnx_repvgg.inspect):
            try:
                call(bad)
            except onnx_repvgg.Error as error:
                assert str(error) and "internal error" not in str(error)


# --- the interpreter lock ----------------------------------------------------------------------


def wide_model(channels=256, blocks=6, size=16):
    """A RepVGG-like training model big enough to take a while: TorchScript's folded form
    (Conv3x3 and Conv1x1 with bias, BatchNormalization(x), two Adds, Relu) per block."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []

    def constant(name, *shape, scale=0.05, offset=0.0):
        values = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
        weights.append(numpy_helper.from_array(values, name))
        return name

    x = "x"
    for b in range(blocks):
        p = f"b{b}"
        c3 = constant(f"{p}.w3", channels, channels, 3, 3)
        c1 = constant(f"{p}.w1", channels, channels, 1, 1)
        nodes += [
            helper.make_node("Conv", [x, c3, constant(f"{p}.b3", channels)], [f"{p}.c3"],
                             pads=[1, 1, 1, 1]),
            helper.make_node("Conv", [x, c1, constant(f"{p}.b1", channels)], [f"{p}.c1"]),
            helper.make_node(
                "BatchNormalization",
                [x, constant(f"{p}.g", channels, offset=1.0), constant(f"{p}.be", channels),
                 constant(f"{p}.m", channels), constant(f"{p}.v", channels, offset=1.0)],
                [f"{p}.bn"],
            ),
            helper.make_node("Add", [f"{p}.c3", f"{p}.c1"], [f"{p}.s"]),
            helper.make_node("Add", [f"{p}.s", f"{p}.bn"], [f"{p}.t"]),
            helper.make_node("Relu", [f"{p}.t"], [f"{p}.y"]),
        ]
        x = f"{p}.y"
    shape = [1, channels, size, size]
    graph = helper.make_graph(
        nodes, "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    model = wide_model()
    path = tmp_path_factory.mktemp("wide") / "wide.onnx"
    onnx.save(model, str(path))
    return path


def python_runs_during(work):
    """Runs `work` on a thread while this thread counts its own loop iterations; returns how
    many fell inside `work`'s run, and how long it ran. Forced switches are off meanwhile, so a
    thread gives the lock up only by releasing it: while `work` holds it (a native call that
    does not release it), this thread cannot run at all."""
    stamps, span = [], []

    def worker():
        start = time.perf_counter()
        work()
        span.extend([start, time.perf_counter()])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(60)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        while thread.is_alive():
            stamps.append(time.perf_counter())
            time.sleep(0)  # releases the lock for a moment
    finally:
        sys.setswitchinterval(interval)
    thread.join()
    start, end = span
    return sum(start < t < end for t in stamps), end - start


@pytest.mark.parametrize("call", ["fuse", "fuse_file", "inspect"])
def test_the_lock_is_released_while_folding(call, wide, tmp_path):
    data = wide.read_bytes()
    works = {
        "fuse": lambda: onnx_repvgg.fuse(data),
        "fuse_file": lambda: onnx_repvgg.fuse_file(wide, tmp_path / "out.onnx"),
        "inspect": lambda: onnx_repvgg.inspect(data, int8=True),
    }
    # The folding threads may keep both cores of a busy machine to themselves for a while:
    # a few tries.
    for _ in range(5):
        inside, seconds = python_runs_during(works[call])
        if inside > 0:
            break
    assert inside > 0, f"no Python ran during {seconds:.3f} s of {call}"


def test_the_lock_is_held_without_release():
    """The check above can fail: a native call that keeps the lock lets no Python run."""
    blocker = threading.Event()
    # time.sleep releases the lock: a control that the probe sees Python running.
    inside, _ = python_runs_during(lambda: blocker.wait(0.2))
    assert inside > 0
    # sorted() of a big list holds the lock throughout.
    numbers = [random.random() for _ in range(300_000)]
    inside, _ = python_runs_during(lambda: sorted(numbers))
    assert inside == 0


def test_two_threads_fuse_at_once(wide):
    data = wide.read_bytes()
    results = [None, None]

    def work(i):
        results[i] = onnx_repvgg.fuse(data)[1]["summary"]["fused"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [6, 6]
