"""The on-policy methods' steps on 2 real ranks (teacher EP-2, student ZeRO-3) against a one-process
plain-torch reference on the concatenated batch.

The reference decodes each rollout alone with full forwards (no KV cache, no padding, no lockstep),
scores the teacher on full logits (KA: one forward per draw), and updates with plain SGD, so a
mis-keyed sample, a mis-scaled loss or gradient, or a wrong router gradient under EP shows up.
Per-rank batches are uneven (3 rows on rank 0, 1 on rank 1, different prompt lengths) and rank 1's
rollout ends earlier than rank 0's, so the lockstep decoding must not deadlock.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import REPO
from helpers.tiny_moe_checkpoints import VOCAB, save_llama_moe, save_mixtral
from helpers.zero3_engines import full_params, sgd_engine
from transformers import LlamaConfig, LlamaForCausalLM

from ds_moekd.config import DataConfig, GKDConfig, KAConfig, RunConfig, SARConfig, StudentConfig, TeacherConfig
from ds_moekd.data.batching import TokenizedExample, collate
from ds_moekd.methods import Method, StepContext, build_method
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.runtime.rng import Sampling, sample_tokens
from ds_moekd.runtime.telemetry import Stopwatch
from ds_moekd.teacher import MoETeacher
from ds_moekd.teacher.routing import AllExperts, KASample, NativeTopK
from ds_moekd.train import train_step

STEP, SEED, MAX_NEW = 7, 1234, 6
LR, ROUTER_LR = 0.05, 0.5
# rank -> micro-batches -> global example ids
ONE_MICRO_BATCH = {0: [[5, 9, 2]], 1: [[7]]}
TWO_MICRO_BATCHES = {0: [[5, 9], [2]], 1: [[7], [11]]}


class Tokens:
    """What a method reads from a tokenizer."""

    pad_token_id = 0

    def __init__(self, eos: int):
        self.eos_token_id = eos

    def __len__(self):
        return VOCAB


def tiny_student() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def make_batches(layout=ONE_MICRO_BATCH):
    """rank -> micro-batches: distinct prompt lengths, global example ids."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for rank, micro in layout.items():
        out[rank] = []
        for ids in micro:
            examples = []
            for _ in ids:
                p = int(torch.randint(2, 7, (1,), generator=g))
                tokens = torch.randint(1, VOCAB, (p + 3,), generator=g).tolist()
                examples.append(TokenizedExample(tokens[:p], tokens[p:]))
            out[rank].append(collate(examples, pad_token_id=0, example_ids=ids))
    return out


def rows(batches, rank):
    """(prompt, example id) of every row of a rank, in order."""
    return [(p, k) for b in batches[rank] for p, k in zip(b.prompts(), b.example_ids.tolist())]


def run_config(method: str, rollout: str = "gather", **sections) -> RunConfig:
    return RunConfig(
        name="t", method=method, data=DataConfig(train_file="unused", micro_batch_size=2),
        teacher=TeacherConfig(path="unused"), student=StudentConfig(path="unused"),
        gkd=GKDConfig(max_new_tokens=MAX_NEW, rollout=rollout), **sections,
    )


# --- the reference, one process -----------------------------------------------------------------


@torch.no_grad()
def reference_rollout(student, prompt: list[int], key: int, eos: int | None) -> list[int]:
    ids = list(prompt)
    for _ in range(MAX_NEW):
        logits = student(torch.tensor([ids])).logits[:, -1]
        token = int(sample_tokens(logits, Sampling(), seed=SEED, step=STEP, keys_B=torch.tensor([key]),
                                  positions_B=torch.tensor([len(ids)]), vocab_limit=VOCAB))
        ids.append(token)
        if token == eos:
            break
    return ids[len(prompt):]


def uneven_eos(student, batches) -> int:
    """An EOS token that ends rank 1's rollout before every one of rank 0's."""
    def first(tokens, t):
        return tokens.index(t) if t in tokens else MAX_NEW

    rollouts = {r: [reference_rollout(student, p, k, None) for p, k in rows(batches, r)] for r in batches}
    for eos in rollouts[1][0]:
        if all(first(r1, eos) < min(first(r, eos) for r in rollouts[0]) for r1 in rollouts[1]):
            return eos
    raise AssertionError("no token ends rank 1's rollout first; change the seeds")


