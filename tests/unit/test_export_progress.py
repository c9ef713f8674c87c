"""An export of a large model takes minutes (a 7B q8_0 GGUF, about 4.5 on this machine's
kind): it says how far it is on stderr, never stdout (`raylm export`'s stdout is its JSON).
The interval is 0 here, through the export's own parameter, so the test does not depend on
the clock; at the default a tiny export prints nothing."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

from raylm.export.gguf import export_gguf  # noqa: E402
from raylm.export.hf import export_hf  # noqa: E402
from tests.unit.test_export_gguf import _model, tok  # noqa: E402,F401 - the module's tokenizer fixture


def test_exports_report_progress_on_stderr(tok, tmp_path, capfd):  # noqa: F811
    model = _model(tok)
    export_hf(model, tok, {"step": 1}, str(tmp_path / "hf"), max_shard_bytes=20_000, progress_every_s=0)
    export_gguf(model, tok, {"step": 1}, str(tmp_path / "m.gguf"), "q8_0", progress_every_s=0)
    out, err = capfd.readouterr()
    assert "export:" not in out, out
    weights = [ln for ln in err.splitlines() if ln.startswith("export: weights ")]
    gguf = [ln for ln in err.splitlines() if ln.startswith("export: gguf ")]
    assert len(weights) > 1 and weights[-1].split()[2] == "100%", err  # a line a shard, the last one whole
    assert len(gguf) > 1 and gguf[-1].split()[2] == "100%" and "M params" in gguf[-1], err


def test_a_small_export_prints_no_progress_at_the_default_interval(tok, tmp_path, capfd):  # noqa: F811
    export_gguf(_model(tok), tok, {"step": 1}, str(tmp_path / "m.gguf"), "f16")
    assert "export:" not in "".join(capfd.readouterr()), "a tiny export logged progress lines"
