"""Peak memory and time of one SAR router step, with and without teacher activation checkpointing.

The router step is a full teacher backward (a layer's router gradient flows through every later
layer), so its activations are the SAR-specific memory cost (docs/methods/sar.md). Each setting
runs in a fresh process: a random Mixtral-architecture teacher (EP 1, all experts, fp32) and a
small Llama student, then `StudentAwareRouter.router_step` once to warm up and once measured
(/proc/self/clear_refs resets the resident-set high-water mark just before it).

    python benchmarks/sar_router_memory.py [--batch 8] [--seq 256] [--out benchmarks/results/cpu-2core]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TEACHER = dict(hidden_size=512, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=8000)


def build_checkpoint(path: str) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**TEACHER, max_position_embeddings=4096, tie_word_embeddings=False)
                       ).save_pretrained(path)


def measure(teacher_path: str, checkpointing: bool, batch: int, seq: int) -> dict:
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_moekd.bench.timing import cpu_peak_bytes
    from ds_moekd.config import DataConfig, RunConfig, SARConfig, StudentConfig, TeacherConfig
    from ds_moekd.data.batching import TokenizedExample, collate
    from ds_moekd.methods import StepContext, build_method
    from ds_moekd.runtime.dist import ParallelGroups
    from ds_moekd.runtime.telemetry import Stopwatch
    from ds_moekd.teacher import MoETeacher

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    vocab = TEACHER["vocab_size"]
    student = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512,
                                           num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False))
    teacher = MoETeacher.from_pretrained(teacher_path)
    cfg = RunConfig(name="bench", method="sar", data=DataConfig(train_file="-"), teacher=TeacherConfig(path="-"),
                    student=StudentConfig(path="-"), sar=SARConfig(activation_checkpointing=checkpointing))
    method = build_method(cfg, _Tokens(vocab))
    g = torch.Generator().manual_seed(0)
    prompt = seq // 2
    examples = [TokenizedExample(torch.randint(3, vocab, (prompt,), generator=g).tolist(),
                                 torch.randint(3, vocab, (seq - prompt,), generator=g).tolist()) for _ in range(batch)]
    data = collate(examples, pad_token_id=0)
    ctx = StepContext(SimpleNamespace(module=student), teacher, ParallelGroups.single(), vocab, 0, Stopwatch())
    with torch.no_grad():  # the student step's forward, which the router step reads
        out = student(input_ids=data.input_ids, attention_mask=data.attention_mask, output_hidden_states=True)
        student_NH = data.response_rows(out.hidden_states[-1])
    method.router_step(data, student_NH, ctx)  # warm-up: builds the router trainer and its AdamW state
    start = time.perf_counter()
    peak = cpu_peak_bytes(lambda: method.router_step(data, student_NH, ctx))
    return {"activation_checkpointing": checkpointing, "batch": batch, "seq": seq,
            "peak_extra_bytes": peak, "seconds": time.perf_counter() - start,
            "teacher_param_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters())}


class _Tokens:
    """What the method reads from a tokenizer."""

    eos_token_id, pad_token_id = 2, 0

    def __init__(self, vocab):
        self._vocab = vocab

    def __len__(self):
        return self._vocab


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-2core"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child[0], args.child[1] == "1", args.batch, args.seq)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(tmp)
        for checkpointing in ("0", "1"):
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # the high-water mark follows live memory
            done = subprocess.run([sys.executable, __file__, "--child", tmp, checkpointing, "--batch",
                                   str(args.batch), "--seq", str(args.seq)],
                                  check=True, capture_output=True, text=True, env=env)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    off, on = rows
    lines = [
        f"# SAR router step: batch {args.batch} x {args.seq} tokens, teacher {TEACHER} (fp32, CPU, EP 1)",
        "",
        "| activation checkpointing | peak extra MB | seconds |",
        "|---|---:|---:|",
        *(f"| {'on' if r['activation_checkpointing'] else 'off'} | {r['peak_extra_bytes'] / 2**20:.1f} | "
          f"{r['seconds']:.2f} |" for r in rows),
        "",
        f"checkpointing: {on['peak_extra_bytes'] / off['peak_extra_bytes']:.2f}x the memory, "
        f"{on['seconds'] / off['seconds']:.2f}x the time",
    ]
    report = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sar_router_memory.json"), "w") as f:
        json.dump({"teacher": TEACHER, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "sar_router_memory.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
