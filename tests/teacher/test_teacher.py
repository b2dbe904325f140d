"""Loading the teacher: checkpoint layouts, API attributes and errors.

Per-family, per-policy parity is in test_teacher_families.py, expert parallelism in test_teacher_ep.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers.teacher_decoding import teacher_generate
from helpers.tiny_moe_checkpoints import NUM_EXPERTS, VOCAB, all_family_checkpoints
from transformers import AutoModelForCausalLM, LlamaConfig

from ds_moekd.methods import TeacherTargets
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.teacher import MoETeacher
from ds_moekd.teacher.routing import AllExperts, KASample

TOLERANCE = 1e-4  # fp32 logits


@pytest.fixture(scope="session")
def checkpoints() -> dict[str, str]:
    return all_family_checkpoints()


def padded_batch(seed: int, batch: int, seq: int, pads: dict[int, tuple[int, int]]):
    """Random ids with an attention mask; `pads` maps a row to its (left, right) padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row, (left, right) in pads.items():
        attention_mask[row, :left] = 0
        attention_mask[row, seq - right :] = 0
    return input_ids, attention_mask


BATCH = padded_batch(10, batch=3, seq=9, pads={1: (0, 4), 2: (3, 0)})


def reference_logits(path: str, input_ids, attention_mask) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def max_diff_on_tokens(a_BSV, b_BSV, attention_mask) -> float:
    real = attention_mask.bool()  # padded positions are not part of the output anyone uses
    return (a_BSV[real] - b_BSV[real]).abs().max().item()


@pytest.mark.parametrize("name", ["mixtral", "mixtral_fused_sharded"])
def test_single_rank_matches_transformers(checkpoints, name):
    path = checkpoints[name]
    teacher = MoETeacher.from_pretrained(path)
    input_ids, attention_mask = BATCH
    with torch.no_grad():
        logits = teacher(input_ids, attention_mask=attention_mask).logits
    assert (
        max_diff_on_tokens(logits, reference_logits(path, input_ids, attention_mask), attention_mask)
        <= TOLERANCE
    )
    assert teacher.ep_size == 1 and teacher.local_expert_ids == list(range(NUM_EXPERTS))
    assert teacher.num_experts == NUM_EXPERTS and teacher.top_k == teacher.config.num_experts_per_tok
    assert teacher.expert_bytes_read == teacher.expert_param_bytes  # fp32 checkpoint read as fp32
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_fused_and_per_expert_layouts_load_identical_weights(checkpoints):
    per_expert = MoETeacher.from_pretrained(checkpoints["mixtral"])
    fused = MoETeacher.from_pretrained(checkpoints["mixtral_fused_sharded"])
    for a, b in zip(per_expert.moe_blocks, fused.moe_blocks):
        assert torch.equal(a.w_gate_up_EHJ, b.w_gate_up_EHJ) and torch.equal(a.w_down_EIH, b.w_down_EIH)


def test_ep_size_must_divide_num_experts(checkpoints):
    # The check happens before any communication, so a 3-rank layout can be described in one process.
    three_ranks = ParallelGroups(rank=0, world_size=3, ep_size=3, ep_rank=0, ep_group=None, world_group=None)
    with pytest.raises(
        ValueError, match=r"8 experts cannot be split over teacher.ep_size=3.*one of \[1, 2, 4, 8\]"
    ):
        MoETeacher.from_pretrained(checkpoints["mixtral"], groups=three_ranks)


def test_unsupported_family_lists_supported_ones(tmp_path):
    LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path
    )
    with pytest.raises(
        ValueError,
        match=r"model_type 'llama' is not a supported teacher family; supported: deepseek_v2, deepseek_v3, "
        r"llama_moe, mixtral, olmoe, qwen2_moe, qwen3_moe",
    ):
        MoETeacher.from_pretrained(str(tmp_path))


