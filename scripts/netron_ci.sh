#!/usr/bin/env bash
# Netron check: fuse the sample training-structure model and make sure real
# Netron (netron PyPI package, headless Debian Chromium) draws the training
# model with 14 Conv nodes and the fused model with 7, with no error dialog.
#
# Usage: bash scripts/netron_ci.sh      (from anywhere; needs root for apt-get
#        when chromium or the font is missing)
# Env:   ONNX_REPVGG   fuser binary (default: target/release, else target/debug)
#        NETRON_VENV   venv to create/use (default ${TMPDIR:-/tmp}/onnx-repvgg-netron-venv)
#        NETRON_OUT    where fused model and screenshots go (default target/netron)
set -euo pipefail
cd "$(dirname "$0")/.."

model=testdata/models/tiny/ts_fold_op17.onnx
venv="${NETRON_VENV:-${TMPDIR:-/tmp}/onnx-repvgg-netron-venv}"
out="${NETRON_OUT:-target/netron}"

# System packages: the browser, and a font with U+3008/U+3009 (Netron draws
# tensor shapes as 〈16×8×3×3〉; without it the brackets are empty boxes).
pkgs=()
[ -x /usr/bin/chromium ] || pkgs+=(chromium)
dpkg -s fonts-ipafont-gothic >/dev/null 2>&1 || pkgs+=(fonts-ipafont-gothic)
if [ ${#pkgs[@]} -gt 0 ]; then
    echo "== apt-get install ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

if [ -z "${ONNX_REPVGG:-}" ]; then
    for b in target/release/onnx-repvgg target/debug/onnx-repvgg; do
        if [ -x "$b" ]; then ONNX_REPVGG=$b; break; fi
    done
fi
if [ -z "${ONNX_REPVGG:-}" ] || [ ! -x "$ONNX_REPVGG" ]; then
    echo "netron_ci.sh: no onnx-repvgg binary under target/ (run cargo build --release first)" >&2
    exit 2
fi

echo "== netron venv ($venv)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-netron.txt

mkdir -p "$out"
fused="$out/$(basename "$model" .onnx).fused.onnx"
echo "== fuse $model with $ONNX_REPVGG"
"$ONNX_REPVGG" fuse "$model" "$fused"

passed=0
failed=0
check() { # MODEL EXPECTED_CONV PNG
    echo "== netron: $1 (expect $2 Conv)"
    if "$venv/bin/python" scripts/netron_shot.py "$1" --expect-conv "$2" --out "$3"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
    fi
}
check "$model" 14 "$out/netron-training.png"
check "$fused" 7 "$out/netron-deploy.png"

echo "netron: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
