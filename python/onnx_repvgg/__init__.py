"""Fold RepVGG-style multi-branch blocks of an ONNX model into single convolutions.

Every RepVGG-style block of a *training-structure* model (parallel Conv+BatchNormalization
branches and an identity, summed by Add) becomes one Conv with bias; every fused block is checked
numerically against the original before anything is returned or written::

    import onnx, onnx_repvgg

    deploy, report = onnx_repvgg.fuse(onnx.load("train.onnx"))
    onnx.save(deploy, "deploy.onnx")

The work is done by the same Rust library as the ``onnx-repvgg`` command (installed with this
package; ``python -m onnx_repvgg`` runs it too). Reports are the command's ``--json`` objects as
dicts. Every failure raises :class:`Error` with the command's one-line message; the input is
never modified. The interpreter lock is released while a model is folded.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union, overload

from . import _native
from ._native import Error, __version__

if TYPE_CHECKING:
    from onnx import ModelProto

__all__ = ["Error", "__version__", "fuse", "fuse_file", "inspect"]

Report = Dict[str, Any]
"""A report: the object that ``onnx-repvgg fuse --json`` or ``inspect --json`` prints."""

PathLike = Union[str, "os.PathLike[str]"]


@overload
def fuse(
    model: bytes,
    *,
    verify: bool = ...,
    allow_training: bool = ...,
    tolerance: Optional[float] = ...,
    strict: bool = ...,
) -> Tuple[bytes, Report]: ...


@overload
def fuse(
    model: bytearray,
    *,
    verify: bool = ...,
    allow_training: bool = ...,
    tolerance: Optional[float] = ...,
    strict: bool = ...,
) -> Tuple[bytearray, Report]: ...


@overload
def fuse(
    model: ModelProto,
    *,
    verify: bool = ...,
    allow_training: bool = ...,
    tolerance: Optional[float] = ...,
    strict: bool = ...,
) -> Tuple[ModelProto, Report]: ...


def fuse(
    model: Any,
    *,
    verify: bool = True,
    allow_training: bool = False,
    tolerance: Optional[float] = None,
    strict: bool = False,
) -> Tuple[Any, Report]:
    """Fold every block of ``model``; return ``(deploy, report)``.

    ``model`` is an ``onnx.ModelProto`` or the serialized model as ``bytes`` (or ``bytearray``);
    ``deploy`` has the same type (a new object: ``model`` is not modified). The model must hold
    all its tensors: load it with ``onnx.load`` (which reads external data), or use
    :func:`fuse_file` for models with external data or over 2 GiB.

    ``report`` is the object ``onnx-repvgg fuse --json`` prints: ``summary``, ``fused``,
    ``folds`` (linear folds), ``bn_left`` (BatchNormalization nodes left, with the reason),
    ``skipped``, and ``input``/``output`` (both ``"<memory>"``) and ``dry_run`` (False).

    - ``verify``: check every fused block against its original subgraph (``--no-verify``).
    - ``allow_training``: fold BatchNormalization exported in training mode with its running
      statistics, with a :class:`UserWarning` (``--allow-training``); otherwise such a block is
      an :class:`Error` naming it, and nothing is written.
    - ``tolerance``: the largest accepted relative deviation (``--tolerance``); by default it
      depends on the weights' type.
    - ``strict``: raise :class:`Error` when any candidate block is not fused.

    Raises :class:`Error` on any failure.
    """
    data, kind = _serialize(model)
    deploy, text = _native.fuse_bytes(
        data, **_fuse_options(verify, allow_training, tolerance, strict)
    )
    report = _report(text)
    return _deserialize(deploy, kind), report


def fuse_file(
    input: PathLike,
    output: PathLike,
    *,
    verify: bool = True,
    allow_training: bool = False,
    tolerance: Optional[float] = None,
    strict: bool = False,
) -> Report:
    """Fold every block of the model at ``input`` and write it to ``output``, as
    ``onnx-repvgg fuse --json INPUT OUTPUT`` does; return the report.

    Paths are ``str`` or ``os.PathLike``. External data is read from beside ``input`` and written
    to ``OUTPUT.data`` (also when the output would pass 2 GiB); the output appears whole or not at
    all, never over the input or its data. The options are those of :func:`fuse`.

    Raises :class:`Error` on any failure; nothing is written then.
    """
    text = _native.fuse_path(
        _path(input, "input"),
        _path(output, "output"),
        **_fuse_options(verify, allow_training, tolerance, strict),
    )
    return _report(text)


def inspect(
    model: Union[PathLike, bytes, bytearray, ModelProto],
    *,
    int8: bool = False,
    input_size: Union[None, int, str, Sequence[int]] = None,
) -> Report:
    """Find every block of ``model`` and tell whether (and why not) each can be folded, with its
    parameters and FLOPs before and after, as ``onnx-repvgg inspect --json`` does.

    ``model`` is a path (``str`` or ``os.PathLike``), the serialized model as ``bytes``, or an
    ``onnx.ModelProto``. ``int8``: fold every block (writing nothing) and add INT8 statistics of
    each fused kernel. ``input_size``: the spatial size FLOPs are counted at, ``224``,
    ``(320, 256)`` or ``"320x256"`` (by default the model's declared size, or 224 where it is
    symbolic).

    Returns ``{"summary": {...}, "blocks": [...], "folds": [...], "bn_left": [...]}``. Raises
    :class:`Error` on any failure.
    """
    size = _input_size(input_size)
    if isinstance(model, (str, os.PathLike)):
        text = _native.inspect_path(_path(model, "model"), int8=bool(int8), input_size=size)
    else:
        data, _ = _serialize(model)
        text = _native.inspect_bytes(data, int8=bool(int8), input_size=size)
    return _report(text)


def _serialize(model: Any) -> Tuple[bytes, Optional[type]]:
    """The model's bytes, and the type to give the deploy model (None: bytes)."""
    if isinstance(model, bytes):
        return model, None
    if isinstance(model, bytearray):
        return bytes(model), bytearray
    # A ModelProto's class comes from the onnx package, so it is imported already if `model` is
    # one: this never imports onnx itself.
    onnx = sys.modules.get("onnx")
    if onnx is not None and isinstance(model, onnx.ModelProto):
        try:
            return model.SerializeToString(), type(model)
        except Exception as e:  # protobuf refuses messages over 2 GiB
            raise Error(
                f"<memory>: cannot serialize the ModelProto ({e}): save it with external data "
                "and use fuse_file"
            ) from None
    raise Error(
        f"expected an onnx.ModelProto or the model as bytes, not {type(model).__name__}"
    )


