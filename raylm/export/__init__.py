"""Exports of raylm checkpoints to other ecosystems' formats (see `raylm.export.hf`)."""

import importlib

from raylm.errors import ConfigError

FORMATS = ("hf", "gguf")


class MissingExtra(ConfigError):
    """An export format whose optional packages are not installed."""


def exporter(fmt: str, dtype: str | None, prefix: str = "--") -> tuple[str, object]:
    """(dtype, export function) for the format `fmt`, the dtype defaulting to the format's
    own; what is wrong or missing is a ConfigError naming `<prefix>format` or `<prefix>dtype`
    (the CLI's options, a recipe's keys), so a recipe refuses them when it loads."""
    if fmt not in FORMATS:
        raise ConfigError(f"{prefix}format={fmt!r}: choose from {list(FORMATS)}")
    try:
        if fmt == "hf":
            from raylm.export.hf import _DTYPES as dtypes, export_run
        else:
            from raylm.export.gguf import _QTYPES as dtypes, export_run_gguf as export_run
            # What the export imports only when it runs (after loading the checkpoint, or
            # at the end of a recipe's training): llama.cpp's writer, and protobuf for the
            # tokenizer's piece types.
            for module in ("gguf", "sentencepiece.sentencepiece_model_pb2"):
                importlib.import_module(module)
    except ImportError as e:
        name = "protobuf" if (e.name or "").startswith("google") else e.name  # protobuf's module is google.protobuf
        raise MissingExtra(f"{prefix}format={fmt} needs {name}: pip install -e '.[export]'") from None
    dtype = dtype or ("float32" if fmt == "hf" else "f32")
    if dtype not in dtypes:
        raise ConfigError(f"{prefix}dtype={dtype!r}: format {fmt} takes one of {list(dtypes)}")
    return dtype, export_run
