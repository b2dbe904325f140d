"""Read a safetensors checkpoint tensor by tensor, so a rank reads only what it holds.

`CheckpointReader` opens a single `model.safetensors` or a sharded checkpoint with
`model.safetensors.index.json`, reads tensors (or leading-dimension slices of them) by name and
counts the bytes it read. `read_local_experts` reads one MoE block's local experts in the
kernels' layout (`w_gate_up [E, H, 2I]`, `w_down [E, I, H]`) from either checkpoint layout:
per expert (`{block}.experts.{e}.{gate,up,down}.weight`, as released and as transformers'
`save_pretrained` writes) or fused (`{block}.experts.gate_up_proj [E, 2I, H]`,
`{block}.experts.down_proj [E, H, I]`, transformers' in-memory layout).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack

import torch
from safetensors import safe_open
from typing_extensions import Self

from ds_moekd.teacher.families import ExpertShape, Family

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Tensors of one checkpoint by name; `bytes_read` counts the bytes materialised so far."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, INDEX_FILE)
        single_path = os.path.join(path, SINGLE_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            self._file_of = {name: os.path.join(path, file) for name, file in weight_map.items()}
        elif os.path.exists(single_path):
            with safe_open(single_path, framework="pt") as f:
                self._file_of = {name: single_path for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        else:
            raise FileNotFoundError(
                f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; the teacher reads safetensors checkpoints "
                "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
            )
        self._handles = ExitStack()
        self._open: dict[str, object] = {}
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(name for name in self._file_of if name.startswith(prefix))

    def shape(self, name: str) -> list[int]:
        return self._slice(name).get_shape()

    def read(self, name: str, *, rows: slice | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` (only `rows` of its first dimension when given), cast to `dtype`."""
        view = self._slice(name)
        tensor = view[rows] if rows is not None else view[:]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor if dtype is None else tensor.to(dtype)

    def _slice(self, name: str):
        file = self._file_of.get(name)
        if file is None:
            raise KeyError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        if file not in self._open:
            self._open[file] = self._handles.enter_context(safe_open(file, framework="pt", device="cpu"))
        return self._open[file].get_slice(name)

    def close(self) -> None:
        self._handles.close()
        self._open.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_block_prefix(reader: CheckpointReader, family: Family, layer_prefix: str) -> str:
    """Checkpoint name of the MoE block of one decoder layer (`model.layers.3` -> `model.layers.3.block_sparse_moe`)."""
    for block_name in family.checkpoint_block_names:
        prefix = f"{layer_prefix}.{block_name}"
        if f"{prefix}.{family.router_weight_name}" in reader:
            return prefix
    tried = [f"{layer_prefix}.{b}.{family.router_weight_name}" for b in family.checkpoint_block_names]
    raise KeyError(
        f"{reader.path}: no router weight for the MoE block of {layer_prefix} (looked for {tried}); "
        f"is this a {family.model_type} checkpoint? Keys there: {reader.names_with_prefix(layer_prefix)[:8]}"
    )


def read_local_experts(
    reader: CheckpointReader,
    family: Family,
    block_prefix: str,
    shape: ExpertShape,
    expert_ids: range,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of experts `expert_ids` of one block: (`w_gate_up [E, H, 2I]`, `w_down [E, I, H]`)."""
    fused_gate_up = f"{block_prefix}.experts.gate_up_proj"
    if fused_gate_up in reader:
        return _read_fused(reader, block_prefix, shape, expert_ids, dtype)
    first = f"{block_prefix}.experts.{expert_ids.start}.{family.expert_linear_names[0]}.weight"
    if first in reader:
        return _read_per_expert(reader, family, block_prefix, shape, expert_ids, dtype)
    raise KeyError(
        f"{reader.path}: found neither fused ({fused_gate_up}) nor per-expert ({first}) expert weights; "
        f"keys under {block_prefix}.experts: {reader.names_with_prefix(block_prefix + '.experts')[:6]}"
    )


def _read_fused(reader, block_prefix, shape, expert_ids, dtype):
    names = (f"{block_prefix}.experts.gate_up_proj", f"{block_prefix}.experts.down_proj")
    expected = (
        [shape.num_experts, 2 * shape.intermediate_size, shape.hidden_size],
        [shape.num_experts, shape.hidden_size, shape.intermediate_size],
    )
    for name, want in zip(names, expected):
        if reader.shape(name) != want:
            raise ValueError(f"{reader.path}: {name} has shape {reader.shape(name)}, config implies {want}")
    rows = slice(expert_ids.start, expert_ids.stop)
    w_gate_up_EJH = reader.read(names[0], rows=rows, dtype=dtype)
    w_down_EHI = reader.read(names[1], rows=rows, dtype=dtype)
    return w_gate_up_EJH.transpose(1, 2).contiguous(), w_down_EHI.transpose(1, 2).contiguous()


def _read_per_expert(reader, family, block_prefix, shape, expert_ids, dtype):
    hidden, inter = shape.hidden_size, shape.intermediate_size
    gate_name, up_name, down_name = family.expert_linear_names
    w_gate_up_EHJ = torch.empty(len(expert_ids), hidden, 2 * inter, dtype=dtype)
    w_down_EIH = torch.empty(len(expert_ids), inter, hidden, dtype=dtype)
    for local, e in enumerate(expert_ids):
        prefix = f"{block_prefix}.experts.{e}"
        for name, want in (
            (gate_name, [inter, hidden]),
            (up_name, [inter, hidden]),
            (down_name, [hidden, inter]),
        ):
            if reader.shape(f"{prefix}.{name}.weight") != want:
                raise ValueError(
                    f"{reader.path}: {prefix}.{name}.weight has shape {reader.shape(f'{prefix}.{name}.weight')}, "
                    f"config implies {want}"
                )
        # nn.Linear stores [out, in]; the kernels multiply x @ W, so store transposed.
        w_gate_up_EHJ[local, :, :inter] = reader.read(f"{prefix}.{gate_name}.weight", dtype=dtype).T
        w_gate_up_EHJ[local, :, inter:] = reader.read(f"{prefix}.{up_name}.weight", dtype=dtype).T
        w_down_EIH[local] = reader.read(f"{prefix}.{down_name}.weight", dtype=dtype).T
    return w_gate_up_EHJ, w_down_EIH