def rollout_batch(student, batches, eos):
    examples, ids = [], []
    for r in sorted(batches):
        for prompt, key in rows(batches, r):
            examples.append(TokenizedExample(prompt, reference_rollout(student, prompt, key, eos)))
            ids.append(key)
    return collate(examples, pad_token_id=0, example_ids=ids)


def teacher_log_probs(teacher, batch, routing, draw: int = 0):
    logits = teacher(batch.input_ids, attention_mask=batch.attention_mask, routing=routing,
                     sequence_index=batch.example_ids, draw_index=torch.full_like(batch.example_ids, draw)).logits
    return F.log_softmax(batch.response_rows(logits).float(), -1)


def reference_router_step(teacher, student, batch, balance_weight):
    """Plain torch: KL(p‖q) on full logits with the student fixed, balance from the gates' own outputs
    (forward hooks), plain SGD on the router weights."""
    routers = teacher.router_parameters()
    for p in routers.values():
        p.requires_grad_(True)
    gate_logits = []
    hooks = [b.gate.register_forward_hook(lambda _m, _i, out: gate_logits.append(out)) for b in teacher.moe_blocks]
    teacher.train()
    with torch.no_grad():
        log_q = F.log_softmax(batch.response_rows(student(batch.input_ids, attention_mask=batch.attention_mask)
                                                  .logits).float(), -1)
    logits = teacher(batch.input_ids, attention_mask=batch.attention_mask, routing=AllExperts(),
                     sequence_index=batch.example_ids, noise_key=(SEED, STEP)).logits
    log_p = F.log_softmax(batch.response_rows(logits).float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum() / batch.loss_mask.sum()
    # the teacher's MoE blocks route real tokens only: each gate saw exactly those
    assert all(g.shape[0] == int(batch.attention_mask.sum()) for g in gate_logits)
    importances = [torch.softmax(g.float(), -1).sum(0) for g in gate_logits]
    balance = sum(i.var() / (i.mean() ** 2 + 1e-10) for i in importances)
    (kl + balance_weight * balance).backward()
    for h in hooks:
        h.remove()
    teacher.eval()
    with torch.no_grad():
        for p in routers.values():
            p -= ROUTER_LR * p.grad
            p.grad = None
            p.requires_grad_(False)
    return {n: p.detach().clone() for n, p in routers.items()}


def reference_step(method, teacher_path, student_state, batches, eos, draws=1, balance_weight=0.01):
    student = tiny_student()
    student.load_state_dict(student_state)
    teacher = MoETeacher.from_pretrained(teacher_path)
    batch = rollout_batch(student, batches, eos)
    routers = reference_router_step(teacher, student, batch, balance_weight) if method == "sar" else None
    routing = {"gkd": NativeTopK(), "all": AllExperts(), "sar": AllExperts(),
               "ka": KASample(resample_prob=0.5, seed=SEED).at_step(STEP)}[method]
    log_q = F.log_softmax(batch.response_rows(student(batch.input_ids, attention_mask=batch.attention_mask)
                                              .logits).float(), -1)
    with torch.no_grad():
        log_ps = [teacher_log_probs(teacher, batch, routing, m) for m in range(draws)]
    rkl = sum((log_q.exp() * (log_q - log_p)).sum() for log_p in log_ps) / draws
    loss = rkl / batch.loss_mask.sum()
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= LR * p.grad
    return loss.item(), {n: p.detach() for n, p in student.named_parameters()}, routers, batch


# --- the real step, 2 ranks ---------------------------------------------------------------------


def _method_step_on_rank(method, teacher_path, student_state, batches, eos, sections, rollout, ep_size=2):
    rank = dist.get_rank()
    groups = ParallelGroups.create(ep_size=ep_size)
    student = tiny_student()
    student.load_state_dict(student_state)
    teacher = MoETeacher.from_pretrained(teacher_path, groups=groups)
    routers = teacher.router_parameters()
    frozen_before = {n: p.clone() for n, p in teacher.named_parameters() if all(p is not r for r in routers.values())}
    cfg = run_config(method, rollout, **sections)
    chosen = build_method(cfg, Tokens(eos))
    engine = sgd_engine(student, gas=len(batches[rank]), lr=LR)
    if method == "sar":  # SGD instead of AdamW: the update is then proportional to the router gradient
        trainer = chosen._trainer(teacher, groups)
        trainer.optimizer = torch.optim.SGD(list(trainer.masters.values()), lr=ROUTER_LR)
    loss_share, parts, extras = train_step(engine, teacher, chosen, batches[rank], groups, VOCAB, Stopwatch(),
                                           chunk=3, step=STEP)
    frozen_after = dict(teacher.named_parameters())
    return {
        "loss_share": loss_share, "extras": extras, "params": full_params(engine),
        "routers": {n: p.detach().clone() for n, p in routers.items()},
        "frozen_unchanged": all(torch.equal(t, frozen_after[n]) for n, t in frozen_before.items()),
    }


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("method_teachers")
    return {"mixtral": save_mixtral(str(root / "mixtral")), "llama_moe": save_llama_moe(str(root / "llama_moe"))}


CASES = [
    ("gkd", "mixtral", "gather", {}, ONE_MICRO_BATCH),
    ("gkd", "mixtral", "layerwise", {}, TWO_MICRO_BATCHES),
    ("all", "mixtral", "gather", {}, ONE_MICRO_BATCH),
    ("ka", "mixtral", "layerwise", {"ka": KAConfig(resample_prob=0.5, draws=2)}, ONE_MICRO_BATCH),
    # micro-batches draw exactly what the whole batch draws (keys: step and example id)
    ("ka", "mixtral", "gather", {"ka": KAConfig(resample_prob=0.5, draws=2)}, TWO_MICRO_BATCHES),
    ("ka", "llama_moe", "gather", {"ka": KAConfig(resample_prob=0.5, draws=3)}, ONE_MICRO_BATCH),
    ("sar", "llama_moe", "gather", {"sar": SARConfig(balance_weight=0.5, router_grad_clip=0.0)}, ONE_MICRO_BATCH),
    ("sar", "mixtral", "layerwise", {"sar": SARConfig(activation_checkpointing=False, router_grad_clip=0.0)},
     ONE_MICRO_BATCH),
]


@pytest.mark.parametrize("method,family,rollout,sections,layout", CASES)
def test_two_rank_method_step_equals_one_process_reference(rank_pool2, teachers, method, family, rollout, sections,
                                                             layout):
    student_state = tiny_student().state_dict()
    batches = make_batches(layout)
    probe = tiny_student()
    eos = uneven_eos(probe, batches)
    draws = sections["ka"].draws if "ka" in sections else 1
    balance = sections["sar"].balance_weight if "sar" in sections else 0.01
    results = rank_pool2.run(_method_step_on_rank, method, teachers[family], student_state, batches, eos, sections,
                             rollout, timeout_s=300)
    ref_loss, ref_params, ref_routers, ref_batch = reference_step(method, teachers[family], student_state, batches,
                                                                  eos, draws, balance)

    lengths = ref_batch.attention_mask.sum(1) - ref_batch.prompt_lengths
    rank0 = len(rows(batches, 0))
    assert lengths[rank0:].max() < lengths[:rank0].max()  # rank 1's rollouts ended first: lockstep had to hold
    assert sum(r["extras"]["tokens"] for r in results) == ref_batch.num_tokens
    assert sum(r["loss_share"] for r in results) == pytest.approx(ref_loss, rel=1e-5)
    before = tiny_student().state_dict()
    for name, expected in ref_params.items():
        assert not torch.equal(expected, before[name]) or name.endswith("norm.weight")
        torch.testing.assert_close(results[0]["params"][name], expected, rtol=1e-4, atol=1e-6, msg=name)
    assert all(r["frozen_unchanged"] for r in results)  # experts, attention, lm_head: bit-identical
    if method == "sar":
        original = MoETeacher.from_pretrained(teachers[family]).router_parameters()
        for name, expected in ref_routers.items():
            assert not torch.equal(expected, original[name]), name  # the router step moved it
            for r in results:  # both ranks hold the same updated routers
                torch.testing.assert_close(r["routers"][name], expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method,family,sections,micro_batches", [
    ("gkd", "mixtral", {}, [[5, 9], [2, 7]]), ("all", "mixtral", {}, [[5, 9], [2, 7]]),
    ("ka", "mixtral", {"ka": KAConfig(resample_prob=0.5, draws=2)}, [[5, 9], [2, 7]]),
    # SAR's router step runs per micro-batch (the authors' 1:1); the reference takes one on the batch
    ("sar", "llama_moe", {"sar": SARConfig(balance_weight=0.5, router_grad_clip=0.0)}, [[5, 9, 2, 7]]),
])
def test_one_process_method_step_equals_the_reference(one_process_group, teachers, method, family, sections,
                                                       micro_batches):
    """The quick tier's version of the test above: one rank, EP 1, one rollout ending early."""
    student_state = tiny_student().state_dict()
    batches = make_batches({0: micro_batches})
    eos = reference_rollout(tiny_student(), *rows(batches, 0)[0], None)[2]
    draws = sections["ka"].draws if "ka" in sections else 1
    balance = sections["sar"].balance_weight if "sar" in sections else 0.01
    result = _method_step_on_rank(method, teachers[family], student_state, batches, eos, sections, "gather",
                                  ep_size=1)
    ref_loss, ref_params, ref_routers, _ = reference_step(method, teachers[family], student_state, batches, eos,
                                                          draws, balance)
    assert result["loss_share"] == pytest.approx(ref_loss, rel=1e-5)
    for name, expected in ref_params.items():
        torch.testing.assert_close(result["params"][name], expected, rtol=1e-4, atol=1e-6, msg=name)
    assert result["frozen_unchanged"]
    for name, expected in (ref_routers or {}).items():
        torch.testing.assert_close(result["routers"][name], expected, rtol=1e-4, atol=1e-6, msg=name)


