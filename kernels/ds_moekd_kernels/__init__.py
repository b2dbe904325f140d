"""Expert FFN kernels (installed as `ds_moekd.kernels`; importable without DeepSpeed or Triton).

Weight layout for a group of E SwiGLU experts (hidden H, expert width I):
  w_gate_up_EHJ  [E, H, 2I]  columns [0, I) are the gate projection, [I, 2I) the up projection
  w_down_EIH     [E, I, H]
so an expert computes  (silu(x @ W[:, :I]) * (x @ W[:, I:])) @ w_down.
Tokens arrive already grouped by expert: rows of expert e follow those of expert e-1, with
`tokens_per_expert_E` giving the group sizes.

Entry points (backend "auto" | torch | triton | torch_grouped_mm | megablocks, see backends.py):
  grouped_experts   sparse path on rows grouped by expert (what the EP block calls)
  dense_experts     dense all-expert path with per-token gate weights (ALL / SAR / KA)
  lm_head_divergence  chunked fused lm_head + forward KL / reverse KL / generalised JSD
  lm_head_loss        the same plus cross-entropy on the targets, weighted, in one pass (training)
  divergence        the same divergences on logits already formed
  SparseTeacher     a top-k teacher (an offline cache's targets) for both, forward KL over k + 1 outcomes
"""

from .backends import (
    BACKENDS,
    choose_backend,
    configure,
    dense_experts,
    divergence,
    grouped_experts,
    lm_head_divergence,
    lm_head_loss,
    unavailable_reason,
)
from .divergence import SparseTeacher
from .reference import dense_swiglu_reference, grouped_swiglu_reference

__all__ = [
    "BACKENDS",
    "SparseTeacher",
    "choose_backend",
    "configure",
    "dense_experts",
    "dense_swiglu_reference",
    "divergence",
    "grouped_experts",
    "grouped_swiglu_reference",
    "lm_head_divergence",
    "lm_head_loss",
    "unavailable_reason",
]
