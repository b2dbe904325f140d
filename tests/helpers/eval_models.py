"""Tiny random student + MoE teacher sharing a trained BPE tokenizer, and demo-format data, for eval tests.

Random weights with a large init make every prompt decode to a different, non-trivial text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from ds_moekd.data.synthetic import generate_splits, write_jsonl
from ds_moekd.demo.tokenizer import train_tokenizer


def write_eval_models(root: Path) -> dict[str, str]:
    """Writes student/, teacher/ (HF dirs with the tokenizer) and test.jsonl under `root`."""
    splits = generate_splits({"train": 20, "valid": 1, "test": 1}, seed=0)
    tokenizer = train_tokenizer(splits["train"], vocab_size=300)
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.bos_token_id}
    shape = {"vocab_size": len(tokenizer), "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2,
             "num_hidden_layers": 2, "initializer_range": 0.3, "max_position_embeddings": 512,
             "tie_word_embeddings": False, **special}
    torch.manual_seed(0)
    models = {
        "student": LlamaForCausalLM(LlamaConfig(intermediate_size=64, **shape)),
        "teacher": MixtralForCausalLM(MixtralConfig(intermediate_size=16, num_local_experts=4,
                                                    num_experts_per_tok=2, **shape)),
    }
    paths = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    write_jsonl(splits["test"], root / "test.jsonl")
    paths["test"] = str(root / "test.jsonl")
    return paths
