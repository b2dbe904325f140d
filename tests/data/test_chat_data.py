"""Chat (`messages`) data, prompt templates and dataset splits (ds_moekd/data/chat.py, formats.py)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from ds_moekd.data.batching import tokenize_records
from ds_moekd.data.chat import ALPACA_CHAT_TEMPLATE, install_template
from ds_moekd.data.formats import load_eval_data
from ds_moekd.data.template import alpaca_prompt
from ds_moekd.eval.runner import prompt_ids
from ds_moekd.modelfiles.assets import resolve_path

# A ChatML-style template whose end of turn is the tokenizer's EOS (as in many instruct models).
CHATML = ("{%- for m in messages -%}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}")

CONVERSATION = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"},
                {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green"}]


def tokenizer(chat_template=None):
    tok = AutoTokenizer.from_pretrained(resolve_path("demo:student"))
    tok.chat_template = chat_template
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_alpaca_chat_template_renders_the_alpaca_prompt():
    tok = tokenizer()
    user = [{"role": "user", "content": "Add 2 and 3."}]
    prompt = tok.apply_chat_template(user, chat_template=ALPACA_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert prompt == alpaca_prompt("Add 2 and 3.")
    full = tok.apply_chat_template([*user, {"role": "assistant", "content": "5"}], chat_template=ALPACA_CHAT_TEMPLATE,
                                   tokenize=False)
    assert full == prompt + "5" + tok.eos_token


def test_chat_records_load_and_name_the_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION, "category": "colours"}])
    data = load_eval_data(path)
    assert data.format == "chat"
    (record,) = data.records
    assert record.messages == tuple(CONVERSATION[:-1]) and record.output == "Green"
    assert record.instruction == "Another one?" and record.meta["category"] == "colours"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'messages' must .* end with the assistant's reply"):
        load_eval_data(bad)
    bad = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"role.jsonl:1: messages\[0\] must be"):
        load_eval_data(bad)


@pytest.mark.parametrize("template", [CHATML, None])
def test_conversations_tokenise_as_the_chat_template_writes_them(tmp_path, template):
    tok = tokenizer(template)
    records = load_eval_data(write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])).records
    (example,) = tokenize_records(records, tok, max_prompt_tokens=256, max_response_tokens=256).examples
    rendered = tok.apply_chat_template(CONVERSATION, chat_template=template or ALPACA_CHAT_TEMPLATE, tokenize=False)
    # Reference: the whole conversation as the template writes it, up to the reply's EOS.
    expected = rendered[: rendered.rindex(tok.eos_token) + len(tok.eos_token)]
    assert tok.decode(example.prompt_ids + example.response_ids) == expected
    assert example.response_ids[-1] == tok.eos_token_id and example.response_ids.count(tok.eos_token_id) == 1
    assert tok.decode(example.response_ids) == "Green" + tok.eos_token
    # Evaluation prompts the model with exactly the training prompt.
    assert prompt_ids(records[0], tok, "alpaca") == example.prompt_ids


def test_long_conversations_are_dropped_and_counted(tmp_path):
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    records = load_eval_data(write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"messages": long}])).records
    dataset = tokenize_records(records, tokenizer(), max_prompt_tokens=256, max_response_tokens=2)
    assert dataset.dropped_long_prompts == 1 and len(dataset.examples[0].response_ids) == 2


def test_install_template_stores_the_format_the_run_used():
    tok = tokenizer()
    assert install_template(tok, conversations=False, template="alpaca") == "the Alpaca template"
    assert tok.chat_template == ALPACA_CHAT_TEMPLATE
    tok = tokenizer(CHATML)
    assert install_template(tok, conversations=True, template="alpaca") == "the student's chat template"
    assert tok.chat_template == CHATML
    assert install_template(tok, conversations=False, template="alpaca") == "the Alpaca template"
    with pytest.raises(ValueError, match="data.template=chat: the student's tokenizer has no chat template"):
        install_template(tokenizer(), conversations=False, template="chat")


def test_saved_dataset_dict_needs_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["a", "b"], "input": ["", ""], "output": ["1", "2"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()})}
                         ).save_to_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\]; choose one \(data.split"):
        load_eval_data(str(tmp_path / "dd"))
    assert [r.output for r in load_eval_data(str(tmp_path / "dd"), split="train").records] == ["1", "2"]
    assert [r.output for r in load_eval_data(str(tmp_path / "dd"), split="test").records] == ["1"]
