"""Random-weight Mixtral teachers of a chosen size, and Llama students scaled to them, sharing a
demo build's tokenizer: big enough that the models, not the Python runtime, dominate a rank's
memory (plan checks, bench e2e).

The checkpoint is written tensor by tensor into safetensors shards of at most `SHARD_BYTES`, so
building a teacher larger than this machine's memory needs only one shard in memory. Weights are
drawn as transformers initialises Mixtral: normal(0, initializer_range), norms 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MixtralConfig

SHARD_BYTES = 2 * 1024**3
# bench e2e's teacher sizes: (layers, hidden, expert width) of fp32 Mixtrals with 8 experts. Each
# gets a student (`student_shape`) of about 1/15 its parameters, inside the range of common MoE ->
# dense pairs (a 47B Mixtral to a 3B model is 1/16, to a 7B Mistral 1/7).
SIZES = {
    "random-300mb": (4, 512, 1408),
    "random-1gb": (4, 1024, 2560),
    "random-3gb": (4, 1536, 4864),
    "random-10gb": (6, 2048, 8192),
}


def mixtral_config(tokenizer, *, layers: int, hidden: int, experts: int, inter: int, heads: int,
                   top_k: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, num_local_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def teacher_params(layers: int, hidden: int, inter: int, experts: int = 8, vocab: int = 916) -> int:
    """Parameters of such a Mixtral: attention 4h², 8 experts of 3hi and a router per layer; embeddings and head."""
    return layers * (4 * hidden * hidden + experts * 3 * hidden * inter + experts * hidden + 2 * hidden) \
        + 2 * vocab * hidden + hidden


def student_shape(layers: int, hidden: int, inter: int) -> dict:
    """A dense student for a teacher of this shape: as deep, half as wide, its FFN as wide as one
    expert (3·(h/2)·i per layer against the teacher's 8 experts' 24hi: about 1/16, 1/15 in all)."""
    return {"layers": layers, "hidden": hidden // 2, "inter": inter}


def _random_tensors(config, seed: int):
    """(name, tensor) of every weight, drawn one at a time from the model's shapes."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
        else:
            yield name, torch.randn(shape, generator=generator).mul_(config.initializer_range)


def write_random_weights(folder: Path, config, seed: int) -> None:
    """Sharded safetensors and their index, at most one shard in memory."""
    shard, shard_bytes, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))

    for name, tensor in _random_tensors(config, seed):
        if shard and shard_bytes + tensor.nbytes > SHARD_BYTES:
            flush()
            shard, shard_bytes = {}, 0
        shard[name], shard_bytes, total = tensor, shard_bytes + tensor.nbytes, total + tensor.nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def build_random_teacher(out: str | Path, tokenizer_dir: str | Path, *, layers: int = 4, hidden: int = 512,
                         experts: int = 8, inter: int = 1408, heads: int = 8, top_k: int = 2, seed: int = 0) -> Path:
    """Write a random Mixtral checkpoint (fp32 safetensors + the tokenizer) to `out`; reuse it if there."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = mixtral_config(tokenizer, layers=layers, hidden=hidden, experts=experts, inter=inter, heads=heads,
                            top_k=top_k)
    return _build(Path(out), config, tokenizer, seed)


def build_random_student(out: str | Path, tokenizer_dir: str | Path, *, layers: int, hidden: int, inter: int,
                         heads: int = 8, seed: int = 1) -> Path:
    """Write a random Llama checkpoint (fp32 safetensors + the tokenizer) to `out`; reuse it if there."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return _build(Path(out), config, tokenizer, seed)


def _build(out: Path, config, tokenizer, seed: int) -> Path:
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    write_random_weights(tmp, config, seed)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
