"""The demo's view of the one scorer (eval/runner.py): strict exact match and ROUGE-L per task family;
and the teacher's expert load per task family."""

from __future__ import annotations

from collections import defaultdict

import torch

from ds_moekd.data.formats import EvalData
from ds_moekd.data.instructions import InstructionRecord
from ds_moekd.decoding import Forward
from ds_moekd.demo.model_training import encode_records
from ds_moekd.eval.runner import EvalSettings, predict, record_scores


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2)


def scores_by_family(forward: Forward, tokenizer, records: list[dict], *, max_new_tokens: int,
                     seeds: list[int] | None = None, batch_size: int = 64) -> list[dict]:
    """Strict exact match (primary) and ROUGE-L, overall and per family (records without a `family`
    count as "all"), of the model behind `forward` (ds_moekd/decoding.py) on demo records: one
    result for greedy decoding (`seeds` None), else one per seed, sampled at temperature 1. Every
    prompt is scored (none dropped for length), in the alpaca template of training."""
    if seeds is not None and not seeds:
        return []
    data = EvalData([InstructionRecord(r["instruction"], r.get("input", ""), (r["output"],)) for r in records],
                    "demo", "demo records")
    settings = EvalSettings(greedy=seeds is None, seeds=tuple(seeds or ()), max_new_tokens=max_new_tokens,
                            max_prompt_tokens=None, batch_size=batch_size, template="alpaca")
    predictions = predict(forward, tokenizer, data, settings, progress=False)
    return [_family_summary(records, record_scores(predictions.records, texts)) for texts in predictions.by_run]


def _family_summary(records: list[dict], scores: dict[str, list[float]]) -> dict:
    by_family: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"exact_match": [], "rouge_l": []})
    for record, em, rouge in zip(records, scores["exact_match_strict"], scores["rouge_l"], strict=True):
        family = by_family[record.get("family", "all")]
        family["exact_match"].append(em)
        family["rouge_l"].append(rouge)
    every = {metric: [v for family in by_family.values() for v in family[metric]]
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