def _rollouts_on_rank(mode, batches, eos, student_state):
    rank = dist.get_rank()
    student = tiny_student()
    student.load_state_dict(student_state)
    engine = sgd_engine(student, gas=1, lr=LR)
    chosen = build_method(run_config("gkd", mode), Tokens(eos))
    ctx = StepContext(engine, None, ParallelGroups.create(ep_size=1), VOCAB, STEP, Stopwatch())
    out = chosen.responses(batches[rank][0], ctx)
    return out.responses(), out.example_ids.tolist(), out.prompts() == batches[rank][0].prompts()


def _teacher_responses_on_rank(teacher_path, batches, eos):
    rank = dist.get_rank()
    groups = ParallelGroups.create(ep_size=2)
    teacher = MoETeacher.from_pretrained(teacher_path, groups=groups)
    cfg = run_config("gkd")
    cfg = RunConfig(**{**cfg.__dict__, "gkd": GKDConfig(on_policy_fraction=0.0, seq_kd=True, max_new_tokens=MAX_NEW)})
    chosen = build_method(cfg, Tokens(eos))
    engine = sgd_engine(tiny_student(), gas=1, lr=LR)
    ctx = StepContext(engine, teacher, groups, VOCAB, STEP, Stopwatch())
    return chosen.responses(batches[rank][0], ctx).responses()


