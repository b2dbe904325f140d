import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_moekd.data.synthetic import read_jsonl
from ds_moekd.demo.build import build_demo, main
from ds_moekd.demo.tokenizer import train_tokenizer

# Only the timings may differ between two builds with the same seed and threads.
TIMING_FILES = {"timings.json", "README.md"}


@pytest.fixture(scope="module")
def two_tiny_builds(tmp_path_factory):
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    build_demo(first, seed=0, size="tiny", threads=1, log=lambda _: None)
    main(["--out", str(second), "--seed", "0", "--size", "tiny", "--threads", "1"])
    return first, second


def _files(root):
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_builds_write_identical_files(two_tiny_builds):
    first, second = map(_files, two_tiny_builds)
    assert first.keys() == second.keys()
    expected = {"data/train.jsonl", "data/valid.jsonl", "data/test.jsonl", "scores.json",
                "teacher/model.safetensors", "teacher/config.json", "teacher/generation_config.json",
                "teacher/tokenizer.json", "student/model.safetensors", "student/config.json"} | TIMING_FILES
    assert expected <= first.keys()
    differing = [name for name in first if name not in TIMING_FILES
                 and first[name].read_bytes() != second[name].read_bytes()]
    assert differing == []


def test_another_seed_gives_other_weights(two_tiny_builds, tmp_path):
    build_demo(tmp_path, seed=1, size="tiny", threads=1, log=lambda _: None)
    first = two_tiny_builds[0]
    assert (tmp_path / "teacher/model.safetensors").read_bytes() != (first / "teacher/model.safetensors").read_bytes()


def test_models_and_tokenizer_load_with_auto_classes(two_tiny_builds):
    root = two_tiny_builds[0]
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    student = AutoModelForCausalLM.from_pretrained(root / "student")
    tokenizer = AutoTokenizer.from_pretrained(root / "teacher")
    assert teacher.config.model_type == "mixtral" and student.config.model_type == "llama"
    assert teacher.config.num_experts_per_tok == 2 and teacher.config.num_local_experts == 4
    assert teacher.num_parameters() > student.num_parameters()
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert teacher.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("Add the two numbers.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], teacher.config.vocab_size)


def test_scores_cover_every_routing_and_family(two_tiny_builds):
    root = two_tiny_builds[0]
    scores = json.loads((root / "scores.json").read_text())
    assert set(scores["evaluations"]) == {"teacher_top2", "teacher_top3", "teacher_all4", "student", "student_sft_init"}
    assert not (root / "_student_init").exists()  # measured, not shipped
    routing = scores["teacher_routing"]
    assert len(routing["gate_mass"]) == 2 and all(0 < m < 1 for m in routing["gate_mass"])
    assert routing["native"]["kl_from_native"] == pytest.approx(0.0, abs=1e-6) and routing["all"]["kl_from_native"] > 0
    targets = scores["targets"]
    assert targets["min over layers of router mass outside the top-k"]["value"] == min(routing["gate_mass"])
    assert all(t["met"] == (t["value"] >= float(t["target"].split()[-1])) for t in targets.values())
    assert scores["torch_threads"] == 1
    families = {json.loads(line)["family"] for line in (root / "data/test.jsonl").read_text().splitlines()}
    for evaluation in scores["evaluations"].values():
        assert set(evaluation["per_family"]) == families
    for fractions in scores["expert_load"]["per_family"].values():
        assert len(fractions) == 4 and sum(fractions) == pytest.approx(1.0, abs=1e-3)
    assert json.loads((root / "timings.json").read_text())["total"] > 0


def test_unknown_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="size"):
        build_demo(tmp_path, size="huge")


def test_tokenizer_comes_from_the_training_split_alone(two_tiny_builds):
    root = two_tiny_builds[0]
    retrained = train_tokenizer(read_jsonl(root / "data/train.jsonl"))
    assert retrained.get_vocab() == AutoTokenizer.from_pretrained(root / "teacher").get_vocab()
    with_test = train_tokenizer(read_jsonl(root / "data/train.jsonl") + read_jsonl(root / "data/test.jsonl"))
    assert with_test.get_vocab() != retrained.get_vocab()  # the comparison can tell the difference
