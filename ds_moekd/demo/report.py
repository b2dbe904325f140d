"""The demo's README: score tables, sizes, expert load per family, timings."""

from __future__ import annotations

from pathlib import Path


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def write_report(path: Path, scores: dict, timings: dict) -> None:
    evaluations = scores["evaluations"]
    models = list(evaluations)
    families = list(next(iter(evaluations.values()))["per_family"])
    lines = [
        "# ds-moekd embedded demo workload",
        "",
        (f"Built by `ds-moekd demo build --seed {scores['seed']} --size {scores['size']} "
         f"--threads {scores['torch_threads']}` (torch {scores['versions']['torch']}, "
         f"transformers {scores['versions']['transformers']})."),
        "",
        "- `data/`: synthetic instructions (MiniLLM JSONL plus a `family` field); valid/test items are held out "
        "of training by construction (item-key hash). Records: "
        + ", ".join(f"{k} {v}" for k, v in scores["records"].items()) + ".",
        (f"- `teacher/`: Mixtral MoE, pretrained dense, split into experts (neuron clustering), trained on with "
         f"top-k routing. `student/`: a small dense Llama, trained briefly. Byte-level BPE, {scores['vocab_size']} "
         "tokens, trained on the training split only. Sequences: prompt + response + EOS (no BOS)."),
        "",
        f"## Test split ({scores['records']['test']} records, greedy): strict exact match / ROUGE-L",
        "",
    ]
    lines += _table(["model", "exact match", "ROUGE-L"],
                    [[m, evaluations[m]["exact_match"], evaluations[m]["rouge_l"]] for m in models])
    lines += ["", "### Per family (exact match / ROUGE-L)", ""]
    lines += _table(["family"] + models, [
        [f] + [f"{evaluations[m]['per_family'][f]['exact_match']} / {evaluations[m]['per_family'][f]['rouge_l']}"
               for m in models] for f in families])
    lines += ["", "## Size", ""]
    lines += _table(["model", "parameters", "active per token", "model.safetensors bytes"], [
        [role, p["total"], p["active_per_token"], p["safetensors_bytes"]] for role, p in scores["parameters"].items()])
    load = scores["expert_load"]
    experts = len(next(iter(load["per_family"].values())))
    lines += ["", f"## Teacher expert load per family (layer {load['layer']}, native routing)", "",
              "Fraction of top-k assignments per expert over prompt + reference tokens of the test split.", ""]
    lines += _table(["family"] + [f"e{e}" for e in range(experts)],
                    [[f] + [f"{x:.3f}" for x in fractions] for f, fractions in load["per_family"].items()])
    lines += ["", "## Build time (seconds; the only part that differs between identical builds)", ""]
    lines += _table(["stage", "seconds"], [[k, v] for k, v in timings.items()])
    path.write_text("\n".join(lines) + "\n")
