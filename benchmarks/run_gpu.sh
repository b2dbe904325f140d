#!/usr/bin/env bash
# One prepared run on a lent GPU machine (its own torch/triton/transformers, no DeepSpeed, no install):
#   bash benchmarks/run_gpu.sh [RESULTS_DIR]      (default benchmarks/results/<gpu name>)
# 1. the GPU kernel tests (bf16 vs fp32 references) and the CPU kernel tests, now on the GPU;
# 2. the MoE-layer benchmark at the GPU targets' presets (docs/kernels.md), the whole-teacher benchmark,
#    the fused-loss benchmark (time and peak memory against whole logits) and KA's batched draws
#    against one all-expert forward (docs/methods/ka.md).
# Each result is a JSON file named after its command; a failed step is recorded and the rest still run.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gpu="$(python -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "-"))')" || exit 1
results="${1:-$repo/benchmarks/results/$gpu}"
mkdir -p "$results"

# The source tree as an importable package: kernels/ds_moekd_kernels/ is installed as ds_moekd.kernels (pyproject
# package-dir), so mirror that mapping with symlinks instead of installing the project.
src="$(mktemp -d)"
mkdir "$src/ds_moekd"
for entry in "$repo"/ds_moekd/*; do ln -s "$entry" "$src/ds_moekd/"; done
ln -s "$repo/kernels/ds_moekd_kernels" "$src/ds_moekd/kernels"
export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
# Without this, `python -m` puts the repo root first on sys.path and its ds_moekd/ (which has no
# kernels/ inside) would win over the linked tree.
export PYTHONSAFEPATH=1 TRITON_DEFAULT_FP_FUSION=1

step() {  # step NAME CMD...: run, keep its output, note failures
  local name="$1"; shift
  echo "== $name: $*"
  if ! "$@" 2>&1 | tee "$results/$name.log"; then echo "$name failed (see $name.log)" | tee -a "$results/FAILED"; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$results/device.csv" 2>&1
if python -c 'import pytest' 2>/dev/null; then
  step tests python -m pytest -q -p no:cacheprovider -o addopts= tests/kernels/test_kernels_gpu.py tests/kernels/test_kernels.py \
    tests/runtime/test_device.py
else
  echo "pytest is not installed here: GPU tests not run" | tee "$results/tests.log"
fi
bench() { step "$1" python -m ds_moekd.cli bench "${@:2}" --json "$results/$1.json"; }
bench moe-layer_llama-moe-3.5b-4of16_all moe-layer --preset llama-moe-3.5b-4of16 --routing all
bench moe-layer_llama-moe-3.5b-2of8_all moe-layer --preset llama-moe-3.5b-2of8 --routing all
bench moe-layer_llama-moe-3.5b-4of16_native moe-layer --preset llama-moe-3.5b-4of16 --routing native
bench moe-layer_qwen3-30b-a3b_native moe-layer --preset qwen3-30b-a3b --routing native
bench moe-layer_llama-moe-3.5b-4of16_ka-M2-1024 moe-layer --preset llama-moe-3.5b-4of16 --routing ka --tokens 1024 --ka-draws 2
bench teacher_llama-moe-3.5b-4of16_all teacher --preset llama-moe-3.5b-4of16 --routing all
bench loss_N4096_V32000 loss --tokens 4096 --hidden 2048 --teacher-hidden 4096 --vocab 32000
bench loss_N4096_V151936 loss --tokens 4096 --hidden 2048 --teacher-hidden 4096 --vocab 151936
bench ka_demo_B64_S256 ka --batch 64 --seq 256 --rounds 5  # KA M=2 batched vs one all-expert forward
python - "$results" <<'PY'
# one summary table of the targets (ratios to the equal-FLOP GEMM; teacher speed-ups)
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    if r.get("benchmark") == "ka":  # variants of one teacher, and their ratios
        rows += [f"{f.stem:45s} {name:26s} {v['ms']:9.3f} ms" for name, v in r["variants"].items()]
        rows.append(f"{f.stem:45s} {'ka_batched / all':26s} {r['ratios']['ka_batched_over_all']:.3f} (target <= 2.1)")
        continue
    for name, m in r["implementations"].items():
        if "ms" not in m:
            rows.append(f"{f.stem:45s} {name:26s} {m['not_measured']}")
            continue
        if "ratio_to_gemm" in m:
            what = f"ratio {m['ratio_to_gemm']:.3f}"
        elif "memory_vs_full_logits" in m:
            what = f"time x{m['time_vs_full_logits']:.2f} memory x{m['memory_vs_full_logits']:.3f} of full logits"
        else:
            what = f"speed-up of ours {m.get('ours_speedup', '-')}"
        rows.append(f"{f.stem:45s} {name:26s} {m['ms']:9.3f} ms {what}")
(pathlib.Path(sys.argv[1]) / "summary.txt").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
rm -rf "$src"
