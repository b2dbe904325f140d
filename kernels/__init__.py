"""Expert FFN kernels (installed as `ds_moekd.kernels`; importable without DeepSpeed).

Weight layout for a group of E SwiGLU experts (hidden H, expert width I):
  w_gate_up_EHJ  [E, H, 2I]  columns [0, I) are the gate projection, [I, 2I) the up projection
  w_down_EIH     [E, I, H]
so an expert computes  (silu(x @ W[:, :I]) * (x @ W[:, I:])) @ w_down.
Tokens arrive already grouped by expert: rows of expert e follow those of expert e-1, with
`tokens_per_expert_E` giving the group sizes.
"""

from .reference import dense_swiglu_reference, grouped_swiglu_reference

__all__ = ["dense_swiglu_reference", "grouped_swiglu_reference"]
