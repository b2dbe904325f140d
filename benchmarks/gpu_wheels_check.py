"""Check that carried wheels plus a machine image satisfy ds-moekd and every carried wheel.

    python benchmarks/gpu_wheels_check.py WHEEL_DIR IMAGE_PACKAGES_TXT

Reads each wheel's METADATA and the project's pyproject dependencies, evaluates their environment
markers for CPython 3.12 on x86-64 Linux (extras not installed), and fails naming every
requirement that neither a carried wheel nor the image provides, and every package carried twice
(pip --no-deps would install both and break the install).
"""

from __future__ import annotations

import sys
import zipfile
from collections import Counter
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
REPO = Path(__file__).resolve().parents[1]


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def needed(requirement: str) -> str | None:
    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate(TARGET):
        return None
    return canonicalize_name(req.name)


def main(wheel_dir: str, image_list: str) -> int:
    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    carried = Counter(canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels)
    image = {canonicalize_name(line.strip()) for line in Path(image_list).read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = []
    for source, requirements in [("ds-moekd", project)] + [(w.name, wheel_requirements(w)) for w in wheels]:
        for requirement in requirements:
            name = needed(requirement)
            if name is not None and name not in carried and name not in image:
                missing.append(f"{source} needs {requirement}")
    twice = [name for name, count in carried.items() if count > 1]
    for line in missing + [f"{name} is carried twice" for name in twice]:
        print(f"gpu_wheels_check: {line}", file=sys.stderr)
    print(f"gpu_wheels_check: {len(wheels)} wheels; {'OK' if not (missing or twice) else 'INCOMPLETE'}",
          file=sys.stderr)
    return 1 if missing or twice else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
