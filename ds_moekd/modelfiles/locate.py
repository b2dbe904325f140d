"""Model locations: a folder, `demo:student`/`demo:teacher`, or a Hugging Face model id.

An id (`org/name`, optionally `org/name@revision`) resolves to its snapshot folder in the local
Hugging Face cache only: runs never download (every rank would race for the network, and many
clusters have none). Fetch a model once beforehand with `hf download org/name` (docs/models.md).
"""

from __future__ import annotations

from pathlib import Path

from ds_moekd.modelfiles.assets import DEMO_PREFIX, resolve_path


def looks_like_model_id(value: str) -> bool:
    """`org/name` or `name`, not a path: no leading `/`, `.` or `~`, no `demo:`, at most one slash."""
    return not value.startswith((DEMO_PREFIX, "/", ".", "~")) and value.count("/") <= 1 and not Path(value).exists()


def resolve_model(value: str) -> Path:
    """The folder holding the model `value` (a folder, `demo:...`, or a cached Hugging Face id)."""
    if not looks_like_model_id(value):
        return resolve_path(value)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = value.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=constants.HF_HUB_CACHE,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as exc:
        raise FileNotFoundError(
            f"{value!r} is neither a folder nor a Hugging Face model id in the local cache {constants.HF_HUB_CACHE} "
            f"(set HF_HOME or HF_HUB_CACHE to use another); download it once with `hf download {repo_id}` "
            f"({type(exc).__name__})"
        ) from None
