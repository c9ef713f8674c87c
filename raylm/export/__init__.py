"""Exports of raylm checkpoints to other ecosystems' formats (see `raylm.export.hf`)."""
