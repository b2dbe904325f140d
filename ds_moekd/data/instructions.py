"""One instruction record, whatever format it was read from (ds_moekd.data.formats reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class InstructionRecord:
    instruction: str
    input: str
    references: tuple[str, ...]  # one or more acceptable outputs
    meta: dict = field(default_factory=dict, compare=False)  # e.g. family / category
    # A conversation's turns before its final reply ({role, content} dicts); empty for instruction
    # records. When set, the prompt is these turns through the chat template (ds_moekd/data/chat.py).
    messages: tuple[dict, ...] = ()

    @property
    def output(self) -> str:
        return self.references[0]
