"""Instruction records in the MiniLLM JSONL format (`instruction`, `input`, `output`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class InstructionRecord:
    instruction: str
    input: str
    references: tuple[str, ...]  # one or more acceptable outputs
    meta: dict = field(default_factory=dict, compare=False)  # e.g. family / category

    @property
    def output(self) -> str:
        return self.references[0]


def read_minillm_jsonl(path: str | Path) -> list[InstructionRecord]:
    """Read a MiniLLM-format JSONL file; a malformed line raises with file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
                raise ValueError(f"{path}:{lineno}: expected an object with 'instruction' and 'output'")
            output = row["output"]
            refs = tuple(output) if isinstance(output, list) else (output,)
            if not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"{path}:{lineno}: 'output' must be a string or a non-empty list of strings")
            meta = {k: v for k, v in row.items() if k not in ("instruction", "input", "output")}
            records.append(InstructionRecord(row["instruction"], row.get("input") or "", refs, meta))
    if not records:
        raise ValueError(f"{path}: no records")
    return records
