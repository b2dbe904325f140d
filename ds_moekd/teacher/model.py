"""The expert-parallel MoE teacher: transformers' own model with the project's MoE blocks.

`MoETeacher.from_pretrained` builds the family's transformers model on the meta device (so no
weight is allocated), reads the replicated weights (embeddings, attention, norms, dense MLPs,
routers, lm_head) from the checkpoint, and replaces every sparse MoE block with an
`ExpertParallelMoE` holding only this rank's experts, read by name from the checkpoint. Attention,
norms and rotary embeddings stay transformers' own code.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ds_moekd.dist import ParallelGroups
from ds_moekd.routing import NativeTopK, RouterSpec, RoutingPolicy
from ds_moekd.teacher.families import Family, get_family
from ds_moekd.teacher.loading import CheckpointReader, find_block_prefix, read_local_experts
from ds_moekd.teacher.moe_block import ActiveRouting, ExpertParallelMoE

logger = logging.getLogger(__name__)


class MoETeacher(nn.Module):
    """Frozen teacher. Call it like a transformers causal LM; `.logits` is `[B, S, V]`."""

    def __init__(
        self,
        *,
        model: PreTrainedModel,
        family: Family,
        groups: ParallelGroups,
        moe_blocks: list[ExpertParallelMoE],
        bytes_read: int,
        expert_bytes_read: int,
    ):
        super().__init__()
        self.model = model
        self.family = family
        self.groups = groups
        # The blocks are registered inside self.model; a tuple attribute is not registered twice.
        self._moe_blocks = tuple(moe_blocks)
        self.bytes_read = bytes_read  # everything this rank read from the checkpoint
        self.expert_bytes_read = expert_bytes_read  # the expert weights among them

    @classmethod
    def from_pretrained(
        cls, path: str, *, groups: ParallelGroups | None = None, dtype: torch.dtype = torch.float32
    ) -> MoETeacher:
        groups = ParallelGroups.single() if groups is None else groups
        config = AutoConfig.from_pretrained(path)
        family = get_family(config, path)
        shape = family.expert_shape(config)
        if shape.num_experts % groups.ep_size != 0:
            divisors = [d for d in range(1, shape.num_experts + 1) if shape.num_experts % d == 0]
            raise ValueError(
                f"{path}: {shape.num_experts} experts cannot be split over teacher.ep_size={groups.ep_size} "
                f"ranks; choose an EP size that divides {shape.num_experts} (one of {divisors})"
            )
        local = shape.num_experts // groups.ep_size
        expert_ids = range(groups.ep_rank * local, (groups.ep_rank + 1) * local)
        router = family.router_spec(config)

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        with CheckpointReader(path) as reader:
            moe_blocks, expert_bytes_read = _install_ep_blocks(
                model, reader, family, router, expert_ids, groups
            )
            _load_replicated_weights(model, reader, dtype)
            bytes_read = reader.bytes_read
        _rebuild_meta_buffers(model)
        model.eval().requires_grad_(False)
        logger.info(
            "teacher %s: %d MoE layers, experts %d..%d of %d on EP rank %d/%d, read %.1f MB (%.1f MB experts)",
            path,
            len(moe_blocks),
            expert_ids.start,
            expert_ids.stop - 1,
            shape.num_experts,
            groups.ep_rank,
            groups.ep_size,
            bytes_read / 1e6,
            expert_bytes_read / 1e6,
        )
        return cls(
            model=model,
            family=family,
            groups=groups,
            moe_blocks=moe_blocks,
            bytes_read=bytes_read,
            expert_bytes_read=expert_bytes_read,
        ).eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        routing: RoutingPolicy | None = None,
        sequence_index: torch.Tensor | None = None,
    ):
        """Logits of `input_ids [B, S]` under `routing` (None: the family's native top-k).

        `sequence_index [B]` is each row's global index in the data (keys for counter-based
        routing randomness; default 0..B-1). Under EP every rank of the EP group must call this
        the same number of times (the MoE layers exchange tokens), with its own batch.
        """
        batch, seq = input_ids.shape
        device = input_ids.device
        positions_BS = (
            position_ids if position_ids is not None else torch.arange(seq, device=device).expand(batch, seq)
        )
        sequences = sequence_index if sequence_index is not None else torch.arange(batch, device=device)
        active = ActiveRouting(
            policy=NativeTopK() if routing is None else routing,
            sequence_T=sequences[:, None].expand(batch, seq).reshape(-1),
            position_T=positions_BS.expand(batch, seq).reshape(-1),
        )
        for block in self._moe_blocks:
            block.active = active
        try:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        finally:
            for block in self._moe_blocks:
                block.active = None

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def moe_blocks(self) -> tuple[ExpertParallelMoE, ...]:
        return self._moe_blocks

    @property
    def num_experts(self) -> int:
        return self._moe_blocks[0].router.num_experts

    @property
    def top_k(self) -> int:
        return self._moe_blocks[0].router.top_k

    @property
    def ep_size(self) -> int:
        return self.groups.ep_size

    @property
    def local_expert_ids(self) -> list[int]:
        return list(self._moe_blocks[0].expert_ids)

    @property
    def expert_param_bytes(self) -> int:
        """Bytes of expert weights this rank holds (all MoE layers)."""
        return sum(
            t.numel() * t.element_size() for b in self._moe_blocks for t in (b.w_gate_up_EHJ, b.w_down_EIH)
        )


def _install_ep_blocks(
    model: PreTrainedModel,
    reader: CheckpointReader,
    family: Family,
    router: RouterSpec,
    expert_ids: range,
    groups: ParallelGroups,
) -> tuple[list[ExpertParallelMoE], int]:
    """Replace each of the family's sparse MoE blocks by an EP block; returns them and the expert bytes read."""
    shape = family.expert_shape(model.config)
    dtype = model.dtype
    moe_blocks, expert_bytes_read = [], 0
    for name, module in list(model.named_modules()):
        if type(module).__name__ != family.sparse_block_class:
            continue
        layer_prefix, _, attr = name.rpartition(".")  # "model.layers.3", "mlp"
        block_prefix = find_block_prefix(reader, family, layer_prefix)
        gate_weight_NH = reader.read(f"{block_prefix}.{family.router_weight_name}", dtype=dtype)
        before = reader.bytes_read
        w_gate_up_EHJ, w_down_EIH = read_local_experts(reader, family, block_prefix, shape, expert_ids, dtype)
        expert_bytes_read += reader.bytes_read - before
        block = ExpertParallelMoE(
            layer_index=int(layer_prefix.rsplit(".", 1)[1]),
            router=router,
            gate_weight_NH=gate_weight_NH,
            w_gate_up_EHJ=w_gate_up_EHJ,
            w_down_EIH=w_down_EIH,
            expert_ids=expert_ids,
            groups=groups,
        )
        setattr(model.get_submodule(layer_prefix), attr, block)
        moe_blocks.append(block)
    if not moe_blocks:
        raise ValueError(
            f"{reader.path}: the {family.model_type} model built from config.json has no "
            f"{family.sparse_block_class}; nothing to run expert-parallel"
        )
    return moe_blocks, expert_bytes_read


