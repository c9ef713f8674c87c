"""A padded vocabulary exports as the tokenizer's: no exported logit is an id it lacks.

model.vocab_size=0 rounds the tokenizer's size up to a multiple of 64 (420 -> 448 here).
raylm's own generation slices the logits to the tokenizer's ids; the HF and GGUF exports
carried the padding rows as real logits, so transformers' `generate` (and llama.cpp) sampled
ids the tokenizer does not have, and log-probs were normalised over them. The exports now keep
the tokenizer's rows only, and the real ids' logits stay raylm's.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from raylm.export.hf import export_hf  # noqa: E402
from raylm.hf import model_config_from_hf, read_hf_weights  # noqa: E402
from raylm.tokenizer import train_tokenizer  # noqa: E402
from tests.unit.test_export_hf import TEXTS, TOL, unit_scale_model  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, str(tmp_path_factory.mktemp("tok") / "tokenizer"), 420)


def _padded(tok) -> int:
    padded = -(-tok.vocab_size // 64) * 64
    assert padded > tok.vocab_size
    return padded


@pytest.mark.parametrize("tie", [True, False])
def test_hf_export_of_a_padded_vocabulary_has_the_tokenizers_ids_only(tok, tmp_path, tie):
    n = tok.vocab_size
    model = unit_scale_model(tok, tie=tie, vocab_size=_padded(tok))
    out = export_hf(model, tok, {"step": 1}, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.vocab_size == n == len(transformers.AutoTokenizer.from_pretrained(out))
    tokens = torch.randint(0, n, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = hf(input_ids=tokens).logits, model(tokens)[0]
    assert theirs.shape[-1] == n
    torch.testing.assert_close(theirs, ours[..., :n], **TOL)  # what raylm's generation samples from
    # Sampling at a high temperature draws from the whole head: only the tokenizer's ids come out.
    torch.manual_seed(0)
    prompt = tokens[:1, :4]
    drawn = hf.generate(prompt, max_new_tokens=48, do_sample=True, temperature=3.0, top_k=0, top_p=1.0,
                        eos_token_id=None, pad_token_id=tok.pad_id)[0, 4:]
    assert drawn.numel() == 48 and int(drawn.max()) < n

    # Back in through --init-from-hf's reader: the tokenizer's rows, exactly.
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    got = read_hf_weights(out, model_config_from_hf(config))
    assert torch.equal(got["tok_embeddings.weight"], model.tok_embeddings.weight.detach()[:n])
    if not tie:
        assert torch.equal(got["output.weight"], model.output.weight.detach()[:n])


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_export_of_a_padded_vocabulary_has_the_tokenizers_ids_only(tok, tmp_path, tie):
    gguf = pytest.importorskip("gguf")
    from raylm.export.gguf import export_gguf

    n = tok.vocab_size
    model = unit_scale_model(tok, tie=tie, vocab_size=_padded(tok))
    reader = gguf.GGUFReader(export_gguf(model, tok, {}, str(tmp_path / "m.gguf")))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    assert fields["llama.vocab_size"] == n
    assert fields["tokenizer.ggml.tokens"] == [tok.id_to_piece(i) for i in range(n)]  # no "[PADn]"
    assert len(fields["tokenizer.ggml.scores"]) == len(fields["tokenizer.ggml.token_type"]) == n
    heads = {"token_embd.weight": model.tok_embeddings.weight}
    if not tie:
        heads["output.weight"] = model.output.weight
    assert ("output.weight" in tensors) is not tie
    for name, weight in heads.items():
        got = torch.from_numpy(tensors[name].data.copy())
        assert torch.equal(got, weight.detach()[:n]), name  # f32: exactly the tokenizer's rows
