"""Type stub of the native module ``onnx_repvgg._native`` (``src/python.rs``): thin bindings
over the Rust library. Use the functions of ``onnx_repvgg`` instead: they accept ModelProtos and
paths, check their arguments and return the reports as dicts."""

from typing import List, Optional, Sequence, Tuple

__version__: str
"""The crate's version, as ``onnx-repvgg --version`` prints it (without the commit)."""

class Error(Exception):
    """A model could not be read, folded, verified or written; the message is the command
    line's one line (without the ``onnx-repvgg:`` prefix). Also raised for a bug in the native
    code (a Rust panic), which never crosses into Python otherwise."""

def fuse_bytes(
    model: bytes,
    *,
    verify: bool,
    allow_training: bool,
    tolerance: Optional[float],
    strict: bool,
) -> Tuple[bytes, str]:
    """Fuse a serialized model: the deploy model's bytes and ``fuse --json``'s object as JSON
    text. The interpreter lock is released meanwhile."""

def fuse_path(
    input: str,
    output: str,
    *,
    verify: bool,
    allow_training: bool,
    tolerance: Optional[float],
    strict: bool,
) -> str:
    """Fuse the model at ``input`` into ``output`` as ``onnx-repvgg fuse`` does; ``fuse --json``'s
    object as JSON text. The interpreter lock is released meanwhile."""

def inspect_path(path: str, *, int8: bool, input_size: Optional[Sequence[int]]) -> str:
    """``inspect --json``'s object of the model at ``path``, as JSON text."""

def inspect_bytes(model: bytes, *, int8: bool, input_size: Optional[Sequence[int]]) -> str:
    """``inspect --json``'s object of a serialized model, as JSON text."""

def run_cli(argv: List[str]) -> int:
    """Run the command line (``argv[0]`` is the program's name) exactly as the binary does, with
    the interpreter lock released; return the exit code (0 success, 1 error, 2 usage; 101 for a
    bug, whose message is printed)."""

def _panic_for_tests(message: str) -> None:
    """Panic inside the native boundary: raises :class:`Error` (for the tests)."""
