"""Small DeepSpeed ZeRO-3 engines for step-equivalence tests, and their whole parameters."""

from __future__ import annotations

import torch

from ds_moekd.runtime.dist import init_distributed


def sgd_engine(model, gas: int, lr: float):
    import deepspeed

    init_distributed()

    ds_config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default
    }
    # SGD makes the update proportional to the gradient, so a mis-scaled loss shows up
    # (Adam's first step is ~lr*sign(g) and would hide a factor of 2).
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def full_params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
