"""Byte-level BPE tokenizer for the demo, trained on the training split only.

Prompts and responses are tokenized separately (and trained on separately) so the prompt/response
boundary never falls inside a token: generation starts exactly where training responses start.
Pre-tokenization keeps each fixed piece of the prompt template whole (so it compresses to a
few tokens), isolates each digit (numbers stay compositional for arithmetic) and otherwise splits
into words, so no token ever spans two content words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ds_moekd.data.template import alpaca_prompt

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def _template_pieces() -> list[str]:
    """The fixed text around the instruction and input, read from the template itself."""
    with_input = alpaca_prompt("\x00", "\x01").replace("\x01", "\x00").split("\x00")
    without_input = alpaca_prompt("\x00").split("\x00")
    # Longest first: the regex alternation takes the first alternative that matches.
    return sorted({p for p in with_input + without_input if p}, key=lambda p: (-len(p), p))


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    pattern = "|".join(re.escape(p) for p in _template_pieces()) + r"|\d| ?[^\s\d]+|\s+"
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def training_texts(records: Iterable[dict]) -> Iterable[str]:
    for record in records:
        yield alpaca_prompt(record["instruction"], record["input"])
        yield record["output"]


def train_tokenizer(train_records: list[dict], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts(train_records), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="left",  # generation pads on the left; training builds its own batches
        model_max_length=512,
    )
