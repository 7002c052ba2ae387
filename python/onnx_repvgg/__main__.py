"""The ``onnx-repvgg`` command (also ``python -m onnx_repvgg``): the Rust binary's command line,
run by the native module: the same code, output and exit codes (0 success, 1 error, 2 usage)."""

import signal
import sys
import threading

from . import _native


def main() -> None:
    """Run the command line on ``sys.argv`` and exit with its code."""
    # What Python printed so far comes before what the command prints (it writes to the file
    # descriptors itself).
    sys.stdout.flush()
    sys.stderr.flush()
    # Ctrl-C stops the command at once, as it stops the binary (the interpreter would only see
    # it after the command returns).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(_native.run_cli(["onnx-repvgg", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
