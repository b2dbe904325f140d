"""`ds-moekd convert SRC DST`: rewrite a model folder's pickle weights (`pytorch_model.bin`) as
safetensors, the only format ds-moekd loads by default (docs/reliability.md, "Safety").

Loading a pickle file can run code: convert only files you trust. The model class comes from
transformers itself (never remote code from the folder); tokenizer and generation files are copied.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ds_moekd.modelfiles.checks import PICKLE_NAMES, check_model_files
from ds_moekd.run.atomic import replace_dir
from ds_moekd.run.errors import UserError

_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def convert(src: Path, dst: Path) -> None:
    from transformers import AutoModelForCausalLM

    if not src.is_dir() or not any((src / name).exists() for name in PICKLE_NAMES):
        raise UserError(f"{src}: not a model folder with pickle weights ({' or '.join(PICKLE_NAMES)})")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst} exists and is not empty; choose a new folder")
    model = AutoModelForCausalLM.from_pretrained(src, use_safetensors=False, trust_remote_code=False,
                                                 dtype="auto")
    with replace_dir(dst) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in _COPIED:
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)
    check_model_files(dst, "convert output")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="model folder with pytorch_model.bin")
    parser.add_argument("dst", type=Path, help="new folder for the safetensors copy")
    args = parser.parse_args(argv)
    convert(args.src, args.dst)
    print(f"wrote {args.dst} (safetensors)")
