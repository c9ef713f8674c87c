"""Generation budgets as lm-eval cuts them, shared by `raylm eval` and in-training eval; a pool
actor restarted by Ray reloading its model; generation answers that cannot be empty."""

import json

import pytest
import torch

from raylm.config import load_config
from raylm.data import DataError
from raylm.errors import ConfigError
from raylm.eval.in_training import TrainingEval
from raylm.eval.loglik import complete_until, encode_pair
from raylm.eval.pool import LocalRunner, PoolSpec, UnitActor
from raylm.eval.scorers import score_gen
from raylm.eval.tasks import GenItem, read_gen_task

LONG = "The cat sat on the mat. " * 30  # about 420 tokens: far longer than the tiny run's 128


@pytest.fixture(scope="module")
def model_tok(tiny_run):
    from raylm.generate import load_for_inference

    model, tok, _ = load_for_inference(tiny_run)
    return model, tok


def greedy_by_hand(model, tok, ctx: list[int], steps: int, doc_sep: int | None = None) -> str:
    """Full forward passes, no cache (with `doc_sep`, masked ones): `steps` greedy tokens after
    `ctx`, up to EOS."""
    ids = list(ctx)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(torch.tensor([ids]), doc_sep=doc_sep)
            nxt = int(logits[0, -1, :tok.vocab_size].argmax())
            if nxt == tok.eos_id:
                break
            out.append(nxt)
            ids.append(nxt)
    return tok.decode(out)


def test_fit_generation_is_lm_evals_rule():
    from raylm.eval.loglik import fit_generation

    ctx = list(range(200))
    assert fit_generation(ctx, 32, 128) == (ctx[-96:], 32)  # prompt cut to max_len - budget, budget kept
    assert fit_generation(ctx[:10], 32, 128) == (ctx[:10], 32)
    assert fit_generation(ctx, 128, 128) == (ctx[-1:], 127)  # the whole window: the last prompt token only
    assert fit_generation(ctx, 500, 128) == (ctx[-1:], 127)


def test_a_prompt_longer_than_the_window_keeps_its_budget(model_tok, one_thread):
    model, tok = model_tok
    ctx = [tok.eos_id] + tok.encode(LONG)
    assert len(ctx) > model.cfg.max_seq_len
    out = complete_until(model, tok, ctx, [], 32)
    assert out == greedy_by_hand(model, tok, ctx[-(model.cfg.max_seq_len - 32):], 32)
    assert len(out.split()) > 1  # not the single token of a prompt cut to max_seq_len - 1


def test_in_training_and_raylm_eval_generate_the_same_text(model_tok, tmp_path, one_thread):
    model, tok = model_tok
    contexts = [LONG, "The cat sat on the"]
    _, outputs = score_gen(LocalRunner(model, tok), [GenItem(c, ("x",)) for c in contexts], max_new_tokens=32)
    assert all(o.strip() for o in outputs)
    # Each item's answer is what `raylm eval` generated: the training path must match all of them.
    task = tmp_path / "same.jsonl"
    task.write_text("".join(json.dumps({"context": c, "answer": o}) + "\n" for c, o in zip(contexts, outputs)))
    cfg = load_config(overrides=["eval.every=1", f"eval.gen_tasks=[{task}]", "eval.max_new_tokens=32",
                                 f"model.max_seq_len={model.cfg.max_seq_len}"])
    row = TrainingEval(cfg, tok)(model, step=1)
    assert row["eval_same_exact_match"] == 1.0 and row["eval_same_n"] == 2


def test_in_training_budget_of_the_whole_window_is_refused_up_front(model_tok, tmp_path):
    model, tok = model_tok
    task = tmp_path / "g.jsonl"
    task.write_text(json.dumps({"context": "2+2=", "answer": "4"}) + "\n")
    overrides = ["eval.every=1", f"eval.gen_tasks=[{task}]", "eval.max_new_tokens=128", "model.max_seq_len=128"]
    with pytest.raises(ConfigError, match=r"^eval\.max_new_tokens=128 leaves no room"):
        load_config(overrides=overrides)  # pre-training: when the config loads
    # Post-training takes its parent's model, known once the parent is read: when training starts.
    cfg = load_config(overrides=[*overrides, "stage=sft"])
    with pytest.raises(ConfigError, match=r"^eval\.max_new_tokens=128 leaves no room for a prompt in "
                                          r"model\.max_seq_len=128"):
        TrainingEval(cfg, tok)


def test_raylm_eval_refuses_the_same_budget(tiny_run, tmp_path):
    from raylm.eval.run import evaluate_run

    task = tmp_path / "g.jsonl"
    task.write_text(json.dumps({"context": "2+2=", "answer": "4"}) + "\n")
    cfg = load_config(overrides=[f"eval.gen_tasks=[{task}]", "eval.max_new_tokens=128", "eval.workers=0"])
    with pytest.raises(ConfigError, match=r"^eval\.max_new_tokens=128 leaves no room for a prompt in the model's "
                                          r"max_seq_len=128"):
        evaluate_run(tiny_run, cfg, out=str(tmp_path / "out"), log=lambda *_: None)


def test_a_pool_actor_restarted_without_load_reads_the_checkpoint(tiny_run, model_tok, one_thread):
    """Ray restarts a lost actor by running __init__ again, never `load`: its first unit loads."""
    model, tok = model_tok
    actor = UnitActor(tiny_run, f"{tiny_run}/tokenizer", None, PoolSpec(workers=1, num_cpus=1))
    pairs = [encode_pair(tok, "The cat sat on the", c) for c in (" mat", " moon")]
    runner = LocalRunner(model, tok)
    runner.run = lambda units, on_done=None: [actor.run(u) for u in units]  # the units, computed by the actor
    assert runner.loglikelihood(pairs) == LocalRunner(model, tok).loglikelihood(pairs)
    assert actor.info()["weights_from"] == tiny_run and actor.info()["units"] == 1


@pytest.mark.parametrize("answer", ['""', '"  "', '["4", ""]', '["4", " \\n"]'])
def test_an_empty_generation_answer_names_file_and_line(tmp_path, answer):
    path = tmp_path / "gen.jsonl"
    path.write_text(f'{{"context": "1+1=", "answer": "2"}}\n{{"context": "2+2=", "answer": {answer}}}\n')
    with pytest.raises(DataError, match=f"^{path}:2: 'answer' holds an empty or whitespace-only answer"):
        read_gen_task(str(path))
