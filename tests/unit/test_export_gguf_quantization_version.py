"""The GGUF export's metadata keys are the ones llama.cpp's converter writes for `llama`."""

import pytest

gguf = pytest.importorskip("gguf")

from raylm.export.gguf import export_run_gguf  # noqa: E402


def _known_keys() -> set[str]:
    """Every key name in `gguf.Keys`, architecture keys spelled for `llama`."""
    known = set()
    for group in vars(gguf.Keys).values():
        for value in vars(group).values() if isinstance(group, type) else ():
            if isinstance(value, str) and "{" not in value.replace("{arch}", ""):
                known.add(value.replace("{arch}", "llama"))
    return known


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_gguf_metadata_has_the_converters_keys(tiny_run, tmp_path, dtype):
    """`general.quantization_version` is in every file convert_hf_to_gguf writes; readers other
    than llama.cpp (rustformers' llm, for one) refuse a quantized file without it. Every other
    key is one llama.cpp names, but for raylm's own provenance."""
    path = export_run_gguf(tiny_run, str(tmp_path / "m.gguf"), dtype=dtype)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert fields.get(gguf.Keys.General.QUANTIZATION_VERSION) == gguf.GGML_QUANT_VERSION
    assert sorted(k for k in fields if k not in _known_keys() and not k.startswith("raylm.")) == []
