"""What a method comparison measures on the held-out split (docs/comparison.md): each student's
greedy strict exact match and ROUGE-L overall and per family; the teacher's under native, all-expert
and KA routing, with its token NLL and mean per-token KL from native routing (greedy scores hide
soft differences); and the routers' non-activated gate mass (native and SAR-tuned)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_moekd.data.batching import TokenizedExample, collate
from ds_moekd.data.template import alpaca_prompt
from ds_moekd.demo.evaluate import score_model
from ds_moekd.eval.diagnostics import non_activated_gate_mass
from ds_moekd.routing import AllExperts, KASample, NativeTopK


def teacher_routings(num_experts: int, resample_prob: float) -> dict:
    """The teacher rows: native top-k, all N experts, and one KA draw of N-1 experts (λ = resample_prob)."""
    return {"native": NativeTopK(), "all": AllExperts(),
            "ka": KASample(resample_prob=resample_prob, num_selected=num_experts - 1, seed=0)}


def score_student(model_dir: Path, records: list[dict], max_new_tokens: int) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return score_model(model, tokenizer, records, max_new_tokens=max_new_tokens)


def score_teacher(teacher_dir: Path, records: list[dict], max_new_tokens: int, resample_prob: float) -> dict:
    """{routing: scores plus `nll` and `kl_from_native`}, and the native routers' gate mass."""
    from ds_moekd.teacher import MoETeacher

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = MoETeacher.from_pretrained(str(teacher_dir))
    routings = teacher_routings(teacher.num_experts, resample_prob)
    fit = routing_fit(teacher, tokenizer, records, routings)
    rows = {name: {**score_model(teacher, tokenizer, records, max_new_tokens=max_new_tokens, routing=policy),
                   **fit[name]}
            for name, policy in routings.items()}
    return {"routings": rows, "gate_mass": gate_mass(teacher, tokenizer, records)}


def _examples(records: list[dict], tokenizer) -> list[TokenizedExample]:
    prompts = tokenizer([alpaca_prompt(r["instruction"], r.get("input", "")) for r in records], add_special_tokens=False)
    responses = tokenizer([r["output"] for r in records], add_special_tokens=False)
    return [TokenizedExample(p, r + [tokenizer.eos_token_id])
            for p, r in zip(prompts["input_ids"], responses["input_ids"], strict=True)]


@torch.no_grad()
def routing_fit(teacher, tokenizer, records: list[dict], routings: dict, batch_size: int = 64) -> dict:
    """Per routing, over the reference response tokens: mean NLL, and mean KL(native ‖ routing)."""
    examples, vocab = _examples(records, tokenizer), len(tokenizer)
    sums = {name: {"nll": 0.0, "kl_from_native": 0.0} for name in routings}
    tokens = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id,
                        example_ids=range(start, min(start + batch_size, len(examples))))
        targets = batch.targets[batch.loss_mask.bool()]
        native = None
        for name, policy in routings.items():
            logits = teacher(batch.input_ids, attention_mask=batch.attention_mask, routing=policy,
                             sequence_index=batch.example_ids).logits[..., :vocab]
            logp_NV = F.log_softmax(batch.response_rows(logits).float(), dim=-1)
            native = logp_NV if native is None else native  # the first routing is native
            sums[name]["nll"] -= logp_NV.gather(1, targets[:, None]).sum().item()
            sums[name]["kl_from_native"] += (native.exp() * (native - logp_NV)).sum().item()
        tokens += targets.numel()
    return {name: {k: v / tokens for k, v in s.items()} for name, s in sums.items()}


def gate_mass(teacher, tokenizer, records: list[dict]) -> list[float]:
    """Per MoE layer, the router probability on experts outside the native top-k, over prompt tokens."""
    prompts = tokenizer([alpaca_prompt(r["instruction"], r.get("input", "")) for r in records],
                        add_special_tokens=False)["input_ids"]
    return non_activated_gate_mass(teacher, prompts, list(range(len(prompts))),
                                   tokenizer.pad_token_id)["non_activated_gate_mass"]


def sar_gate_mass(sar_teacher_dir: Path, records: list[dict]) -> list[float]:
    """The gate mass of a SAR-tuned teacher (its routers trained for the student)."""
    from ds_moekd.teacher import MoETeacher

    tokenizer = AutoTokenizer.from_pretrained(sar_teacher_dir)
    return gate_mass(MoETeacher.from_pretrained(str(sar_teacher_dir)), tokenizer, records)