def _load_replicated_weights(model: PreTrainedModel, reader: CheckpointReader, dtype: torch.dtype) -> None:
    """Replace every parameter still on the meta device by the checkpoint tensor of the same name."""
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)  # {target: source}
    missing = []
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if param.device.type != "meta":
            continue  # the EP blocks' weights, already read
        if name in reader:
            tensor = reader.read(name, dtype=dtype)
            if list(tensor.shape) != list(param.shape):
                raise ValueError(
                    f"{reader.path}: {name} has shape {list(tensor.shape)}, the model built from config.json "
                    f"expects {list(param.shape)}"
                )
            _set_parameter(model, name, nn.Parameter(tensor, requires_grad=False))
        elif name not in tied:
            missing.append(name)
    if missing:
        raise KeyError(
            f"{reader.path}: checkpoint lacks {len(missing)} weights the model needs: {missing[:8]}"
        )
    for target, source in tied.items():
        if target not in reader:  # tied in the checkpoint too (tie_word_embeddings)
            _set_parameter(model, target, model.get_parameter(source))


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, param)


def _rebuild_meta_buffers(model: PreTrainedModel) -> None:
    """Recreate modules whose buffers were left on meta (rotary embeddings compute `inv_freq` at init)."""
    for name, module in list(model.named_modules()):
        meta_buffers = [b for b, t in module.named_buffers(recurse=False) if t.device.type == "meta"]
        if not meta_buffers:
            continue
        if not hasattr(module, "rope_type"):
            raise RuntimeError(
                f"teacher skeleton: buffers {meta_buffers} of {name} ({type(module).__name__}) are not "
                "materialised; teach ds_moekd/teacher/model.py::_rebuild_meta_buffers how to rebuild it"
            )
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, type(module)(config=module.config))
