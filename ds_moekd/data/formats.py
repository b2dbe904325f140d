"""Instruction data in the formats of docs/data.md, from local files or 🤗 `datasets`, into `InstructionRecord`s.

Formats (auto-detected from the first row's keys):
  minillm        `instruction`, `input`, `output` (a string, or a list of references for S-NI)
  dolly          `instruction`, `context`, `response`, `category`
  self-instruct  `instruction`, `instances: [{input, output}]` (one record per instance)
  vicuna         questions (`question_id`, `category`, `text` or `turns`) joined by `question_id` with a
                 separate answers file (`text`, or `choices[0].turns[0]`)
  sni            Super-NaturalInstructions task JSON (`Definition`, `Instances: [{input, output: [..]}]`)
  chat           `messages: [{role, content}, ...]` ending with the assistant's reply (system/user/assistant
                 roles); the earlier turns are the prompt, rendered with the chat template (data/chat.py)

Every record's `meta["category"]` holds what the data groups by (Dolly category, Self-Instruct
`motivation_app`, Vicuna category, S-NI task), when the data has one. Errors name file:line
(or dataset[row]).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ds_moekd.data.instructions import InstructionRecord

FORMATS = ("minillm", "dolly", "self-instruct", "vicuna", "sni", "chat")

Row = tuple[str, dict]  # (where it came from, e.g. "file.jsonl:12", the row)


@dataclass(frozen=True)
class EvalData:
    records: list[InstructionRecord]
    format: str
    source: str
    # Vicuna questions that the answers file has no answer for: they cannot be scored.
    unreferenced: int = 0


def load_eval_data(source: str, *, format: str = "auto", references: str | None = None,
                   split: str | None = None) -> EvalData:
    """Load `source` (a JSONL/JSON file, a folder of S-NI task files, a saved dataset folder or a
    🤗 dataset name) in `format` ('auto' detects it); `references` is the Vicuna answers file."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected 'auto' or one of {FORMATS}")
    rows = list(_read_rows(source, split))
    if not rows:
        raise ValueError(f"{source}: no records")
    fmt = detect_format(*rows[0]) if format == "auto" else format
    if fmt == "vicuna":
        if references is None:
            if all(_has(row, "output") for _, row in rows):  # already joined (e.g. MiniLLM's Vicuna)
                return EvalData([_minillm(w, r) for w, r in rows], fmt, source)
            raise ValueError(f"{source}: Vicuna questions need an answers file: pass --references FILE")
        return _join_vicuna(rows, list(_read_rows(references, split)), source)
    if references is not None:
        raise ValueError(f"--references applies to Vicuna questions only, not to {fmt} data ({source})")
    parse = _PARSERS[fmt]
    return EvalData([record for where, row in rows for record in parse(where, row)], fmt, source)


def detect_format(where: str, row: dict) -> str:
    keys = set(row)
    if "messages" in keys:
        return "chat"
    if {"Definition", "Instances"} <= keys:
        return "sni"
    if "question_id" in keys:
        return "vicuna"
    if {"instruction", "instances"} <= keys:
        return "self-instruct"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "minillm"
    raise ValueError(f"{where}: cannot tell the data format from the keys {sorted(keys)}; "
                     f"pass --format (one of {FORMATS})")


# --- sources -------------------------------------------------------------------------------


def _read_rows(source: str, split: str | None) -> Iterator[Row]:
    path = Path(source)
    if path.is_file():
        yield from _read_json_file(path) if path.suffix == ".json" else _read_jsonl(path)
    elif path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        yield from _read_dataset(source, split, saved=True)
    elif path.is_dir():
        tasks = sorted(path.glob("*.json"))
        if not tasks:
            raise FileNotFoundError(f"{path}: neither a saved dataset (save_to_disk) nor a folder of task JSON files")
        for task in tasks:
            yield from _read_json_file(task)
    elif path.suffix in (".json", ".jsonl") or source.startswith((".", "/")):
        raise FileNotFoundError(f"data file {source} does not exist")
    else:
        yield from _read_dataset(source, split, saved=False)


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{lineno}", row