def test_seq_kd_takes_the_expert_parallel_teachers_own_samples(rank_pool2, teachers):
    """gkd.seq_kd with no on-policy rows: every response is sampled from the EP-2 teacher, exactly as
    a one-process, cache-free decode of the teacher samples it."""
    batches = make_batches()
    teacher = MoETeacher.from_pretrained(teachers["mixtral"])
    eos = uneven_eos(teacher, batches)
    results = rank_pool2.run(_teacher_responses_on_rank, teachers["mixtral"], batches, eos)
    for rank, responses in enumerate(results):
        assert responses == [reference_rollout(teacher, p, k, eos) for p, k in rows(batches, rank)]


def test_both_rollout_modes_give_the_reference_tokens(rank_pool2):
    """gather (whole student, hooks removed) and layerwise (ZeRO-3 gathers per layer, lockstep) sample
    exactly what a one-row, cache-free decode of the unsharded student samples."""
    student_state = tiny_student().state_dict()
    batches = make_batches()
    eos = uneven_eos(tiny_student(), batches)
    expected = {r: [reference_rollout(tiny_student(), p, k, eos) for p, k in rows(batches, r)] for r in batches}
    for mode in ("gather", "layerwise"):
        results = rank_pool2.run(_rollouts_on_rank, mode, batches, eos, student_state)
        for rank, (responses, ids, same_prompts) in enumerate(results):
            assert responses == expected[rank], mode
            assert ids == ONE_MICRO_BATCH[rank][0] and same_prompts


