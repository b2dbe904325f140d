"""Offline teacher targets (docs/teacher-cache.md): `build` runs the teacher once over the training
split and keeps its top-k distributions in checksummed shards; `reader` serves them to off-policy
training with no teacher in memory."""
