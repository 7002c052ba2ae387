"""The `onnx-repvgg` command of the Python package and `python -m onnx_repvgg`: the Rust binary's
command line, run by the native module. Same output and exit codes as the Rust binary of the same
checkout (ONNX_REPVGG_BIN), byte for byte except the time a fusion took."""

import re
import sys

import onnx
import pytest

from conftest import EXTERNAL, INLINE, TINY_BLOCKS, assert_matches_pytorch, run

MODULE = [sys.executable, "-m", "onnx_repvgg"]


def without_times(text):
    text = re.sub(rb'"seconds": [0-9.e-]+', b'"seconds": T', text)
    return re.sub(rb"[0-9.]+ ms", b"T ms", text)


@pytest.mark.parametrize("entry", ["script", "module"])
def test_fuse_writes_the_deploy_model(entry, command, tmp_path):
    argv = command if entry == "script" else MODULE
    out = tmp_path / "deploy.onnx"
    done = run([*argv, "fuse", str(EXTERNAL), str(out)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"fused {TINY_BLOCKS} blocks".encode())
    assert (tmp_path / "deploy.onnx.data").exists()
    assert_matches_pytorch(out)
    assert sum(n.op_type == "Conv" for n in onnx.load(str(out)).graph.node) == TINY_BLOCKS


def test_exit_codes(command, tmp_path):
    assert run([*command, "--version"]).returncode == 0
    assert run([*command, "inspect", str(INLINE)]).returncode == 0
    assert run([*command, "fuse", str(tmp_path / "missing.onnx"), str(tmp_path / "o")]).returncode == 1
    assert run([*command, "fuse"]).returncode == 2
    assert run([*command, "no-such-command"]).returncode == 2


def test_pipes(command, tmp_path):
    data = INLINE.read_bytes()
    done = run([*command, "fuse", "-", "-"], input=data)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"fused {TINY_BLOCKS} blocks".encode())
    assert_matches_pytorch(onnx.load_from_string(done.stdout))


CASES = [
    ["--version"],
    ["--help"],
    ["fuse", "--help"],
    ["inspect", str(INLINE)],
    ["inspect", "--json", "--int8", str(INLINE)],
    ["fuse", "-v", str(INLINE), "{tmp}/a.onnx"],
    ["fuse", "--json", str(EXTERNAL), "{tmp}/b.onnx"],
    ["fuse", "--dry-run", str(INLINE), str(EXTERNAL)],
    ["fuse", str(INLINE), str(INLINE)],
    ["fuse", "{tmp}/missing.onnx", "{tmp}/c.onnx"],
    ["fuse", str(INLINE)],
    ["fuse", "--tolerance", "0", str(INLINE), "{tmp}/d.onnx"],
    ["no-such-command"],
    ["completions", "bash"],
]


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a)[:40])
def test_same_as_the_rust_binary(args, command, rust_binary, tmp_path):
    outputs = []
    for i, argv in enumerate([rust_binary, command, MODULE]):
        folder = tmp_path / str(i)
        folder.mkdir()
        done = run([*argv, *(a.replace("{tmp}", str(folder)) for a in args)])
        outputs.append(
            (
                done.returncode,
                without_times(done.stdout.replace(str(folder).encode(), b"TMP")),
                without_times(done.stderr.replace(str(folder).encode(), b"TMP")),
                sorted(p.name for p in folder.iterdir()),
            )
        )
    assert outputs[1] == outputs[0]
    assert outputs[2] == outputs[0]
