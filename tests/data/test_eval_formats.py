"""Evaluation data loaders: every real file in ../shared/eval_data, plus fixtures for raw Dolly and S-NI."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import REPO

from ds_moekd.data.formats import load_eval_data
from ds_moekd.data.template import alpaca_prompt

EVAL_DATA = REPO.parent / "shared" / "eval_data"
real_data = pytest.mark.skipif(not EVAL_DATA.is_dir(), reason=f"real eval sets not found at {EVAL_DATA} "
                               "(CI and the dev machine have ../shared/eval_data beside the clone)")


@real_data
@pytest.mark.parametrize("name, count", [("dolly", 500), ("self-inst", 242), ("vicuna", 80), ("sinst/11_", 1694)])
def test_minillm_processed_sets(name, count):
    path = EVAL_DATA / "minillm_processed" / name / "valid.jsonl"
    data = load_eval_data(str(path))
    assert data.format == "minillm" and len(data.records) == count
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for record, row in zip(data.records, rows):
        # MiniLLM's own prompt field is exactly our template: teacher and student see MiniLLM's prompts.
        assert alpaca_prompt(record.instruction, record.input) == row["prompt"]
        assert list(record.references) == (row["output"] if isinstance(row["output"], list) else [row["output"]])
    categories = Counter(r.meta["category"] for r in data.records)
    if name == "dolly":
        assert categories["open_qa"] == 141 and categories["creative_writing"] == 25 and len(categories) == 8
    if name == "sinst/11_":
        assert len(categories) == 37
        assert any(len(r.references) > 1 for r in data.records)  # lists of references survive


@real_data
def test_raw_self_instruct_one_record_per_instance():
    data = load_eval_data(str(EVAL_DATA / "self_instruct" / "user_oriented_instructions.jsonl"))
    assert data.format == "self-instruct" and len(data.records) == 252
    assert data.records[0].meta == {"id": "user_oriented_task_0", "category": "Grammarly"}
    # MiniLLM's Self-Inst set is 242 of these 252 (instruction, input, output) triples.
    raw = {(r.instruction, r.input, r.output) for r in data.records}
    processed = load_eval_data(str(EVAL_DATA / "minillm_processed" / "self-inst" / "valid.jsonl")).records
    assert all((r.instruction, r.input, r.output) in raw for r in processed)


@real_data
@pytest.mark.parametrize("questions", ["question.jsonl", "legacy_eval_table/question.jsonl"])
@pytest.mark.parametrize("answers, count", [
    ("legacy_eval_table/answer_gpt35.jsonl", 80),  # `text` answers, all 80
    ("legacy_eval_table/answer_bard.jsonl", 80),
    ("reference_answer_gpt-4.jsonl", 10),  # `choices[0].turns`, questions 61-70 only
    ("pr3404_unmerged/model_answer_gpt-4o.jsonl", 80),
])
def test_vicuna_questions_joined_with_answers(questions, answers, count):
    data = load_eval_data(str(EVAL_DATA / "vicuna" / questions), references=str(EVAL_DATA / "vicuna" / answers))
    assert data.format == "vicuna" and len(data.records) == count and data.unreferenced == 80 - count
    assert all(r.references[0] and r.instruction and r.meta["category"] for r in data.records)
    first = data.records[0]
    assert first.input == "" and first.meta["question_id"] == (61 if count == 10 else 1)
    if answers.endswith("gpt35.jsonl"):
        # MiniLLM's Vicuna references are exactly the gpt-3.5 answers.
        processed = load_eval_data(str(EVAL_DATA / "minillm_processed" / "vicuna" / "valid.jsonl")).records
        assert {(r.instruction, r.output) for r in processed} == {(r.instruction, r.output) for r in data.records}


@real_data
def test_vicuna_questions_need_answers():
    with pytest.raises(ValueError, match="--references"):
        load_eval_data(str(EVAL_DATA / "vicuna" / "question.jsonl"))


def test_raw_dolly_fixture(tmp_path):
    path = tmp_path / "databricks-dolly-15k.jsonl"
    rows = [
        {"instruction": "When did X happen?", "context": "X happened in 1990.", "response": "1990",
         "category": "closed_qa"},
        {"instruction": "Name a fruit.", "context": "", "response": "An apple.", "category": "brainstorming"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_eval_data(str(path))
    assert data.format == "dolly"
    assert [(r.instruction, r.input, r.references, r.meta["category"]) for r in data.records] == [
        ("When did X happen?", "X happened in 1990.", ("1990",), "closed_qa"),
        ("Name a fruit.", "", ("An apple.",), "brainstorming"),
    ]


def test_raw_sni_task_json_file_and_folder(tmp_path):
    task = {
        "Definition": ["Answer with the capital of the given country."],
        "Positive Examples": [], "Categories": ["Question Answering"],
        "Instances": [{"id": "t1-a", "input": "France", "output": ["Paris", "paris"]},
                      {"id": "t1-b", "input": "Peru", "output": ["Lima"]}],
    }
    (tmp_path / "task001_capitals.json").write_text(json.dumps(task))
    (tmp_path / "task002_more.json").write_text(json.dumps({**task, "Instances": task["Instances"][:1]}))
    one = load_eval_data(str(tmp_path / "task001_capitals.json"))
    assert one.format == "sni" and [r.references for r in one.records] == [("Paris", "paris"), ("Lima",)]
    assert one.records[0].meta == {"category": "task001_capitals", "id": "t1-a"}
    both = load_eval_data(str(tmp_path))
    assert Counter(r.meta["category"] for r in both.records) == {"task001_capitals": 2, "task002_more": 1}


def test_saved_dataset_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["a", "b"], "input": ["", "x"], "output": ["1", "2"], "topic": ["t", "u"]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ds"))
    data = load_eval_data(str(tmp_path / "ds"))
    assert data.format == "minillm"
    assert [(r.instruction, r.input, r.output, r.meta["category"]) for r in data.records] == [
        ("a", "", "1", "t"), ("b", "x", "2", "u")]


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x", "output": ', "not valid JSON"),
    ('{"instruction": "x", "output": 3}', "'output' must be a string"),
    ('{"instruction": "x", "input": "y"}', "cannot tell the data format"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "i", "input": "", "output": "o"})
    path.write_text(good + "\n" + line + "\n" if "cannot" not in message else line + "\n")
    lineno = 1 if "cannot" in message else 2
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{lineno}: .*{message}"):
        load_eval_data(str(path))
