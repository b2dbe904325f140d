"""`ds-moekd bench loss`: one micro-batch of the KD loss, full logits against the fused lm_head head.

Every implementation computes ce_weight·CE + kl_weight·KL(p‖q) at N response tokens, forward and
backward, from the same inputs: student final hidden states `[N, H]` and lm_head `[V, H]` (both
with gradients), teacher final hidden states `[N, H_t]` and lm_head `[V, H_t]` (no gradients). The
teacher's logits are formed inside the timed call too, as a training step forms them.

  full_logits_torch  student and teacher `[N, V]` logits whole; F.cross_entropy + KL in plain torch
                     (a plain training loop)
  ours_on_logits     the same whole logits; our divergence kernel (`LossTerms.on_logits`)
  ours_fused         `ds_moekd.kernels.lm_head_loss`: teacher as (hidden, lm_head), `--chunk` tokens at
                     a time (default: auto, chunk·V ≈ N·H), so neither `[N, V]` logits tensor ever
                     exists whole (what training runs)

Reported: median time per call and the peak memory above the inputs. On a GPU the peak is
`torch.cuda.max_memory_allocated`; on CPU each implementation runs in a fresh process that reads
the kernel's resident-set high-water mark (Linux /proc), reset just before the measured call.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from pathlib import Path

import torch
import torch.nn.functional as F

from ds_moekd.kernels import lm_head_loss
from ds_moekd.losses.objective import LossTerms

from .moe_layer import _versions
from .options import RunOptions, parse_with_run_options
from .timing import cpu_peak_bytes, device_name, time_ms

IMPLEMENTATIONS = ("full_logits_torch", "ours_on_logits", "ours_fused")
CE_WEIGHT = KL_WEIGHT = 0.5  # the paper's word-level KD mix


def make_inputs(tokens: int, hidden: int, teacher_hidden: int, vocab: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_(),
        "weight": (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_(),
        "teacher_hidden": torch.randn(tokens, teacher_hidden, generator=g).to(device, dtype),
        "teacher_weight": (torch.randn(vocab, teacher_hidden, generator=g) / teacher_hidden**0.5).to(device, dtype),
        "targets": torch.randint(0, vocab, (tokens,), generator=g).to(device),
    }


def make_step(name: str, inputs: dict, chunk: int):
    """A zero-argument callable: forward + backward once; returns the loss."""
    h, w, th, tw, targets = (inputs[k] for k in ("hidden", "weight", "teacher_hidden", "teacher_weight", "targets"))
    terms = LossTerms(ce_weight=CE_WEIGHT, divergence="forward_kl", div_weight=KL_WEIGHT)

    def step():
        h.grad = w.grad = None
        if name == "ours_fused":
            loss, _, _ = lm_head_loss(
                h, w, (th, tw), targets, kind="forward_kl", ce_weight=CE_WEIGHT, div_weight=KL_WEIGHT, chunk=chunk
            )
        else:
            with torch.no_grad():
                teacher_logits = th @ tw.t()
            logits = h @ w.t()
            if name == "ours_on_logits":
                loss, _ = terms.on_logits(logits, teacher_logits, targets, chunk)
            else:
                log_q = F.log_softmax(logits.float(), -1)
                kl = F.kl_div(log_q, F.log_softmax(teacher_logits.float(), -1), log_target=True, reduction="sum")
                loss = CE_WEIGHT * F.nll_loss(log_q, targets, reduction="sum") + KL_WEIGHT * kl
        loss.backward()
        return loss.detach()

    return step


def peak_memory_mb(step, device: torch.device) -> float:
    """Peak memory of one call above what was allocated before it."""
    step()  # warm: later calls allocate the same
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return cpu_peak_bytes(step) / 2**20


def measure(name: str, shape: dict, opts: RunOptions, chunk: int) -> dict:
    inputs = make_inputs(**shape, device=opts.device, dtype=opts.dtype)
    step = make_step(name, inputs, chunk)
    memory = peak_memory_mb(step, opts.device)
    ms = time_ms(step, opts.device, warmup=opts.warmup, iters=opts.iters)
    return {"ms": round(ms, 3), "peak_mb": round(memory, 1), "loss": step().item(),
            "grad_hidden": inputs["hidden"].grad.float().norm().item()}


def _measure_in_child(queue, *args):
    queue.put(measure(*args))


def measure_isolated(name: str, shape: dict, opts: RunOptions, chunk: int) -> dict:
    """On CPU in a fresh process (a clean high-water mark); on a GPU in this one."""
    if opts.device.type == "cuda":
        return measure(name, shape, opts, chunk)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_measure_in_child, args=(queue, name, shape, opts, chunk))
    child.start()
    result = queue.get()
    child.join()
    return result


def run(shape: dict, opts: RunOptions, chunk: int) -> dict:
    results = {name: measure_isolated(name, shape, opts, chunk) for name in IMPLEMENTATIONS}
    base = results["full_logits_torch"]
    for r in results.values():
        r["time_vs_full_logits"] = round(r["ms"] / base["ms"], 3)
        r["memory_vs_full_logits"] = round(r["peak_mb"] / base["peak_mb"], 3)
        # every implementation computes the same loss and gradient (fp32 rows; bf16 inputs round)
        r["loss_rel_diff"] = abs(r["loss"] - base["loss"]) / abs(base["loss"])
    return {
        "benchmark": "loss",
        "device": device_name(opts.device),
        "dtype": str(opts.dtype).removeprefix("torch."),
        **shape,
        "chunk": chunk,
        "loss": f"{CE_WEIGHT}·CE + {KL_WEIGHT}·KL(p‖q), forward + backward",
        "versions": _versions(),
        "implementations": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd bench loss", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="response tokens in the micro-batch")
    parser.add_argument("--hidden", type=int, default=2048, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=0, help="tokens per chunk (kd.token_chunk; 0: auto)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args, opts = parse_with_run_options(parser, argv, gpu_warmup=3)
    shape = {"tokens": args.tokens, "hidden": args.hidden, "teacher_hidden": args.teacher_hidden, "vocab": args.vocab}
    result = run(shape, opts, args.chunk)
    print(f"{result['device']}, {result['dtype']}, N={args.tokens} H={args.hidden} H_t={args.teacher_hidden} "
          f"V={args.vocab}, chunk {args.chunk}")
    for name, r in result["implementations"].items():
        print(f"  {name:18s} {r['ms']:10.2f} ms  peak {r['peak_mb']:9.1f} MB  "
              f"time x{r['time_vs_full_logits']:.2f}  memory x{r['memory_vs_full_logits']:.3f}  "
              f"loss rel diff {r['loss_rel_diff']:.1e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
