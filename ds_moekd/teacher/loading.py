"""Read a safetensors checkpoint tensor by tensor, so a rank reads only what it holds.

`CheckpointReader` opens a single `model.safetensors` or a sharded checkpoint with
`model.safetensors.index.json`, reads tensors (or leading-dimension slices of them) by name and
counts the bytes it read. FP8 block-scaled weights (DeepSeek-V3: `X.weight` in float8 with
`X.weight_scale_inv`, one scale per 128x128 block) are dequantised tensor by tensor as they are
read. `read_local_experts` reads one MoE block's local experts (any of its experts, in the order
of the rank's slots) in the kernels' layout
(`w_gate_up [E, H, 2I]`, `w_down [E, I, H]`) from either checkpoint layout: per expert (names
from the family, as released and as transformers' `save_pretrained` writes) or fused
(`{block}.experts.gate_up_proj [E, 2I, H]`, `{block}.experts.down_proj [E, H, I]`,
transformers' in-memory layout).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from typing_extensions import Self

from ds_moekd.modelfiles.checks import check_safetensors_file
from ds_moekd.teacher.families import ExpertShape, Family

SINGLE_FILE = "model.safetensors"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INDEX_FILE = "model.safetensors.index.json"


def tensor_files(path: str) -> dict[str, str]:
    """Checkpoint tensor name -> the safetensors file holding it, relative to `path` (a sharded
    checkpoint's index wins over a single file)."""
    index_path = os.path.join(path, INDEX_FILE)
    single_path = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            return dict(json.load(f)["weight_map"])
    if os.path.exists(single_path):
        check_safetensors_file(Path(single_path))
        with safe_open(single_path, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise FileNotFoundError(
        f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; the teacher reads safetensors checkpoints "
        "(convert a .bin checkpoint with `ds-moekd convert SRC DST`)"
    )


class CheckpointReader:
    """Tensors of one checkpoint by name; `bytes_read` counts the bytes materialised so far."""

    def __init__(self, path: str, *, fp8_block: tuple[int, int] = (128, 128), device: torch.device | str = "cpu"):
        self.path = path
        # Tensors are read straight onto `device` (safetensors copies each from the file mapping to
        # the GPU), so the teacher never exists as a full CPU copy (docs/devices.md).
        self.device = torch.device(device)
        self.fp8_block = fp8_block  # quantization_config.weight_block_size
        self._file_of = {name: os.path.join(path, file) for name, file in tensor_files(path).items()}
        for file in sorted(set(self._file_of.values())):  # missing or truncated shards: a clear error now
            check_safetensors_file(Path(file))
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
        if tensor.dtype in _FP8_DTYPES:
            tensor = self._dequantize(name, tensor, rows)
        out = tensor.to(device=self.device, dtype=dtype)
        # On the CPU safetensors hands out views of its file mapping: a copy of our own lets `close`
        # unmap the file, so the pages read stop counting in this process's memory.
        return out.clone() if out is tensor and out.device.type == "cpu" else out

    def _dequantize(self, name: str, weight_OI: torch.Tensor, rows: slice | None) -> torch.Tensor:
        scale_name = f"{name}_scale_inv"
        if scale_name not in self:
            raise ValueError(
                f"{self.path}: {name} is {weight_OI.dtype} but has no {scale_name} to dequantise it"
            )
        if rows is not None or weight_OI.dim() != 2:
            raise ValueError(
                f"{self.path}: {name}: FP8 dequantisation supports whole 2-D weights (per-expert layout), "
                f"not slices of {list(weight_OI.shape)}"
            )
        scale_BC = self.read(scale_name, dtype=torch.float32)
        block_rows, block_cols = self.fp8_block
        out_dim, in_dim = weight_OI.shape
        scale_OI = scale_BC.repeat_interleave(block_rows, 0)[:out_dim].repeat_interleave(block_cols, 1)[
            :, :in_dim
        ]
        return weight_OI.float() * scale_OI

    def _slice(self, name: str):
        file = self._file_of.get(name)
        if file is None:
            raise KeyError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        if file not in self._open:
            self._open[file] = self._handles.enter_context(safe_open(file, framework="pt", device=self._open_device()))
        return self._open[file].get_slice(name)

    def _open_device(self) -> str:
        """Where safetensors materialises a tensor: the target device where it can (CPU and CUDA),
        else the CPU, with `read` moving each tensor on."""
        return str(self.device) if self.device.type in ("cpu", "cuda") else "cpu"

    def close(self) -> None:
        """Unmap the files read so far (reading again reopens them)."""
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
    expert_ids: Sequence[int],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of experts `expert_ids` of one block, in that order: (`w_gate_up [E, H, 2I]`, `w_down [E, I, H]`).

    Experts narrower than the layer's widest (LLaMA-MoE) are zero-padded to I: a zero gate/up
    column gives silu(0) * 0 = 0 and a zero down row adds nothing, so the output is unchanged.
    """
    fused_gate_up = f"{block_prefix}.experts.gate_up_proj"
    if fused_gate_up in reader:
        return _read_fused(reader, block_prefix, shape, expert_ids, dtype)
    first = f"{block_prefix}.{family.expert_keys[0].format(e=expert_ids[0])}"
    if first in reader:
        return _read_per_expert(reader, family, block_prefix, shape, expert_ids, dtype)
    raise KeyError(
        f"{reader.path}: found neither fused ({fused_gate_up}) nor per-expert ({first}) expert weights; "
        f"keys under {block_prefix}: {reader.names_with_prefix(block_prefix)[:6]}"
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
    # One slice per run of consecutive ids (one in all for a contiguous placement's block).
    runs = []
    for e in expert_ids:
        if runs and runs[-1].stop == e:
            runs[-1] = slice(runs[-1].start, e + 1)
        else:
            runs.append(slice(e, e + 1))
    w_gate_up_EJH, w_down_EHI = (_concat([reader.read(name, rows=rows, dtype=dtype) for rows in runs])
                                 for name in names)
    return w_gate_up_EJH.transpose(1, 2).contiguous(), w_down_EHI.transpose(1, 2).contiguous()


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _read_per_expert(reader, family, block_prefix, shape, expert_ids, dtype):
    hidden, inter = shape.hidden_size, shape.intermediate_size
    widths = shape.expert_widths
    w_gate_up_EHJ = torch.zeros(len(expert_ids), hidden, 2 * inter, dtype=dtype, device=reader.device)
    w_down_EIH = torch.zeros(len(expert_ids), inter, hidden, dtype=dtype, device=reader.device)
    for local, e in enumerate(expert_ids):
        width = widths[e]
        gate, up, down = (f"{block_prefix}.{key.format(e=e)}" for key in family.expert_keys)
        for name, want in ((gate, [width, hidden]), (up, [width, hidden]), (down, [hidden, width])):
            if reader.shape(name) != want:
                raise ValueError(
                    f"{reader.path}: {name} has shape {reader.shape(name)}, config implies {want}"
                )
        # nn.Linear stores [out, in]; the kernels multiply x @ W, so store transposed.
        w_gate_up_EHJ[local, :, :width] = reader.read(gate, dtype=dtype).T
        w_gate_up_EHJ[local, :, inter : inter + width] = reader.read(up, dtype=dtype).T
        w_down_EIH[local, :width] = reader.read(down, dtype=dtype).T
    return w_gate_up_EHJ, w_down_EIH
