"""What a teacher cache was made from, as digests a run can compare (docs/teacher-cache.md).

The teacher is named by its config, its weights index (or each weight file's header) and a sample
of every weight file's bytes (first and last MiB): two random initialisations of one architecture
share config and headers but not bytes, and a multi-GB teacher is not read whole to name it. The
tokenizer by its vocabulary, special tokens and chat template; the data by its file's bytes; the
tokenised examples by their token ids, which catches any other change (a template, a truncation).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ds_moekd.data.batching import TokenizedDataset
from ds_moekd.run.atomic import file_sha256

SAMPLE_BYTES = 1 << 20


def _sample(path: Path) -> bytes:
    """A weight file's header, first and last MiB."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(SAMPLE_BYTES)
        f.seek(max(0, size - SAMPLE_BYTES))
        return head + f.read(SAMPLE_BYTES) + str(size).encode()


def teacher_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode() + _sample(path))
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    facts = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def data_digest(source: Path | str) -> str:
    """A data file's bytes, a saved dataset folder's files, or (a hub dataset) its name."""
    path = Path(source)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode() + file_sha256(file).encode())
        return digest.hexdigest()
    return hashlib.sha256(str(source).encode()).hexdigest()


def examples_digest(dataset: TokenizedDataset) -> str:
    digest = hashlib.sha256()
    for ex in dataset.examples:
        digest.update(json.dumps([ex.prompt_ids, ex.response_ids]).encode())
    return digest.hexdigest()