def _deserialize(deploy: bytes, kind: Optional[type]) -> Any:
    if kind is None:
        return deploy
    if kind is bytearray:
        return bytearray(deploy)
    proto = kind()
    proto.ParseFromString(deploy)
    return proto


def _path(path: Any, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise Error(f"{what}: expected a path (str or os.PathLike), not {type(path).__name__}")
    return os.fsdecode(path)


def _fuse_options(
    verify: Any, allow_training: Any, tolerance: Any, strict: Any
) -> Dict[str, Any]:
    if tolerance is not None:
        valid = isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool)
        if not valid or not (math.isfinite(tolerance) and tolerance > 0):
            raise Error(f"tolerance: '{tolerance}' is not a positive number")
        tolerance = float(tolerance)
    return {
        "verify": bool(verify),
        "allow_training": bool(allow_training),
        "tolerance": tolerance,
        "strict": bool(strict),
    }


def _input_size(size: Any) -> Optional[List[int]]:
    """``224``, ``"320x256"`` or ``(320, 256)`` as a list of positive sizes."""
    if size is None:
        return None
    parts: List[Any]
    if isinstance(size, str):
        parts = [int(p) if p.strip().isdecimal() else None for p in size.split("x")]
    elif isinstance(size, int):
        parts = [size]
    else:
        try:
            parts = list(size)
        except TypeError:
            parts = [None]
    valid = [isinstance(p, int) and not isinstance(p, bool) and 0 < p < 2**64 for p in parts]
    if not parts or not all(valid):
        raise Error(f"input_size: '{size}' is not a size like 224 or 320x256")
    return [int(p) for p in parts]


def _report(text: str) -> Report:
    report: Report = json.loads(text)
    folded = report.get("summary", {}).get("training_bn_folded", 0)
    if folded:
        # The command line's warning, word for word.
        warnings.warn(
            f"{report['input']}: folded {folded} BatchNormalization nodes exported in training "
            "mode with their running statistics (the export's own forward pass updated them); "
            "re-exporting after model.eval() is safer",
            UserWarning,
            stacklevel=3,
        )
    return report