def test_generation_never_picks_padded_vocabulary_rows(checkpoints):
    # Qwen/DeepSeek lm_heads have rows past the tokenizer; emulate one by limiting below the argmax.
    teacher = MoETeacher.from_pretrained(checkpoints["mixtral"])
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    first = teacher_generate(teacher, ids, max_new_tokens=1)[:, -1]
    limit = int(first.min())  # at least one row's favourite token falls outside the limit
    limited = teacher_generate(teacher, ids, max_new_tokens=4, vocab_limit=limit)[:, 5:]
    assert limit > 0 and int(limited.max()) < limit


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "llama_moe"])
def test_fused_head_teacher_scores_are_its_response_logits(checkpoints, name):
    """For the fused loss the teacher hands over (final hidden states, lm_head) instead of logits:
    the pair must give exactly its logits at the response positions (a vocabulary cut included)."""
    from ds_moekd.data.batching import TokenizedExample, collate
    from ds_moekd.train import teacher_scores

    teacher = MoETeacher.from_pretrained(checkpoints[name])
    g = torch.Generator().manual_seed(3)
    examples = [TokenizedExample(torch.randint(0, VOCAB, (p,), generator=g).tolist(),
                                 torch.randint(0, VOCAB, (r,), generator=g).tolist()) for p, r in ((3, 4), (5, 2))]
    batch = collate(examples, pad_token_id=0)
    vocab = VOCAB - 3
    with torch.no_grad():
        logits = teacher_scores(teacher, batch, vocab, False, TeacherTargets())
        hidden, weight = teacher_scores(teacher, batch, vocab, True, TeacherTargets())
    assert logits.shape == (6, vocab) and weight.shape[0] == vocab
    torch.testing.assert_close(hidden @ weight.t(), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mixtral", "llama_moe"])
def test_ka_batched_draws_equal_sequential_draws(checkpoints, name):
    """KA's M draws run as one batched forward; each must equal a forward of its own with that draw
    index, keyed by the rows' example ids, and the draws must differ from each other and per step."""
    from ds_moekd.data.batching import TokenizedExample, collate
    from ds_moekd.train import teacher_scores

    teacher = MoETeacher.from_pretrained(checkpoints[name])
    g = torch.Generator().manual_seed(4)
    examples = [TokenizedExample(torch.randint(0, VOCAB, (p,), generator=g).tolist(),
                                 torch.randint(0, VOCAB, (r,), generator=g).tolist()) for p, r in ((3, 4), (5, 2))]
    batch = collate(examples, pad_token_id=0, example_ids=[17, 4])
    policy = KASample(resample_prob=0.5, seed=3)
    with torch.no_grad():
        batched = teacher_scores(teacher, batch, VOCAB, False, TeacherTargets(policy.at_step(9), draws=3))
        hidden, _ = teacher_scores(teacher, batch, VOCAB, True, TeacherTargets(policy.at_step(9), draws=3))
        for draw in range(3):
            alone = teacher(batch.input_ids, attention_mask=batch.attention_mask, routing=policy.at_step(9),
                            sequence_index=batch.example_ids, draw_index=torch.full((2,), draw)).logits
            torch.testing.assert_close(batched[draw], batch.response_rows(alone), rtol=1e-5, atol=1e-5)
        next_step = teacher_scores(teacher, batch, VOCAB, False, TeacherTargets(policy.at_step(10), draws=3))
    assert batched.shape == (3, 6, VOCAB) and hidden.shape[:2] == (3, 6)
    assert not torch.allclose(batched[0], batched[1]) and not torch.allclose(batched, next_step)


def test_router_gradients_are_refused_on_the_sparse_path(checkpoints):
    teacher = MoETeacher.from_pretrained(checkpoints["mixtral"])
    for p in teacher.router_parameters().values():
        p.requires_grad_(True)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="router gradients need the dense dispatch"):
        teacher(ids)  # native top-2 of 8 experts: the sparse all-to-all
    assert teacher(ids, routing=AllExperts()).logits.requires_grad  # the dense path carries them


def test_noisy_gate_noise_is_keyed_by_example_and_step_only(checkpoints):
    """LLaMA-MoE's gate adds noise in train mode (SAR's router step); it is counter-based, so a row's
    noise does not depend on its batch neighbours and a recomputation draws the same noise."""
    teacher = MoETeacher.from_pretrained(checkpoints["llama_moe"])
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    examples = torch.tensor([4, 8, 15])
    with torch.no_grad():
        clean = teacher(ids, routing=AllExperts(), sequence_index=examples).logits
        teacher.train()
        noisy = teacher(ids, routing=AllExperts(), sequence_index=examples, noise_key=(1, 3)).logits
        again = teacher(ids, routing=AllExperts(), sequence_index=examples, noise_key=(1, 3)).logits
        alone = teacher(ids[1:2], routing=AllExperts(), sequence_index=examples[1:2], noise_key=(1, 3)).logits
        other_step = teacher(ids, routing=AllExperts(), sequence_index=examples, noise_key=(1, 4)).logits
        teacher.eval()
    assert not torch.allclose(noisy, clean) and not torch.allclose(noisy, other_step)
    torch.testing.assert_close(again, noisy, rtol=0, atol=0)
    # batch 1 against batch 3: other GEMM shapes round differently (1e-6 on AVX2); a noise keyed by
    # the batch would differ by the noise itself, orders of magnitude more
    torch.testing.assert_close(alone[0], noisy[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 3])
def test_sar_teacher_side_kl_is_the_full_logits_kl_with_gradients_to_the_teacher_only(chunk):
    import torch.nn.functional as F

    from ds_moekd.teacher.router_training import teacher_side_kl

    g = torch.Generator().manual_seed(0)
    tokens, vocab, teacher_hidden, student_hidden = 10, 37, 12, 8
    teacher_NH = torch.randn(tokens, teacher_hidden, generator=g).requires_grad_()
    teacher_head_VH = torch.randn(vocab, teacher_hidden, generator=g)
    student_NH = torch.randn(tokens, student_hidden, generator=g)
    student_head_VH = torch.randn(vocab, student_hidden, generator=g)

    ours = teacher_side_kl(teacher_NH, teacher_head_VH, student_NH, student_head_VH, chunk)
    (grad_ours,) = torch.autograd.grad(ours, teacher_NH)

    # plain torch on full logits: KL(p‖q) summed over tokens, p the teacher's distribution
    log_p = F.log_softmax(teacher_NH @ teacher_head_VH.t(), dim=-1)
    log_q = F.log_softmax(student_NH @ student_head_VH.t(), dim=-1)
    reference = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    (grad_reference,) = torch.autograd.grad(reference, teacher_NH)
    # the divergence rows run in fp32 (kernels/divergence.py)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-4, atol=1e-5)
