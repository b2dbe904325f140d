from ds_moekd.losses.divergences import forward_kl, reverse_kl, token_cross_entropy
from ds_moekd.losses.scaling import backward_scale, global_token_count

__all__ = ["forward_kl", "reverse_kl", "token_cross_entropy", "global_token_count", "backward_scale"]
