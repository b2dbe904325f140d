"""Random-weight Mixtral teachers of a chosen size, sharing a demo build's tokenizer: big enough
that the teacher, not the Python runtime, dominates a rank's memory (plan checks, bench e2e)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM


def build_random_teacher(out: str | Path, tokenizer_dir: str | Path, *, layers: int = 4, hidden: int = 512,
                         experts: int = 8, inter: int = 1408, heads: int = 8, top_k: int = 2, seed: int = 0) -> Path:
    """Write a random Mixtral checkpoint (fp32 safetensors + the tokenizer) to `out`; reuse it if there."""
    out = Path(out)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, num_local_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
