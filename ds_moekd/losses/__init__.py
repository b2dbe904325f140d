from ds_moekd.losses.divergences import forward_kl, generalized_jsd, reverse_kl, token_cross_entropy
from ds_moekd.losses.objective import LossTerms
from ds_moekd.losses.scaling import backward_scale, global_token_count

__all__ = [
    "LossTerms",
    "backward_scale",
    "forward_kl",
    "generalized_jsd",
    "global_token_count",
    "reverse_kl",
    "token_cross_entropy",
]
