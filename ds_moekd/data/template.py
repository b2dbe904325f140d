"""Prompt template: teacher and student always see the identical prompt text.

The Alpaca-style template MiniLLM uses for instruction data (with and without an input field).
"""

from __future__ import annotations

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input.strip():
        return _WITH_INPUT.format(instruction=instruction, input=input)
    return _NO_INPUT.format(instruction=instruction)