def _read_json_file(path: Path) -> Iterator[Row]:
    """A whole-file JSON: an S-NI task object (task name = file stem) or a list of row objects."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):
        yield str(path), {"task_name": path.stem, **data}
    elif isinstance(data, list):
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: item {i} is not a JSON object")
            yield f"{path}[{i}]", row
    else:
        raise ValueError(f"{path}: expected a JSON object or a list of objects")


def _read_dataset(source: str, split: str | None, *, saved: bool) -> Iterator[Row]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{source}: reading 🤗 datasets needs `pip install datasets` (extra: data)") from None
    data = datasets.load_from_disk(source) if saved else datasets.load_dataset(source)
    if isinstance(data, datasets.DatasetDict):
        if split is None:
            if len(data) != 1:
                raise ValueError(f"{source}: has splits {sorted(data)}; choose one (data.split in a run config, "
                                 "--split for ds-moekd eval)")
            split = next(iter(data))
        if split not in data:
            raise ValueError(f"{source}: no split {split!r}; it has {sorted(data)}")
        data = data[split]
    for i, row in enumerate(data):
        yield f"{source}[row {i}]", dict(row)


# --- row parsers ---------------------------------------------------------------------------


def _has(row: dict, key: str) -> bool:
    return key in row and row[key] is not None


def _need(where: str, row: dict, *keys: str) -> None:
    missing = [k for k in keys if not _has(row, k)]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; the row has {sorted(row)}")


def _text(where: str, value, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
    return value


def _references(where: str, value, name: str) -> tuple[str, ...]:
    refs = tuple(value) if isinstance(value, list) else (value,)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"{where}: '{name}' must be a string or a non-empty list of strings")
    return refs


def _minillm(where: str, row: dict) -> InstructionRecord:
    _need(where, row, "instruction", "output")
    meta = {k: v for k, v in row.items() if k not in ("instruction", "input", "output")}
    category = row.get("topic") or row.get("category") or row.get("family")
    if category is not None:
        meta["category"] = category
    return InstructionRecord(_text(where, row["instruction"], "instruction"), row.get("input") or "",
                             _references(where, row["output"], "output"), meta)


def _dolly(where: str, row: dict) -> list[InstructionRecord]:
    _need(where, row, "instruction", "response")
    meta = {"category": row["category"]} if _has(row, "category") else {}
    return [InstructionRecord(_text(where, row["instruction"], "instruction"), row.get("context") or "",
                              _references(where, row["response"], "response"), meta)]


def _self_instruct(where: str, row: dict) -> list[InstructionRecord]:
    _need(where, row, "instruction", "instances")
    if not isinstance(row["instances"], list) or not row["instances"]:
        raise ValueError(f"{where}: 'instances' must be a non-empty list of {{input, output}}")
    meta = {k: row[k] for k in ("id",) if k in row}
    if _has(row, "motivation_app"):
        meta["category"] = row["motivation_app"]
    records = []
    for i, inst in enumerate(row["instances"]):
        at = f"{where} instances[{i}]"
        _need(at, inst, "output")
        records.append(InstructionRecord(_text(where, row["instruction"], "instruction"), inst.get("input") or "",
                                         _references(at, inst["output"], "output"), meta))
    return records


def _sni(where: str, row: dict) -> list[InstructionRecord]:
    _need(where, row, "Definition", "Instances")
    definition = row["Definition"]
    instruction = " ".join(definition) if isinstance(definition, list) else _text(where, definition, "Definition")
    meta = {"category": row["task_name"]} if "task_name" in row else {}
    records = []
    for i, inst in enumerate(row["Instances"]):
        at = f"{where} Instances[{i}]"
        _need(at, inst, "input", "output")
        records.append(InstructionRecord(instruction, _text(at, inst["input"], "input"),
                                         _references(at, inst["output"], "output"),
                                         {**meta, **({"id": inst["id"]} if "id" in inst else {})}))
    return records


def _vicuna_question(where: str, row: dict) -> str:
    if _has(row, "text"):
        return _text(where, row["text"], "text")
    _need(where, row, "turns")
    if not isinstance(row["turns"], list) or not row["turns"]:
        raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
    return _text(where, row["turns"][0], "turns[0]")  # single-turn evaluation: the first turn


def _vicuna_answer(where: str, row: dict) -> str:
    if _has(row, "text"):
        return _text(where, row["text"], "text")
    try:
        return _text(where, row["choices"][0]["turns"][0], "choices[0].turns[0]")
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{where}: an answer needs 'text' or 'choices[0].turns[0]'") from None


def _join_vicuna(questions: list[Row], answers: list[Row], source: str) -> EvalData:
    by_id: dict[int, str] = {}
    for where, row in answers:
        _need(where, row, "question_id")
        if row["question_id"] in by_id:
            raise ValueError(f"{where}: a second answer to question_id {row['question_id']}")
        by_id[row["question_id"]] = _vicuna_answer(where, row)
    records, unreferenced = [], 0
    for where, row in questions:
        _need(where, row, "question_id")
        question = _vicuna_question(where, row)
        if row["question_id"] not in by_id:
            unreferenced += 1
            continue
        meta = {"question_id": row["question_id"]}
        if _has(row, "category"):
            meta["category"] = row["category"]
        records.append(InstructionRecord(question, "", (by_id[row["question_id"]],), meta))
    if not records:
        raise ValueError(f"{source}: none of its {len(questions)} questions has an answer in the references file")
    return EvalData(records, "vicuna", source, unreferenced=unreferenced)


ROLES = ("system", "user", "assistant")


def _chat(where: str, row: dict) -> list[InstructionRecord]:
    _need(where, row, "messages")
    turns = row["messages"]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be {{role: one of {ROLES}, content: a string}}, "
                             f"got {turn!r}")
    if turns[-1]["role"] != "assistant" or not any(t["role"] == "user" for t in turns):
        raise ValueError(f"{where}: 'messages' must hold a user turn and end with the assistant's reply")
    prompt = tuple({"role": t["role"], "content": t["content"]} for t in turns[:-1])
    last_user = next(t["content"] for t in reversed(prompt) if t["role"] == "user")
    meta = {"where": where, **({"category": row["category"]} if _has(row, "category") else {})}
    return [InstructionRecord(last_user, "", (turns[-1]["content"],), meta, messages=prompt)]


_PARSERS = {
    "chat": _chat,
    "minillm": lambda where, row: [_minillm(where, row)],
    "dolly": _dolly,
    "self-instruct": _self_instruct,
    "sni": _sni,
}