def test_on_policy_fraction_mixes_rollouts_and_dataset_responses_by_example():
    cfg = run_config("gkd")
    cfg = RunConfig(**{**cfg.__dict__, "gkd": GKDConfig(on_policy_fraction=0.5)})
    chosen = build_method(cfg, Tokens(3))
    batch = collate([TokenizedExample([1, 2], [3])] * 400, pad_token_id=0, example_ids=range(400))
    rows = chosen.on_policy_rows(batch, step=4)
    assert 150 < int(rows.sum()) < 250
    # a row's coin depends on its example id and the step only
    alone = collate([TokenizedExample([1, 2], [3])], pad_token_id=0, example_ids=[123])
    assert chosen.on_policy_rows(alone, step=4)[0] == rows[123]
    assert not torch.equal(chosen.on_policy_rows(batch, step=5), rows)


def test_each_methods_facts_agree_with_what_its_step_does():
    """The facts plan, config validation and the bench read (methods/registry.py) are the ones the
    training step acts on."""
    from transformers import AutoTokenizer

    from ds_moekd.config import load_config
    from ds_moekd.methods import METHODS, build_method
    from ds_moekd.modelfiles.locate import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("demo:student"))
    for name, cls in METHODS.items():
        cfg = load_config(REPO / "ds_configs" / "quickstart.yaml", [f"method={name}", "ka.draws=3"])
        method = build_method(cfg, tokenizer)
        targets = method.teacher_targets(step=7)
        assert targets.draws == cls.teacher_draws(cfg) == (3 if name == "ka" else 1), name
        assert type(targets.routing) is type(cls.teacher_routing(cfg)), name
        assert cls.on_policy == (type(method).responses is not Method.responses), name
        assert cls.supports_lora == cls.supports_packing == (not cls.on_policy), name
        assert cls.trains_teacher_routers == (type(method).before_student is not Method.before_student), name
    assert not METHODS["sft"].needs_teacher and all(c.needs_teacher for n, c in METHODS.items() if n != "sft")


def test_a_new_method_is_one_class_and_one_registry_entry(monkeypatch):
    """What docs/methods.md shows: a method declares its facts; config validation, plan and the step
    take it from there without naming it anywhere else."""
    from ds_moekd.config import ConfigError, load_config
    from ds_moekd.methods import registry
    from ds_moekd.methods.gkd import OnPolicyDistillation
    from ds_moekd.planning.plan import experts_per_token, teacher_draws
    from ds_moekd.planning.shapes import TeacherShape
    from ds_moekd.teacher.routing import KASample

    class HalfTheExperts(OnPolicyDistillation):
        name = "half"

        @classmethod
        def teacher_routing(cls, cfg):
            return KASample(resample_prob=0.0, num_selected=4, seed=cfg.train.seed)

        @classmethod
        def teacher_draws(cls, cfg):
            return 2

    quickstart = REPO / "ds_configs" / "quickstart.yaml"
    with pytest.raises(ConfigError, match="config field method='half' is invalid"):
        load_config(quickstart, ["method=half"])
    monkeypatch.setitem(registry.METHODS, "half", HalfTheExperts)
    cfg = load_config(quickstart, ["method=half"])
    teacher = TeacherShape(**{**_demo_teacher_shape().__dict__, "num_experts": 8, "top_k": 2})
    assert experts_per_token(cfg, teacher) == 4 and teacher_draws(cfg) == 2
    with pytest.raises(ConfigError, match="student.lora.r=8 is invalid: expected 0 for method 'half'"):
        load_config(quickstart, ["method=half", "student.lora.r=8"])


def _demo_teacher_shape():
    from ds_moekd.modelfiles.assets import resolve_path
    from ds_moekd.planning.shapes import teacher_shape

    return teacher_shape(resolve_path("demo:teacher"))
