"""Type information ships with the package, and the native module's stub says what it has."""

import ast
import inspect
import pathlib

import onnx_repvgg
from onnx_repvgg import _native

PACKAGE = pathlib.Path(onnx_repvgg.__file__).parent


def test_typed_package():
    assert (PACKAGE / "py.typed").exists()
    assert (PACKAGE / "_native.pyi").exists()


def test_the_stub_matches_the_native_module():
    stub = ast.parse((PACKAGE / "_native.pyi").read_text())
    functions = {f.name: f for f in stub.body if isinstance(f, ast.FunctionDef)}
    native = {
        name
        for name, value in vars(_native).items()
        if callable(value) and not isinstance(value, type)
    }
    assert set(functions) == native
    for name, function in functions.items():
        assert ast.get_docstring(function), f"{name} has no docstring in the stub"
        args = function.args
        stubbed = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        assert stubbed == list(inspect.signature(getattr(_native, name)).parameters), name
    classes = {c.name for c in stub.body if isinstance(c, ast.ClassDef)}
    assert classes == {"Error"}


def test_the_public_functions_are_documented():
    for name in onnx_repvgg.__all__:
        assert getattr(onnx_repvgg, name) is not None
    for function in (onnx_repvgg.fuse, onnx_repvgg.fuse_file, onnx_repvgg.inspect):
        assert function.__doc__ and function.__annotations__
