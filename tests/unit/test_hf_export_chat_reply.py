"""A chat reply from the HF export through transformers' own flow, and the recipe that gives
raylm's `chat_reply` from it.

The chat markers are not special tokens to transformers (see `raylm.export.hf`'s docstring:
one flag would both drop them on decode and split the template's markers on encode), so a
reply that `generate` stopped at `<|end|>` decodes with it, skip_special_tokens=True or not;
`.removesuffix("<|end|>")` is the documented recipe. If a transformers release ever tells the
two apart, the first assertions here fail and the export can mark the markers special.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from raylm.export.hf import export_run  # noqa: E402
from raylm.generate import chat_reply, load_for_inference  # noqa: E402
from raylm.tokenizer import END  # noqa: E402

# A task the tiny run learned to answer with a short reply closed by <|end|>.
MESSAGES = [{"role": "user", "content": "reverse: dul"}]
N = 24


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory):
    model, tok, _ = load_for_inference(tiny_run)
    out = export_run(tiny_run, str(tmp_path_factory.mktemp("chat") / "hf"))
    return out, tok, chat_reply(model, tok, MESSAGES, N)


def test_generate_then_decode_keeps_end_and_the_recipe_gives_raylms_reply(export):
    out, tok, want = export
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = hf.generate(**x, max_new_tokens=N, do_sample=False)[0, x["input_ids"].shape[1]:].tolist()
    assert ids[-1] == tok.special_ids[END] and len(ids) < N  # stopped at the turn's end (generation_config.json)
    text = hf_tok.decode(ids, skip_special_tokens=True)
    assert text == want + END
    assert text.removesuffix(END) == want


def test_pipeline_chat_reply_keeps_end_and_the_recipe_gives_raylms_reply(export):
    out, _, want = export
    pipe = transformers.pipeline("text-generation", model=out, dtype=torch.float32)
    reply = pipe(MESSAGES, max_new_tokens=N, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    assert reply["content"] == want + END
    assert reply["content"].removesuffix(END) == want
