"""One instruction record, whatever format it was read from (ds_moekd.data.formats reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class InstructionRecord:
    instruction: str
    input: str
    references: tuple[str, ...]  # one or more acceptable outputs
    meta: dict = field(default_factory=dict, compare=False)  # e.g. family / category

    @property
    def output(self) -> str:
        return self.references[0]
