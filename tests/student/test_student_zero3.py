"""The ZeRO-3 student on 2 real CPU ranks (gloo) against single-process references."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import REPO
from helpers.dense_teacher import DenseTeacher
from helpers.zero3_engines import full_params, sgd_engine
from transformers import LlamaConfig, LlamaForCausalLM

from ds_moekd.config import (
    DataConfig,
    KDConfig,
    OptimConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from ds_moekd.data.batching import TokenizedExample, collate
from ds_moekd.losses.fused import attach_fused_loss_head
from ds_moekd.methods import build_method
from ds_moekd.runtime.dist import ParallelGroups, init_distributed
from ds_moekd.runtime.telemetry import Stopwatch
from ds_moekd.student.engine import build_student_engine
from ds_moekd.student.zero3 import partitioned_parameter_counts
from ds_moekd.train import train_step

VOCAB = 48


def tiny_llama(seed: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def make_batches(seed: int, sizes: list[int]):
    """Distinct, uneven micro-batches: different sequence counts, prompt and response lengths."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n in sizes:
        examples = []
        for _ in range(n):
            p, r = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
            ids = torch.randint(2, VOCAB, (p + r,), generator=g).tolist()
            examples.append(TokenizedExample(ids[:p], ids[p:]))
        batches.append(collate(examples, pad_token_id=0))
    return batches


def run_config(model_dir, method: str, gas: int, lr: float = 0.05) -> RunConfig:
    return RunConfig(
        name="t", method=method, data=DataConfig(train_file="unused", micro_batch_size=2),
        teacher=TeacherConfig(path="unused"), student=StudentConfig(path=str(model_dir)),
        optim=OptimConfig(lr=lr, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0),
        train=TrainConfig(steps=5, gradient_accumulation_steps=gas), kd=KDConfig(),
    )


def _kd_step_on_rank(student_state, teacher_state, batches_per_rank, method, lr, fused):
    rank = dist.get_rank()
    groups = ParallelGroups.create(ep_size=1)
    student, teacher = tiny_llama(0), tiny_llama(1)
    student.load_state_dict(student_state)
    teacher.load_state_dict(teacher_state)
    micro_batches = batches_per_rank[rank]
    cfg = run_config("unused", method, gas=len(micro_batches))
    if fused:  # chunks of 3 tokens: the chunk boundaries fall inside sequences
        attach_fused_loss_head(student, vocab=VOCAB, terms=build_method(cfg).terms, chunk=3, backend="torch")
    engine = sgd_engine(student, gas=len(micro_batches), lr=lr)
    teacher = DenseTeacher(teacher) if method != "sft" else None  # any HF causal LM serves as the teacher here
    loss_share, parts_share, _ = train_step(engine, teacher, build_method(cfg), micro_batches, groups, VOCAB,
                                         Stopwatch(), chunk=3)
    local, total = partitioned_parameter_counts(engine)
    return {"loss_share": loss_share, "parts_share": parts_share, "params": full_params(engine), "local": local,
            "total": total}


def reference_step(student_state, teacher_state, batches, method, lr):
    """Plain torch, one process: mean over every response token of the concatenated batches."""
    student, teacher = tiny_llama(0), tiny_llama(1)
    student.load_state_dict(student_state)
    teacher.load_state_dict(teacher_state)
    ce_sum, kl_sum, count = 0.0, 0.0, 0
    for b in batches:
        mask = b.loss_mask.bool()
        s = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1][mask]
        with torch.no_grad():
            t = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1][mask]
        ce_sum = ce_sum + F.cross_entropy(s, b.targets[mask], reduction="sum")
        kl_sum = kl_sum + F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
        count += int(mask.sum())
    loss = ce_sum / count if method == "sft" else 0.5 * ce_sum / count + 0.5 * kl_sum / count
    parts = {"ce": ce_sum.item() / count} if method == "sft" else {"ce": ce_sum.item() / count, "kl": kl_sum.item() / count}
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= lr * p.grad
    return loss.item(), parts, {n: p.detach() for n, p in student.named_parameters()}


