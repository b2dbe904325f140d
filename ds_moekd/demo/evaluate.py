"""Scores of a demo model on held-out records, and the teacher's expert load per task family."""

from __future__ import annotations

from collections import defaultdict

import torch

from ds_moekd.data.template import alpaca_prompt
from ds_moekd.demo.train import encode_records
from ds_moekd.eval import exact_match, rouge_l
from ds_moekd.eval.generate import generate_responses


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2)


def score_model(model, tokenizer, records: list[dict], *, max_new_tokens: int, batch_size: int = 64,
                routing=None, sample_seed: int | None = None) -> dict:
    """Strict exact match (primary) and ROUGE-L, overall and per family (records without a `family`
    count as "all"); greedy, or sampled at temperature 1 with `sample_seed`; `routing` for a `MoETeacher`."""
    prompts = [alpaca_prompt(r["instruction"], r.get("input", "")) for r in records]
    predictions = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, routing=routing,
                                     do_sample=sample_seed is not None, seed=sample_seed)
    by_family: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"exact_match": [], "rouge_l": []})
    for record, prediction in zip(records, predictions):
        family = by_family[record.get("family", "all")]
        family["exact_match"].append(exact_match(prediction, record["output"], strict=True))
        family["rouge_l"].append(rouge_l(prediction, record["output"]))
    every = {metric: [v for scores in by_family.values() for v in scores[metric]]
             for metric in ("exact_match", "rouge_l")}
    return {
        "exact_match": _mean(every["exact_match"]),
        "rouge_l": _mean(every["rouge_l"]),
        "per_family": {family: {"exact_match": _mean(s["exact_match"]), "rouge_l": _mean(s["rouge_l"]),
                                "count": len(s["exact_match"])}
                       for family, s in sorted(by_family.items())},
    }


@torch.no_grad()
def expert_load(model, tokenizer, records: list[dict], layer: int, batch_size: int = 64) -> dict[str, list[float]]:
    """Fraction of top-k routing assignments that go to each expert at one MoE layer, per family.

    Counts every non-padding token of prompt + reference response, under the model's own routing
    (a hook on the layer's router, which returns (logits, weights, expert indices)).
    """
    num_experts = model.config.num_local_experts
    captured: list[torch.Tensor] = []
    hook = model.model.layers[layer].mlp.gate.register_forward_hook(lambda _m, _i, out: captured.append(out[2]))
    counts: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(num_experts, dtype=torch.long))
    pad_id = tokenizer.pad_token_id
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            encoded = [ids for ids, _ in encode_records(chunk, tokenizer)]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in encoded])
            attention_mask = (torch.arange(width)[None, :] < torch.tensor([len(i) for i in encoded])[:, None]).long()
            captured.clear()
            model(input_ids=input_ids, attention_mask=attention_mask)
            experts_BTK = captured[0].reshape(len(chunk), width, -1)
            for row, record in enumerate(chunk):
                chosen = experts_BTK[row, :len(encoded[row])].flatten()
                counts[record["family"]] += torch.bincount(chosen, minlength=num_experts)
    finally:
        hook.remove()
    return {family: [round(c / max(1, int(total.sum())), 4) for c in total.tolist()]
            for family, total in sorted(counts.items())}
