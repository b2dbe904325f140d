"""What tests share: the repo root, tiny checkpoints, rank pools and processes, a simulated device, a
local Hugging Face cache, plain-torch references. Test files import from here, never from each other."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
