#!/usr/bin/env bash
# Everything one lent GPU session runs, in one command (prepare the wheels first, on a machine
# with a package index: bash benchmarks/gpu_wheels.sh):
#   bash benchmarks/gpu_session.sh RESULTS_DIR [WHEEL_DIR]
# 1. installs the carried wheels (DeepSpeed and what the image lacks) unless DeepSpeed imports;
# 2. benchmarks/run_gpu.sh: kernel tests in bf16, the MoE-layer, teacher, loss and KA benchmarks;
# 3. one-GPU training runs of the demo (world size 1: one GPU cannot hold two NCCL ranks), kd and ka,
#    with the defaults a GPU run gets (bf16 student and teacher, zero3_gpu.json, NCCL);
# 4. a summary of tokens/s and peak memory per run. Set SKIP_BENCH=1 to skip step 2 and STEPS to
#    change the training length (the CPU rehearsal of this script uses both).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
results="$(mkdir -p "$1" && cd "$1" && pwd)"
wheels="${2:-$repo/.whl}"
steps="${STEPS:-200}"
cd "$repo"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29517}"

if ! python3 -c "import deepspeed" 2>/dev/null; then
  echo "== installing $(ls "$wheels"/*.whl | wc -l) carried wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The source tree as the ds_moekd package (kernels/ds_moekd_kernels/ is ds_moekd.kernels, as pyproject maps it).
src="$(mktemp -d)"
mkdir "$src/ds_moekd"
for entry in "$repo"/ds_moekd/*; do ln -s "$entry" "$src/ds_moekd/"; done
ln -s "$repo/kernels/ds_moekd_kernels" "$src/ds_moekd/kernels"
export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
# Without this, `python -m` puts the repo root first on sys.path and its ds_moekd/ (which has no
# kernels/ inside) would win over the linked tree.
export PYTHONSAFEPATH=1
python3 - <<'PY' 2>&1 | tee "$results/environment.txt"
import deepspeed, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))
print("deepspeed", deepspeed.__version__, "accelerator", deepspeed.get_accelerator().device_name())
print("transformers", transformers.__version__)
PY

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 420 bash benchmarks/run_gpu.sh "$results/bench" || echo "run_gpu.sh: rc $?" | tee -a "$results/FAILED"
fi

for method in kd ka; do
  echo "== one-GPU training: $method, $steps steps"
  timeout 300 python3 -m ds_moekd.train --config "ds_configs/methods/$method.yaml" "name=gpu-$method" \
    "output_dir=$results/runs" teacher.ep_size=1 "train.steps=$steps" validation.every=0 \
    report.eval_examples=200 2>&1 | tee "$results/train_$method.log" | grep -v "it/s]$"
  [ "${PIPESTATUS[0]}" = 0 ] || echo "train $method failed" | tee -a "$results/FAILED"
done
python3 - "$results" <<'PY' | tee "$results/training_summary.txt"
import json, pathlib, sys
for run in sorted((pathlib.Path(sys.argv[1]) / "runs").glob("gpu-*")):
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    late = lines[len(lines) // 2:]  # after warm-up and compilation
    tok_s = sum(r["tokens"] for r in late) / sum(r["step_s"] for r in late)
    record = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    scores = record.get("eval", {})
    print(f"{run.name}: {tok_s:,.0f} tokens/s over steps {late[0]['step']}-{late[-1]['step']}, "
          f"peak {max(r['peak_memory_mb'] for r in lines):,.0f} MB, loss {lines[0]['loss']:.3f} -> {lines[-1]['loss']:.3f}, "
          f"strict EM {scores.get('before', {}).get('exact_match', '-')} -> {scores.get('after', {}).get('exact_match', '-')}")
PY
rm -rf "$src"
