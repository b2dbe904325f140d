"""The demo's README: score tables, sizes, expert load per family, timings."""

from __future__ import annotations

from pathlib import Path


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def write_report(path: Path, scores: dict, timings: dict) -> None:
    evaluations, plan, routing = scores["evaluations"], scores["plan"], scores["teacher_routing"]
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
        (f"- `teacher/`: Mixtral MoE built the LLaMA-MoE way: a dense model pretrained for most of the compute "
         f"({plan['dense_stage']['steps']} steps), its FFN neurons split into {plan['teacher']['num_experts']} "
         f"experts (neuron clustering, a soft router: centroids × {plan['router_scale']}), then a short top-"
         f"{plan['teacher']['top_k']} stage ({plan['moe_stage']['steps']} steps), so unselected experts still hold "
         "what the dense model learned."),
        (f"- `student/`: a small dense Llama after a short first pass ({plan['student_stage']['steps']} steps): the "
         "base that `ds-moekd compare` fine-tunes into each seed's SFT init. `student_sft_init` below is that "
         f"init as measured here ({plan['init_stage']['steps']} more steps, not shipped). Byte-level BPE, "
         f"{scores['vocab_size']} tokens, trained on the training split only. Sequences: prompt + response + EOS "
         "(no BOS)."),
        "",
        "## What the method comparison needs (measured on the test split)",
        "",
        *_table(["target", "measured", "wanted", "met"],
                [[name, t["value"], t["target"], "yes" if t["met"] else "**no**"]
                 for name, t in scores["targets"].items()]),
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
    layers = range(len(routing["gate_mass"]))
    lines += ["", "## Teacher routing (reference responses of the test split)", "",
              "Token NLL and mean per-token KL(native ‖ routing) over the reference response tokens; router mass "
              "outside the native top-k per MoE layer over the prompt tokens.", ""]
    lines += _table(["routing", "token NLL", "KL from native"],
                    [[name, routing[name]["nll"], routing[name]["kl_from_native"]] for name in ("native", "all", "ka")])
    lines += [""] + _table(["MoE layer"] + [str(i) for i in layers],
                           [["mass outside top-k"] + [f"{100 * m:.1f}%" for m in routing["gate_mass"]]])
    load = scores["expert_load"]
    experts = len(next(iter(load["per_family"].values())))
    lines += ["", f"## Teacher expert load per family (layer {load['layer']}, native routing)", "",
              "Fraction of top-k assignments per expert over prompt + reference tokens of the test split.", ""]
    lines += _table(["family"] + [f"e{e}" for e in range(experts)],
                    [[f] + [f"{x:.3f}" for x in fractions] for f, fractions in load["per_family"].items()])
    lines += ["", "## Build time (seconds; the only part that differs between identical builds)", ""]
    lines += _table(["stage", "seconds"], [[k, v] for k, v in timings.items()])
    path.write_text("\n".join(lines) + "\n")
