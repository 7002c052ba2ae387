#!/usr/bin/env sh
# Seeds the fuzz corpora with the fixture models (run from anywhere; corpora are not committed).
#   fuse_bytes:      every .onnx under testdata/ (models, families) and the regression inputs
#   fuse_structured: the regression inputs of testdata/fuzz/structured/ (raw `arbitrary` bytes)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
bytes="$root/fuzz/corpus/fuse_bytes"
structured="$root/fuzz/corpus/fuse_structured"
mkdir -p "$bytes" "$structured"
n=0
for f in $(find "$root/testdata" -name '*.onnx' -not -path '*/fuzz/*' | sort); do
    # Flatten the path into a file name: tiny/ts_fold_op17.onnx -> tiny__ts_fold_op17.onnx
    name=$(printf '%s' "${f#"$root"/testdata/}" | tr '/' '_')
    cp "$f" "$bytes/$name"
    n=$((n + 1))
done
if [ -d "$root/testdata/fuzz" ]; then
    for f in "$root"/testdata/fuzz/*.onnx; do
        [ -e "$f" ] && cp "$f" "$bytes/" && n=$((n + 1))
    done
    for f in "$root"/testdata/fuzz/structured/*; do
        [ -e "$f" ] && cp "$f" "$structured/"
    done
fi
echo "seeded $n files into $bytes"
