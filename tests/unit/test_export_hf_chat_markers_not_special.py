"""The HF export's chat markers are plain added tokens for every transformers version.

transformers 4's fast tokenizer makes a token special when its added_tokens_decoder entry says
so or when any special-token key names it (`additional_special_tokens`, the special tokens
map); `split_special_tokens: true` then splits special tokens into text pieces, so a chat
template's markers reached the model as characters. transformers 5 reads the flags in
added_tokens_decoder only, so the files themselves are checked.
"""

import json

import pytest

transformers = pytest.importorskip("transformers")

from raylm.export.hf import export_run  # noqa: E402
from raylm.tokenizer import END, ROLE_TOKENS, Tokenizer  # noqa: E402

MARKERS = [*ROLE_TOKENS.values(), END]


def _named_special(cfg: dict) -> set[str]:
    """Token texts a tokenizer file names as special, under every key transformers reads."""
    named = {t["content"] for t in cfg.get("added_tokens_decoder", {}).values() if t["special"]}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        named |= set(cfg.get(key) or [])
    return named


def test_chat_markers_are_special_under_no_key(tiny_run, tmp_path):
    out = export_run(tiny_run, str(tmp_path / "hf"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((tmp_path / "hf" / name).read_text())
        assert not _named_special(cfg) & set(MARKERS), name
    hf = transformers.AutoTokenizer.from_pretrained(out)
    tok = Tokenizer.load(f"{tiny_run}/tokenizer")
    assert [hf.bos_token_id, hf.eos_token_id, hf.pad_token_id] == [tok.bos_id, tok.eos_id, tok.pad_id]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    ids = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    assert ids == tok.encode_chat(chat, add_generation_prompt=True)[0]
