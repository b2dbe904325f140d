"""What a method comparison measures on the held-out split (docs/comparison.md).

Every model is scored twice over: greedy decoding, and sampled decoding at temperature 1 with several
evaluation seeds (the paper's protocol; its mean and std over those seeds). Each decoding gives strict
exact match and ROUGE-L, overall and per family. The teacher is scored under native, all-expert and
KA routing, with its token NLL and mean per-token KL from native routing (decoded scores hide soft
differences). SAR runs also report how far the student-aware training moved the routers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_moekd.comparison.stats import summarize
from ds_moekd.data.batching import TokenizedExample, collate
from ds_moekd.data.template import alpaca_prompt
from ds_moekd.decoding import Forward, HFForward
from ds_moekd.demo.evaluate import scores_by_family
from ds_moekd.eval.router_mass import non_activated_gate_mass, router_distributions
from ds_moekd.teacher.routing import AllExperts, KASample, NativeTopK

METRICS = ("exact_match", "rouge_l")


def teacher_routings(num_experts: int, resample_prob: float) -> dict:
    """The teacher rows: native top-k, all N experts, and one KA draw of N-1 experts (λ = resample_prob)."""
    return {"native": NativeTopK(), "all": AllExperts(),
            "ka": KASample(resample_prob=resample_prob, num_selected=num_experts - 1, seed=0)}


def score_decodings(forward: Forward, tokenizer, records: list[dict], max_new_tokens: int,
                    eval_seeds: list[int]) -> dict:
    """{"greedy": scores, "sampled": mean and std over `eval_seeds` of temperature-1 samples, with each
    seed's scores and the per-family mean}, of the model behind `forward` (ds_moekd/decoding.py)."""
    (greedy,) = scores_by_family(forward, tokenizer, records, max_new_tokens=max_new_tokens)
    per_seed = scores_by_family(forward, tokenizer, records, max_new_tokens=max_new_tokens, seeds=list(eval_seeds))
    sampled: dict = {"seeds": list(eval_seeds),
                     "per_seed": [{m: run[m] for m in METRICS} for run in per_seed]}
    for metric in METRICS:
        spread = summarize(run[metric] for run in per_seed)
        sampled[metric], sampled[f"{metric}_std"] = round(spread.mean, 4), round(spread.std, 4)
    families = per_seed[0]["per_family"] if per_seed else {}
    sampled["per_family"] = {f: {m: round(sum(run["per_family"][f][m] for run in per_seed) / len(per_seed), 2)
                                 for m in METRICS} for f in families}
    return {"greedy": greedy, "sampled": sampled}


def score_student(model_dir: Path, records: list[dict], max_new_tokens: int, eval_seeds: list[int]) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return score_decodings(HFForward(model), tokenizer, records, max_new_tokens, eval_seeds)


def score_teacher(teacher_dir: Path, records: list[dict], max_new_tokens: int, resample_prob: float,
                  eval_seeds: list[int]) -> dict:
    """{routing: decodings plus `nll` and `kl_from_native`}, and the native routers' gate mass."""
    from ds_moekd.teacher import MoETeacher

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = MoETeacher.from_pretrained(str(teacher_dir))
    routings = teacher_routings(teacher.num_experts, resample_prob)
    fit = routing_fit(teacher, tokenizer, records, routings)
    rows = {name: {**score_decodings(teacher.decoding_forward(policy), tokenizer, records, max_new_tokens, eval_seeds),
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


def _prompts(records: list[dict], tokenizer) -> list[list[int]]:
    return tokenizer([alpaca_prompt(r["instruction"], r.get("input", "")) for r in records],
                     add_special_tokens=False)["input_ids"]


def gate_mass(teacher, tokenizer, records: list[dict]) -> list[float]:
    """Per MoE layer, the router probability on experts outside the native top-k, over prompt tokens."""
    prompts = _prompts(records, tokenizer)
    return non_activated_gate_mass(teacher, prompts, list(range(len(prompts))),
                                   tokenizer.pad_token_id)["non_activated_gate_mass"]


def router_movement(teacher_dir: Path, sar_teacher_dir: Path, records: list[dict]) -> dict:
    """How far SAR moved the routers, per MoE layer over the held-out prompt tokens: the gate mass
    outside the native top-k before and after, and the mean KL(native router ‖ SAR-tuned router)."""
    from ds_moekd.teacher import MoETeacher

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    prompts = _prompts(records, tokenizer)
    native, tuned = (MoETeacher.from_pretrained(str(d)) for d in (teacher_dir, sar_teacher_dir))
    before = gate_mass(native, tokenizer, records)
    after = gate_mass(tuned, tokenizer, records)
    kl = []
    for p_TN, q_TN in zip(router_distributions(native, prompts, tokenizer.pad_token_id),
                          router_distributions(tuned, prompts, tokenizer.pad_token_id), strict=True):
        p, q = p_TN.double().clamp_min(1e-30), q_TN.double().clamp_min(1e-30)
        kl.append(round(float((p * (p.log() - q.log())).sum(-1).mean()), 8))
    return {"gate_mass_native": before, "gate_mass_sar": after,
            "gate_mass_change": [round(a - b, 6) for a, b in zip(after, before)], "router_kl": kl}
