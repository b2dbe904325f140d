"""Resolve `demo:` paths to the embedded demo assets shipped inside the package."""

from __future__ import annotations

from pathlib import Path

DEMO_PREFIX = "demo:"
DEMO_ASSETS = Path(__file__).resolve().parent / "demo" / "assets"


def resolve_path(path: str) -> Path:
    """`demo:teacher` -> the shipped demo teacher; anything else is an ordinary path."""
    if path.startswith(DEMO_PREFIX):
        resolved = DEMO_ASSETS / path[len(DEMO_PREFIX) :]
        if not resolved.exists():
            raise FileNotFoundError(
                f"{path!r}: the embedded demo assets are missing at {resolved}; "
                "rebuild them with `ds-moekd demo build --out <dir>` and point the config there"
            )
        return resolved
    return Path(path)
