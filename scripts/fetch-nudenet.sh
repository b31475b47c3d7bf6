#!/usr/bin/env bash
# Puts NudeNet v3's detector, `320n.onnx`, at DIR/320n.onnx (default models/nudenet).
#
# The file ships inside the PyPI wheel `nudenet==3.4.2`. Its licence is AGPL-3.0, so this project
# never carries it: this script fetches the wheel with pip (no dependencies, nothing installed),
# takes the one file out of it and checks its SHA-256.
#   scripts/fetch-nudenet.sh [DIR]
set -euo pipefail
dir="${1:-models/nudenet}"
want=c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f
python="${PYTHON:-python3}"
if [ -f "$dir/320n.onnx" ] && echo "$want  $dir/320n.onnx" | sha256sum --check --status; then
    exit 0
fi
mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --dest "$work" nudenet==3.4.2
"$python" - "$work" "$dir" <<'PY'
import glob, sys, zipfile
work, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{work}/nudenet-3.4.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(f"{dest}/320n.onnx.part", "wb") as out:
    out.write(z.read("nudenet/320n.onnx"))
PY
echo "$want  $dir/320n.onnx.part" | sha256sum --check --status || {
    echo "fetch-nudenet: $dir/320n.onnx.part does not have the expected SHA-256 $want" >&2
    exit 1
}
mv "$dir/320n.onnx.part" "$dir/320n.onnx"
echo "NudeNet's detector (AGPL-3.0) is at $dir/320n.onnx"
