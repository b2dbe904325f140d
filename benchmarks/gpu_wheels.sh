#!/usr/bin/env bash
# Prepare, on a machine with a package index, the wheels a GPU machine without one needs to train:
#   bash benchmarks/gpu_wheels.sh [DIR]        (default .whl, which git ignores)
# The GPU image (benchmarks/gpu_image_packages.txt: Python 3.12, torch, triton, numpy, ...) lacks
# DeepSpeed and a few pure-Python packages; this downloads them for CPython 3.12 on x86-64 Linux
# (DeepSpeed and rouge-score publish source only: built here into pure-Python wheels, no ops
# compiled), at the versions of launcher/constraints.txt, and then checks that every
# requirement of every carried wheel is carried or in the image. Install there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
# (benchmarks/gpu_session.sh does).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/.whl}"
python="${PYTHON:-$repo/.venv/bin/python}"
mkdir -p "$out"
rm -f "$out"/*.whl

# The versions the suite passes with: launcher/constraints.txt (names compared as pip does).
lock="$repo/launcher/constraints.txt"
version() {
  local v
  v="$("$python" - "$lock" "$1" <<'PY'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
for line in open(sys.argv[1]):
    name, _, ver = line.strip().partition("==")
    if ver and norm(name) == norm(sys.argv[2]):
        print(ver)
PY
)"
  [ -n "$v" ] || { echo "gpu_wheels: $1 is not in $lock" >&2; exit 1; }
  echo "$v"
}
binary=(
  "transformers==$(version transformers)" "huggingface_hub==$(version huggingface_hub)"
  "tokenizers==$(version tokenizers)" "safetensors==$(version safetensors)"
  "pydantic==$(version pydantic)" "pydantic_core==$(version pydantic_core)"
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
  "typing_extensions==$(version typing_extensions)"
  "hjson==$(version hjson)" "nltk==$(version nltk)" "defusedxml==$(version defusedxml)"
  "httpx2==$(version httpx2)" "httpcore2==$(version httpcore2)" "truststore==$(version truststore)"
  "kernels==$(version kernels)" "tomlkit==$(version tomlkit)"  # transformers 5.25 imports kernels
)
platforms=()
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
echo "gpu_wheels: downloading ${#binary[@]} wheels for CPython 3.12" >&2
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$out" "${binary[@]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
echo "gpu_wheels: building DeepSpeed and rouge-score wheels (pure Python, no ops)" >&2
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" \
  "deepspeed==$(version deepspeed)" "rouge-score==$(version rouge-score)" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$python" "$repo/benchmarks/gpu_wheels_check.py" "$out" "$repo/benchmarks/gpu_image_packages.txt"
du -sh "$out" >&2
