"""`--apply_chat_template` and `--fewshot_as_multiturn` with `--model raylm` (no Ray: workers=0)."""

import json

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from raylm.eval.harness import RayLM  # noqa: E402
from raylm.export.hf import CHAT_TEMPLATE  # noqa: E402

CHAT = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Dogs like to"},
        {"role": "assistant", "content": "bark"}, {"role": "user", "content": "Fish live in"}]


def _hf_render(messages, **kw):
    """What lm-eval's hf model renders for the HF export's template (transformers' own code)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=CHAT_TEMPLATE, **kw)
    return rendered[0]


@pytest.fixture(scope="module")
def lm(tiny_run):
    return RayLM.create_from_arg_string(f"path={tiny_run},workers=0", {"device": "cpu"})


def test_the_harness_renders_raylms_chat_template(lm):
    """lm-eval's --apply_chat_template called the model's apply_chat_template, which raylm did not
    implement: NotImplementedError, a traceback. It now renders raylm's template: the text whose
    ids are those of raylm's own chat encoding (SFT, `raylm generate --chat`, serving), and the
    text lm-eval's hf model renders for the HF export."""
    tok = lm.runner.tok
    text = lm.apply_chat_template(CHAT, add_generation_prompt=True)
    assert text == tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert text.endswith("<|user|>\nFish live in<|end|>\n<|assistant|>\n")
    assert tok.encode(text) == tok.encode_chat(CHAT, add_generation_prompt=True)[0]
    assert text == _hf_render(CHAT, add_generation_prompt=True)

    # A task's gen_prefix: lm-eval asks to continue the last (assistant) message, as hf's
    # continue_final_message does: no end-of-turn after it.
    prefixed = CHAT + [{"role": "assistant", "content": "Answer:"}]
    cont = lm.apply_chat_template(prefixed, add_generation_prompt=False)
    assert cont == text + "Answer:"
    assert tok.encode(cont) == tok.encode_chat(CHAT, add_generation_prompt=True)[0] + tok.encode("Answer:")
    assert cont == _hf_render(prefixed, continue_final_message=True)

    assert lm.tokenizer_name.startswith("raylm-") and lm.chat_template(True) == CHAT_TEMPLATE


def test_lm_eval_runs_a_task_with_the_chat_template_and_multiturn_fewshot(lm, tmp_path, one_thread):
    """The whole harness path with apply_chat_template and fewshot_as_multiturn: every request's
    context is the chat rendered with raylm's template (it failed before building a request)."""
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": [" a", " b"], "gold": 0}) + "\n"
                            for c in ("Dogs like to", "Fish live in")))
    (tmp_path / "raylm_t_chat.yaml").write_text(yaml.safe_dump({
        "task": "raylm_t_chat", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "fewshot_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}]}))
    out = lm_eval.simple_evaluate(model=lm, tasks=["raylm_t_chat"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  num_fewshot=1, apply_chat_template=True, fewshot_as_multiturn=True, log_samples=True)
    samples = out["samples"]["raylm_t_chat"]
    assert len(samples) == 2 and "acc,none" in out["results"]["raylm_t_chat"]
    for s in samples:
        ctx = s["arguments"][0][0]  # (context, continuation) of its first choice
        own = s["doc"]["context"]
        shot = "Fish live in" if own == "Dogs like to" else "Dogs like to"  # the other item is its example
        expected = [{"role": "user", "content": shot}, {"role": "assistant", "content": " a"},
                    {"role": "user", "content": own}]
        assert ctx == lm.runner.tok.apply_chat_template(expected, add_generation_prompt=True)

