"""The expert-parallel MoE teacher: transformers' own model with the project's MoE blocks.

`MoETeacher.from_pretrained` builds the family's transformers model on the meta device (so no
weight is allocated), reads the replicated weights (embeddings, attention, norms, dense MLPs,
routers, lm_head) from the checkpoint, and replaces every sparse MoE block with an
`ExpertParallelMoE` holding only this rank's experts (those its expert placement gives it,
ds_moekd/teacher/placement.py), read by name from the checkpoint. Attention,
norms and rotary embeddings stay transformers' own code. Multi-token-prediction layers of
DeepSeek checkpoints (`model.layers.{num_hidden_layers}...`) are never read: only tensors the
skeleton needs are. FP8 block-scaled tensors are dequantised as they are read (loading.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.student.zero3 import torch_linear
from ds_moekd.teacher.families import Family, check_activation, get_family
from ds_moekd.teacher.loading import CheckpointReader, find_block_prefix, read_local_experts
from ds_moekd.teacher.moe_block import ActiveRouting, ExpertParallelMoE
from ds_moekd.teacher.placement import ExpertPlacement, contiguous_placement
from ds_moekd.teacher.routers import make_router
from ds_moekd.teacher.routing import NativeTopK, RouterSpec, RoutingPolicy

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
        checkpoint: tuple[str, tuple[int, int]],
    ):
        super().__init__()
        self.model = model
        self.family = family
        self.groups = groups
        self._checkpoint = checkpoint  # (path, FP8 block size): where `place_experts` reads experts again
        # The blocks are registered inside self.model; a tuple attribute is not registered twice.
        self._moe_blocks = tuple(moe_blocks)
        self.bytes_read = bytes_read  # everything this rank read from the checkpoint
        self.expert_bytes_read = expert_bytes_read  # the expert weights among them
        self._recomputes_layers = False  # router_training switched activation checkpointing on

    @classmethod
    def from_pretrained(
        cls, path: str, *, groups: ParallelGroups | None = None, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu", placement: ExpertPlacement | None = None,
    ) -> MoETeacher:
        """This rank's part of the teacher at `path`: the replicated weights and its EP rank's
        experts, each read from the checkpoint straight onto `device` in `dtype`. `placement`: which
        experts each EP rank holds in each MoE layer (None: contiguous blocks of N/E_p)."""
        groups = ParallelGroups.single() if groups is None else groups
        family, config, fp8_block = _read_config(path)
        shape = family.expert_shape(config, 0)
        if shape.num_experts % groups.ep_size != 0:
            divisors = [d for d in range(1, shape.num_experts + 1) if shape.num_experts % d == 0]
            raise ValueError(
                f"{path}: {shape.num_experts} experts cannot be split over teacher.ep_size={groups.ep_size} "
                f"ranks; choose an EP size that divides {shape.num_experts} (one of {divisors})"
            )
        router = family.router_spec(config)

        with torch.device("meta"):
            model = (
                LlamaForCausalLM(config).to(dtype)
                if family.make_config is not None
                else AutoModelForCausalLM.from_config(config, dtype=dtype)
            )
        with CheckpointReader(path, fp8_block=fp8_block, device=device) as reader:
            moe_blocks, expert_bytes_read = _install_ep_blocks(
                model, reader, family, router, placement, groups, dtype
            )
            _load_replicated_weights(model, reader, dtype)
            bytes_read = reader.bytes_read
        _rebuild_meta_buffers(model, torch.device(device))
        model.eval().requires_grad_(False)
        logger.info(
            "teacher %s: %d MoE layers, experts %s of %d on EP rank %d/%d, read %.1f MB (%.1f MB experts)",
            path,
            len(moe_blocks),
            f"{list(moe_blocks[0].expert_ids)} in every layer" if placement is None
            else f"per layer {[list(b.expert_ids) for b in moe_blocks]}",
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
            checkpoint=(path, fp8_block),
        ).eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        routing: RoutingPolicy | None = None,
        sequence_index: torch.Tensor | None = None,
        draw_index: torch.Tensor | None = None,
        *,
        cache=None,
        output_hidden_states: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        return_gate_diagnostics: bool = False,
        return_router_importance: bool = False,
        noise_key: tuple[int, int] | None = None,
    ):
        """Logits of `input_ids [B, S]` under `routing` (None: the family's native top-k).

        Returns transformers' causal-LM output (`.logits [B, S, V]`); with `output_hidden_states`
        also `.last_hidden_state [B, S, H]` (after the final norm, the input of lm_head);
        `logits_to_keep` is transformers' (0: every position; an empty index tensor: none); with
        `return_gate_diagnostics` also `.gate_diagnostics`, one `GateDiagnostics` per MoE layer; with
        `return_router_importance` also `.router_importance`, per MoE layer each expert's router
        probability summed over real tokens `[N]` (differentiable). `noise_key` (seed, step) keys the
        gate noise of noisy-gate families in train mode.

        Keys of counter-based routing randomness: `sequence_index [B]` is each row's global index
        in the data (default 0..B-1), `draw_index [B]` its teacher draw (default 0; KA's M draws
        are M copies of the batch with draw indices 0..M-1, see `forward_draws`), and a token's
        position counts only the real tokens before it (from `position_ids`, else from
        `attention_mask`), so padding changes no draw. Under EP every rank of the EP group must
        call this the same number of times (the MoE layers exchange tokens), with its own batch.
        """
        batch, seq = input_ids.shape
        device = input_ids.device
        mask_BS = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if position_ids is not None:
            key_positions_BS = position_ids.expand(batch, seq)
        else:  # with a cache the mask also covers the cached tokens: keep the last `seq` columns
            key_positions_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        sequences = sequence_index if sequence_index is not None else torch.arange(batch, device=device)
        draws = draw_index if draw_index is not None else torch.zeros(batch, dtype=torch.long, device=device)
        real_P = mask_BS[:, -seq:].reshape(-1).bool()
        # Under autograd (SAR's router step) every rank builds the same graph, padding or not: the
        # engine orders the backward's collectives and checkpoint recomputes by graph structure.
        all_real = not torch.is_grad_enabled() and bool(real_P.all())
        real_T = None if all_real else real_P.nonzero()[:, 0]

        def real(keys_BS: torch.Tensor) -> torch.Tensor:
            keys_P = keys_BS.reshape(-1)
            return keys_P if real_T is None else keys_P[real_T]

        active = ActiveRouting(
            policy=NativeTopK() if routing is None else routing,
            sequence_T=real(sequences.to(device)[:, None].expand(batch, seq)),
            position_T=real(key_positions_BS),
            draw_T=real(draws.to(device)[:, None].expand(batch, seq)),
            real_T=real_T,
            diagnostics=[] if return_gate_diagnostics else None,
            importance=[] if return_router_importance else None,
            noise_key=noise_key,
        )
        for block in self._moe_blocks:
            block.active = active
        try:
            with torch_linear():  # the teacher holds no ZeRO-3 parameters
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=cache is not None,
                    output_hidden_states=output_hidden_states,
                    logits_to_keep=logits_to_keep,
                )
        finally:
            # A forward with gradients (SAR's router step) keeps its routing set: activation
            # checkpointing recomputes the MoE layers during the backward. The next forward replaces it.
            if not torch.is_grad_enabled():
                for block in self._moe_blocks:
                    block.active = None
        if output_hidden_states:
            out.last_hidden_state = out.hidden_states[-1]
        if return_gate_diagnostics:
            out.gate_diagnostics = active.diagnostics
        if return_router_importance:
            out.router_importance = active.importance
        return out

    def router_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable router weights (gate networks, noise weights; never DeepSeek-V3's correction
        bias, which is not learned by gradient), by checkpoint tensor name."""
        return {
            f"{block.checkpoint_prefix}.gate.{name}": param
            for block in self._moe_blocks
            for name, param in block.gate.named_parameters()
            if name != "e_score_correction_bias"
        }

    @contextlib.contextmanager
    def router_training(self, activation_checkpointing: bool):
        """Train mode for a router step (noisy gates add their noise), eval mode again afterwards
        whatever happens; with `activation_checkpointing` the decoder layers are recomputed in the
        backward (docs/methods/sar.md)."""
        if activation_checkpointing and not self._recomputes_layers:
            # A recomputed EP layer runs collectives, so every rank recomputes whole layers: torch's
            # early stop would end where this rank's saved tensors do.
            self.model.gradient_checkpointing_enable({"use_reentrant": False, "early_stop": False})
            self._recomputes_layers = True
        self.train()
        try:
            yield
        finally:
            self.eval()

    def forward_draws(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        routing: RoutingPolicy,
        num_draws: int,
        sequence_index: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        fused_head: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`num_draws` independent routing draws of the batch as ONE batched forward (what training's
        teacher step and `ds-moekd bench ka` run): the batch stacked M times, row m·B + b keyed by
        draw index m and `sequence_index[b]` (default 0..B-1).

        Returns logits `[M, B, S, V]`; with `fused_head` the lm_head is skipped and it returns (final
        hidden states `[M, B, S, H]`, lm_head weight `[V, H]`), for losses that form the logits one
        token chunk at a time (kernels/divergence.py). Packed batches pass `position_ids` (and no mask).
        """
        batch = input_ids.shape[0]
        device = input_ids.device
        sequences = sequence_index if sequence_index is not None else torch.arange(batch, device=device)
        out = self(
            input_ids.repeat(num_draws, 1),
            attention_mask=None if attention_mask is None else attention_mask.repeat(num_draws, 1),
            position_ids=None if position_ids is None else position_ids.repeat(num_draws, 1),
            routing=routing,
            sequence_index=sequences.repeat(num_draws),
            draw_index=torch.arange(num_draws, device=device).repeat_interleave(batch),
            output_hidden_states=fused_head,
            # no positions: transformers skips the lm_head
            logits_to_keep=torch.empty(0, dtype=torch.long, device=device) if fused_head else 0,
        )
        if fused_head:
            return out.last_hidden_state.unflatten(0, (num_draws, batch)), self.get_output_embeddings().weight
        return out.logits.unflatten(0, (num_draws, batch))

    def decoding_forward(self, routing: RoutingPolicy | None = None) -> TeacherDecodingForward:
        """This teacher under `routing` (None: native top-k) as the decoder's forward
        (ds_moekd/decoding.py): every rank of the EP group decodes in lockstep."""
        return TeacherDecodingForward(self, routing)

    def get_output_embeddings(self) -> torch.nn.Module:
        """The lm_head (replicated on every rank)."""
        return self.model.get_output_embeddings()

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
        """This rank's experts in the first MoE layer (in every layer under the contiguous placement)."""
        return list(self._moe_blocks[0].expert_ids)

    @property
    def placement(self) -> ExpertPlacement:
        return ExpertPlacement(layers=tuple(b.slots for b in self._moe_blocks), num_experts=self.num_experts)

    def place_experts(self, placement: ExpertPlacement) -> None:
        """Hold the experts `placement` gives this rank, read again from the checkpoint (block by
        block: the old experts of a layer are dropped before its new ones are read). Every rank of the
        EP group must pass the same placement; no collective runs here."""
        _check_placement(placement, len(self._moe_blocks), self.num_experts, self.ep_size)
        path, fp8_block = self._checkpoint
        weight = self._moe_blocks[0].w_down_EIH
        with CheckpointReader(path, fp8_block=fp8_block, device=weight.device) as reader:
            for block, slots in zip(self._moe_blocks, placement.layers):
                shape = self.family.expert_shape(self.config, block.layer_index)
                block.w_gate_up_EHJ = block.w_down_EIH = None  # free this layer's experts first
                w_gate_up_EHJ, w_down_EIH = read_local_experts(
                    reader, self.family, block.checkpoint_prefix, shape, slots[self.groups.ep_rank], weight.dtype
                )
                block.hold_experts(slots, w_gate_up_EHJ, w_down_EIH)
            self.bytes_read += reader.bytes_read
            self.expert_bytes_read += reader.bytes_read

    @property
    def expert_param_bytes(self) -> int:
        """Bytes of expert weights this rank holds (all MoE layers)."""
        return sum(
            t.numel() * t.element_size() for b in self._moe_blocks for t in (b.w_gate_up_EHJ, b.w_down_EIH)
        )


class TeacherDecodingForward:
    """One decoding forward of the teacher (the decoder's `Forward`, ds_moekd/decoding.py): the last
    position's logits and the KV cache. Its MoE layers exchange tokens over the EP group, so that
    group decodes in lockstep; each row's routing draws are keyed by its example key."""

    def __init__(self, teacher: MoETeacher, routing: RoutingPolicy | None):
        self.teacher, self.routing = teacher, routing
        self.device = next(teacher.parameters()).device
        self.lockstep_group = teacher.groups.ep_group

    def __call__(self, input_ids_BS, attention_mask_BS, position_ids_BS, keys_B, cache):
        cache = DynamicCache(config=self.teacher.config) if cache is None else cache
        out = self.teacher(input_ids_BS, attention_mask_BS, position_ids_BS, routing=self.routing,
                           sequence_index=keys_B, cache=cache, logits_to_keep=1)
        return out.logits[:, -1], cache


def _read_config(path: str) -> tuple[Family, PretrainedConfig, tuple[int, int]]:
    """The family, transformers config and FP8 block size of a checkpoint, from config.json alone
    (no remote code)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(
            f"{path}: no config.json; the teacher path must be a Hugging Face checkpoint directory"
        )
    with open(config_path) as f:
        raw = json.load(f)
    family = get_family(raw.get("model_type"), path)
    config = family.make_config(raw) if family.make_config is not None else AutoConfig.from_pretrained(path)
    # FP8 weights are dequantised on load (loading.py); the skeleton is an ordinary float model.
    quantization = raw.get("quantization_config") or {}
    if quantization and quantization.get("quant_method") != "fp8":
        raise ValueError(
            f"{path}/config.json: quantization_config.quant_method={quantization.get('quant_method')!r}; "
            "the teacher reads unquantised or FP8 block-scaled (quant_method 'fp8') checkpoints"
        )
    config.__dict__.pop("quantization_config", None)
    check_activation(config, path)
    return family, config, tuple(quantization.get("weight_block_size", (128, 128)))


def _install_ep_blocks(
    model: PreTrainedModel,
    reader: CheckpointReader,
    family: Family,
    router: RouterSpec,
    placement: ExpertPlacement | None,
    groups: ParallelGroups,
    dtype: torch.dtype,
) -> tuple[list[ExpertParallelMoE], int]:
    """Replace each of the family's sparse MoE blocks by an EP block holding this rank's experts of
    `placement` (None: contiguous); returns them and the expert bytes read."""
    config = model.config
    blocks = [(name, module) for name, module in model.named_modules()
              if type(module).__name__ == family.sparse_block_class]
    if not blocks:
        raise ValueError(
            f"{reader.path}: the {family.model_type} model built from config.json has no "
            f"{family.sparse_block_class}; nothing to run expert-parallel"
        )
    placement = placement or contiguous_placement(len(blocks), router.num_experts, groups.ep_size)
    _check_placement(placement, len(blocks), router.num_experts, groups.ep_size)
    moe_blocks, expert_bytes_read = [], 0
    for (name, module), slots in zip(blocks, placement.layers):
        layer_prefix, _, attr = name.rpartition(".")  # "model.layers.3", "mlp"
        layer_index = int(layer_prefix.rsplit(".", 1)[1])
        block_prefix = find_block_prefix(reader, family, layer_prefix)
        shape = family.expert_shape(config, layer_index)
        before = reader.bytes_read
        w_gate_up_EHJ, w_down_EIH = read_local_experts(
            reader, family, block_prefix, shape, slots[groups.ep_rank], dtype
        )
        expert_bytes_read += reader.bytes_read - before
        with torch.device("meta"):
            gate = make_router(family.router_kind, config, shape.num_experts, dtype)
        shared = [
            (attr_name, getattr(module, attr_name))
            for attr_name in (family.shared_expert_attr, family.shared_expert_gate_attr)
            if attr_name is not None
        ]
        block = ExpertParallelMoE(
            layer_index=layer_index,
            router=router,
            gate=gate,
            w_gate_up_EHJ=w_gate_up_EHJ,
            w_down_EIH=w_down_EIH,
            groups=groups,
            slots=slots,
            shared_expert=shared[0] if shared else None,
            shared_expert_gate=shared[1] if len(shared) > 1 else None,
            checkpoint_prefix=block_prefix,
        )
        _load_block_weights(block, reader, block_prefix, dtype)
        setattr(model.get_submodule(layer_prefix), attr, block)
        moe_blocks.append(block)
        reader.close()  # a block's checkpoint pages leave this process's memory before the next is read
    return moe_blocks, expert_bytes_read


def _check_placement(placement: ExpertPlacement, layers: int, num_experts: int, ep_size: int) -> None:
    if (len(placement.layers), placement.num_experts, placement.ep_size) != (layers, num_experts, ep_size):
        raise ValueError(
            f"expert placement for {len(placement.layers)} MoE layers of {placement.num_experts} experts over "
            f"{placement.ep_size} ranks; this teacher has {layers} MoE layers of {num_experts} experts at EP size {ep_size}"
        )


def _load_block_weights(block: ExpertParallelMoE, reader: CheckpointReader, block_prefix: str, dtype) -> None:
    """Router and shared-expert weights of one block, by their checkpoint names under `block_prefix`
    (which may differ from the in-model name, e.g. Mixtral's `block_sparse_moe`)."""
    for name, param in list(block.named_parameters()):
        if param.device.type != "meta":
            continue
        # Routers computed in fp32 (DeepSeek) keep fp32 weights, as transformers declares them.
        tensor = reader.read(
            f"{block_prefix}.{name}", dtype=param.dtype if param.dtype == torch.float32 else dtype
        )
        if list(tensor.shape) != list(param.shape):
            raise ValueError(
                f"{reader.path}: {block_prefix}.{name} has shape {list(tensor.shape)}, "
                f"config.json implies {list(param.shape)}"
            )
        _set_parameter(block, name, nn.Parameter(tensor, requires_grad=False))


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


def _rebuild_meta_buffers(model: PreTrainedModel, device: torch.device) -> None:
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
        with torch.device(device):  # rotary tables are small: computed where they are used
            setattr(model.get_submodule(parent_name), attr, type(module)(config=module.config))
