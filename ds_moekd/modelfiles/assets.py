"""Where the project's files are: `demo:` paths resolve to the demo assets shipped inside the
package; `CHECKOUT` is the source tree (ds_configs/ sits beside the package there)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
CHECKOUT = PACKAGE.parent
DS_CONFIGS = CHECKOUT / "ds_configs"
DEMO_PREFIX = "demo:"
DEMO_ASSETS = PACKAGE / "demo" / "assets"


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
