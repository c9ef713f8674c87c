"""transformers' own GGUF tokenizer and the GGUF export's tokenizer.

The export says `tokenizer.ggml.add_space_prefix = false` (raylm trains without SentencePiece's
dummy prefix), and llama.cpp honours it. transformers' GGUF loader (5.x) does not read it: its
SentencePiece tokenizer puts "▁" before every text ("The" encodes as "▁", "The") and strips a
leading space when decoding, whatever the file says (and `add_prefix_space=False` passed to
`from_pretrained` does not change it). That is transformers' to fix; the README gives the
two-line workaround checked here: with it, transformers' GGUF tokenizer gives raylm's ids and
text back. The HF export's tokenizer needs none.
"""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from raylm.export.gguf import export_gguf  # noqa: E402
from tests.unit.test_export_hf import unit_scale_model  # noqa: E402

TEXTS = ["The quick brown fox", " two leading", "  spaces\nand lines", "Café, naïve\n", "x<|user|>\nhi<|end|>\n"]


def test_transformers_gguf_tokenizer_with_the_readme_workaround_gives_raylms_ids(tiny_run, tmp_path):
    from tokenizers import decoders, pre_tokenizers

    from raylm.tokenizer import Tokenizer

    tok = Tokenizer.load(f"{tiny_run}/tokenizer")
    export_gguf(unit_scale_model(tok), tok, {}, str(tmp_path / "m.gguf"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    # The README's workaround: no "▁" before the text, none taken off when decoding.
    theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=False)
    theirs.backend_tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                          decoders.Fuse()])
    for text in TEXTS:
        ids = tok.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs.decode(ids) == tok.decode(ids) == text, text
