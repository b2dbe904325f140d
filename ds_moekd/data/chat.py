"""Prompt text for one record, identical for teacher and student (both read the same token ids).

Instruction records (minillm, dolly, ...) render with the Alpaca template (template.py), or with
`template="chat"` as one user turn through the tokenizer's chat template. Conversations (`messages`
records) always render through the chat template; a tokenizer without one uses `ALPACA_CHAT_TEMPLATE`,
which renders a single user turn exactly as `alpaca_prompt(instruction)` does. Training installs the
template it used on the student's tokenizer (`install_template`), so the exported student carries its
prompt format and `pipeline("text-generation")` on chat messages prompts it the way it was trained
(docs/data.md).
"""

from __future__ import annotations

from ds_moekd.data.instructions import InstructionRecord
from ds_moekd.data.template import alpaca_prompt

TEMPLATES = ("alpaca", "chat")

# A system message replaces the Alpaca preamble; each user turn is an instruction, each assistant
# turn its response followed by EOS. Later turns start after a blank line, so a conversation's
# text always begins with the text of its prompt.
ALPACA_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}{%- set turns = messages[1:] -%}"
    "{%- else -%}Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}{{ '\\n\\n### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)


def chat_template(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or ALPACA_CHAT_TEMPLATE


def install_template(tokenizer, *, conversations: bool, template: str) -> str:
    """Set on `tokenizer` the chat template matching how this run renders prompts; returns its name.

    Conversations or `template="chat"` keep the tokenizer's own chat template (Alpaca's if it has
    none); Alpaca-rendered instruction records install the Alpaca one, so the exported student's
    chat template is the format it was trained on."""
    if (conversations or template == "chat") and getattr(tokenizer, "chat_template", None):
        return "the student's chat template"
    if template == "chat" and not conversations:
        raise ValueError("data.template=chat: the student's tokenizer has no chat template; use alpaca")
    tokenizer.chat_template = ALPACA_CHAT_TEMPLATE
    return "the Alpaca template"


def prompt_text(record: InstructionRecord, tokenizer, template: str = "alpaca") -> str:
    if record.messages:
        return tokenizer.apply_chat_template(list(record.messages), chat_template=chat_template(tokenizer),
                                             tokenize=False, add_generation_prompt=True)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template chat: the tokenizer has no chat template; use the alpaca template")
        content = f"{record.instruction}\n\n{record.input}" if record.input.strip() else record.instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return alpaca_prompt(record.instruction, record.input)


def response_text(record: InstructionRecord, tokenizer, prompt: str) -> str:
    """The text the student learns after `prompt`: the output, or for a conversation everything its
    chat template writes after the prompt (the reply and the template's end-of-turn tokens)."""
    if not record.messages:
        return record.output
    full = tokenizer.apply_chat_template([*record.messages, {"role": "assistant", "content": record.output}],
                                         chat_template=chat_template(tokenizer), tokenize=False)
    if not full.startswith(prompt):
        where = record.meta.get("where", "a conversation")
        raise ValueError(f"{where}: the chat template renders the conversation with a different prefix than "
                         "its prompt, so the reply cannot be cut off it")
    return full[len(prompt):]


def end_with_eos(ids: list[int], eos_token_id: int) -> list[int]:
    """Response ids ending at their first EOS (a chat template may write one), or with EOS appended."""
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else [*ids, eos_token_id]
