from ds_moekd.losses.objective import LossTerms, token_cross_entropy
from ds_moekd.losses.scaling import backward_scale, global_token_count

__all__ = ["LossTerms", "backward_scale", "global_token_count", "token_cross_entropy"]