@pytest.mark.parametrize(
    "method,gas,fused", [("kd", 1, False), ("kd", 2, False), ("sft", 2, False), ("kd", 2, True), ("sft", 1, True)]
)
def test_two_rank_step_equals_one_rank_step_on_the_concatenated_batch(rank_pool2, method, gas, fused):
    """fused: the loss runs through the fused lm_head head (teacher as a hidden-state/lm_head pair),
    with the student's lm_head partitioned by ZeRO-3; the step must equal the full-logits reference."""
    student_state = tiny_llama(0).state_dict()
    teacher_state = tiny_llama(1).state_dict()
    # rank 0: micro-batches of 3 and 1 sequences; rank 1: 2 and 2 (different lengths too)
    sizes = {0: [3, 1], 1: [2, 2]} if gas == 2 else {0: [3], 1: [1]}
    batches = {r: make_batches(10 + r, sizes[r]) for r in (0, 1)}
    lr = 0.05
    results = rank_pool2.run(_kd_step_on_rank, student_state, teacher_state, batches, method, lr, fused)
    ref_loss, ref_parts, ref_params = reference_step(student_state, teacher_state, batches[0] + batches[1], method,
                                                     lr)

    assert sum(r["loss_share"] for r in results) == pytest.approx(ref_loss, rel=1e-5)
    assert set(results[0]["parts_share"]) == set(ref_parts)
    for name, value in ref_parts.items():
        assert sum(r["parts_share"][name] for r in results) == pytest.approx(value, rel=1e-5), name
    before = tiny_llama(0).state_dict()
    for name, expected in ref_params.items():
        assert not torch.equal(expected, before[name]) or name.endswith("norm.weight")
        torch.testing.assert_close(results[0]["params"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
    # ZeRO-3: each rank holds about half of the parameters
    assert results[0]["local"] + results[1]["local"] >= results[0]["total"]
    assert max(r["local"] for r in results) < 0.6 * results[0]["total"]


@pytest.mark.parametrize("method,fused", [("kd", False), ("sft", True)])
def test_one_process_step_equals_the_reference(one_process_group, method, fused):
    """The quick tier's version of the test above: one rank, two uneven micro-batches."""
    student_state, teacher_state = tiny_llama(0).state_dict(), tiny_llama(1).state_dict()
    batches = {0: make_batches(10, [3, 1])}
    (result,) = [_kd_step_on_rank(student_state, teacher_state, batches, method, 0.05, fused)]
    ref_loss, ref_parts, ref_params = reference_step(student_state, teacher_state, batches[0], method, 0.05)
    assert result["loss_share"] == pytest.approx(ref_loss, rel=1e-5)
    assert result["parts_share"] == pytest.approx(ref_parts, rel=1e-5)
    for name, expected in ref_params.items():
        torch.testing.assert_close(result["params"][name], expected, rtol=1e-5, atol=1e-6, msg=name)


def _adam_steps_on_fixed_batch(model_dir, repo_config, batches, steps):
    rank = dist.get_rank()
    groups = ParallelGroups.create(ep_size=1)
    cfg = run_config(model_dir, "sft", gas=1, lr=3e-3)
    cfg = dataclasses.replace(cfg, student=StudentConfig(path=str(model_dir), deepspeed_config=repo_config))
    engine = build_student_engine(model_dir, cfg, world_size=groups.world_size)
    before = full_params(engine)
    losses = []
    for _ in range(steps):
        share, _, _ = train_step(engine, None, build_method(cfg), [batches[rank]], groups, VOCAB, Stopwatch())
        total = torch.tensor([share])
        dist.all_reduce(total)
        losses.append(total.item())
    after = full_params(engine)
    changed = sum(not torch.equal(before[n], after[n]) for n in before)
    return {"losses": losses, "changed": changed, "n_params": len(before), "stage": engine.zero_optimization_stage()}


def test_zero3_student_from_repo_config_learns_a_fixed_batch(rank_pool2, tmp_path):
    model_dir = tmp_path / "student"
    tiny_llama(0).save_pretrained(model_dir)
    repo_config = str(REPO / "ds_configs" / "zero3_cpu.json")
    batches = make_batches(3, [3, 2])
    results = rank_pool2.run(_adam_steps_on_fixed_batch, model_dir, repo_config, batches, 8)
    losses = results[0]["losses"]
    assert results[0]["stage"] == 3
    assert results[0]["changed"] == results[0]["n_params"]
    assert losses[-1] < 0.8 * losses[0], losses


def _load_partitioned(model_dir):
    import deepspeed

    from ds_moekd.student.engine import _load_student

    init_distributed()
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model = _load_student(model_dir, ds_config, torch.float32)
    held = [(p.numel(), p.ds_tensor.numel(), p.ds_numel) for p in model.parameters()]
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
    return held, full


def test_zero3_student_loads_only_its_partition(rank_pool2, tmp_path):
    model_dir = tmp_path / "student"
    reference = tiny_llama(0)
    reference.save_pretrained(model_dir)
    results = rank_pool2.run(_load_partitioned, model_dir)
    for held, full in results:
        assert all(placeholder == 0 for placeholder, _, _ in held)  # nothing whole on any rank
        assert sum(local for _, local, _ in held) < 0.6 * sum(total for _, _, total in held)
        for name, tensor in reference.state_dict().items():
            torch.testing.assert_close(full[name], tensor, msg=name)  # the checkpoint's values, gathered


def _steps_counting_post_step_gathers(model_dir, coalesce: bool | None, steps: int = 3):
    """AdamW steps of a student with persistent and partitioned parameters; the all-gathers each
    `engine.step()` makes. coalesce None: the engine as build_student_engine makes it."""
    import deepspeed

    from ds_moekd.student.zero3 import coalesce_persistent_gather

    rank = dist.get_rank()
    groups = ParallelGroups.create(ep_size=1)
    cfg = run_config(model_dir, "sft", gas=1, lr=3e-3)
    batches = make_batches(5, [3, 2])
    if coalesce is None:
        repo_config = str(REPO / "ds_configs" / "zero3_cpu.json")
        cfg = dataclasses.replace(cfg, student=StudentConfig(path=str(model_dir), deepspeed_config=repo_config))
        engine = build_student_engine(model_dir, cfg, world_size=groups.world_size)
    else:
        ds_config = {
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
            # 32x32 projections and the embeddings stay partitioned; smaller matrices and norms persist
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
        }
        model = tiny_llama(0)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        if coalesce:
            assert coalesce_persistent_gather(engine.optimizer)
    persistent = len(engine.optimizer.persistent_parameters)
    counted = []
    # DeepSpeed holds its own reference to torch's all_gather_into_tensor; both that and ours end in
    # c10d's all_gather_single, which is looked up at call time
    c10d = dist.distributed_c10d
    original = c10d.all_gather_single

    def counting(*args, **kwargs):
        counted[-1] += 1
        return original(*args, **kwargs)

    for _ in range(steps):
        loss = engine(input_ids=batches[rank].input_ids, attention_mask=batches[rank].attention_mask,
                      labels=batches[rank].input_ids).loss
        engine.backward(loss)
        counted.append(0)
        c10d.all_gather_single = counting
        try:
            engine.step()
        finally:
            c10d.all_gather_single = original
    return {"params": full_params(engine), "gathers_per_step": counted, "persistent": persistent}


def test_persistent_parameters_are_gathered_in_one_exchange_with_the_same_result(rank_pool2, tmp_path):
    model_dir = tmp_path / "student"
    tiny_llama(0).save_pretrained(model_dir)
    per_param, coalesced, repo = (rank_pool2.run(_steps_counting_post_step_gathers, model_dir, c)
                                  for c in (False, True, None))
    persistent = per_param[0]["persistent"]
    assert 2 <= persistent < len(per_param[0]["params"])  # a mix of persistent and partitioned parameters
    assert per_param[0]["gathers_per_step"] == [persistent] * 3  # DeepSpeed: one exchange per parameter
    assert coalesced[0]["gathers_per_step"] == [1] * 3
    for rank in (0, 1):  # the same bytes, bit for bit, after three AdamW steps
        for name, value in per_param[rank]["params"].items():
            assert torch.equal(value, coalesced[rank]["params"][name]), name
    # the shipped CPU config keeps the whole tiny student persistent: one exchange instead of all of them
    assert repo[0]["persistent"] == len(repo[0]["params"])
    assert repo[0]["gathers_per_step"] == [1] * 3


def _linear_functions(model_dir):
    import torch.nn.functional as F
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

    from ds_moekd.student.engine import _load_student
    from ds_moekd.student.zero3 import torch_linear

    init_distributed()
    _load_student(model_dir, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}, torch.float32)
    before, replaced = Init.linear_bk, F.linear  # torch's own, kept by DeepSpeed; its replacement
    with torch.no_grad(), torch_linear():
        plain = F.linear
    with torch_linear():  # autograd on: a checkpointed layer must recompute with the same function
        with_grad = F.linear
    return {"replaced": replaced is not before, "plain": plain is before, "with_grad": with_grad is replaced,
            "restored": F.linear is replaced}


def test_forwards_without_autograd_use_torch_linear_not_zero3s(rank_pool2, tmp_path):
    model_dir = tmp_path / "student"
    tiny_llama(0).save_pretrained(model_dir)
    flags = rank_pool2.run(_linear_functions, model_dir)[0]
    assert flags == {"replaced": True, "plain": True, "with_grad": True, "restored": True}
