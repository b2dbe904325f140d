"""Checks of model folders before anything loads them (docs/reliability.md, "Errors", "Safety").

- Weights are safetensors: pickle files (`pytorch_model.bin`) can run code when loaded, so they
  are refused unless the user allows them (`student.allow_pickle_weights`); `ds-moekd convert`
  rewrites such a folder as safetensors.
- Every shard the index names exists and is as long as its own header says (a truncated copy
  otherwise loads garbage or fails deep inside a loader).
- The teacher speaks the student's vocabulary: the same token -> id map for every student token,
  and at least as many output rows (extra, padded lm_head rows are fine).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ds_moekd.run.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a safetensors checkpoint folder (from its index when sharded)."""
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise UserError(f"{index}: not a valid safetensors index ({exc})") from None
        return [path / name for name in names]
    return sorted(path.glob("*.safetensors"))


def check_safetensors_file(file: Path) -> None:
    """Raise if `file` is missing, or shorter or longer than its header says."""
    if not file.is_file():
        raise UserError(f"{file}: missing shard (named in {SAFETENSORS_INDEX}); copy or download it again")
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_len is None or header_len > size - 8:
            raise UserError(f"{file}: truncated or not a safetensors file ({size} bytes); copy it again")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise UserError(f"{file}: unreadable safetensors header; the file is damaged, copy it again") from None
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + data_end:
        raise UserError(f"{file}: {size} bytes, but its header needs {8 + header_len + data_end}: the file is "
                        "truncated or damaged; copy or download it again")


def check_model_files(path: Path, field: str, allow_pickle: bool = False) -> None:
    """The folder of config field `field` holds complete safetensors weights (or allowed pickle ones)."""
    if not path.is_dir():
        raise UserError(f"{field}: {path} is not a model folder")
    files = safetensors_files(path)
    if files:
        for file in files:
            check_safetensors_file(file)
        return
    pickles = [name for name in PICKLE_NAMES if (path / name).exists()]
    if not pickles:
        raise UserError(f"{field}: {path} holds no model weights (*.safetensors)")
    if not allow_pickle:
        switch = "student.allow_pickle_weights=true" if field == "student.path" else None
        raise UserError(f"{field}: {path} holds pickle weights ({pickles[0]}), which can run code "
                        f"when loaded; convert them with `ds-moekd convert {path} OUT_DIR`"
                        + (f" or set {switch} if you trust the file" if switch else ""))


def _vocab_size(path: Path) -> int | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")


def check_teacher_vocabulary(teacher_path: Path, tokenizer) -> None:
    """Refuse a teacher whose tokenizer or output layer does not match the student's tokenizer."""
    n = len(tokenizer)
    rows = _vocab_size(teacher_path)
    if rows is not None and rows < n:
        raise UserError(f"teacher.path {teacher_path} has vocab_size {rows}, smaller than the student tokenizer's "
                        f"{n} tokens: teacher and student must share one tokenizer")
    if not any((teacher_path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return  # nothing to compare (only the sizes above)
    from transformers import AutoTokenizer

    teacher_vocab = AutoTokenizer.from_pretrained(teacher_path).get_vocab()
    student_vocab = tokenizer.get_vocab()
    differ = [tok for tok, i in student_vocab.items() if teacher_vocab.get(tok) != i]
    if differ:
        tok = sorted(differ, key=student_vocab.get)[0]
        raise UserError(f"the teacher's tokenizer ({teacher_path}, {len(teacher_vocab)} tokens) differs from the "
                        f"student's ({n} tokens): {len(differ)} student tokens map elsewhere, e.g. {tok!r} is "
                        f"{student_vocab[tok]} in the student and {teacher_vocab.get(tok)} in the teacher; "
                        "distillation needs one shared tokenizer")
