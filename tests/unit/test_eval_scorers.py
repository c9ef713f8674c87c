"""The built-in scorers: acc and acc_norm as lm-eval defines them, generation metrics,
task-file errors by line, a trained model beating chance, and the in-training suite."""

import json
import math

import pytest
import torch

from raylm import synthetic as S
from raylm.cli import main
from raylm.config import ModelConfig, TrainConfig, load_config
from raylm.data import DataError
from raylm.eval.in_training import TrainingEval
from raylm.eval.pool import LocalRunner
from raylm.eval.scorers import gen_metrics, mc_metrics, score_gen, score_mc
from raylm.eval.tasks import GenItem, MCItem, read_gen_task, read_mc_task
from raylm.model import build_model
from raylm.objectives import SFTObjective, sft_batch
from raylm.tokenizer import END, train_tokenizer
from raylm.train import lr_at, make_optimizer, train_step


def test_acc_and_acc_norm_differ_each_as_defined():
    # A short wrong choice with the higher total, a long gold one with the higher per-character.
    items = [MCItem("q", ("a", "bbbbbbbbbb"), gold=1), MCItem("q", ("yes", "no"), gold=0)]
    lls = [[-2.0, -10.0], [-1.0, -3.0]]
    m = mc_metrics(items, lls)
    assert m["acc"] == 0.5  # argmax of the sum: item 1 picks "a" (wrong), item 2 "yes" (right)
    assert m["acc_norm"] == 1.0  # -2/1 < -10/10: item 1 picks the long gold choice
    assert m["acc_stderr"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))  # sample std / sqrt(n)
    assert m["acc_norm_stderr"] == 0.0 and m["n"] == 2 and m["chance"] == 0.5
    assert mc_metrics([MCItem("q", ("x", "y"), 1)], [[-1.0, -1.0]])["acc"] == 0.0  # ties: the first choice


def test_generation_metrics():
    items = [GenItem("q", ("cat",)), GenItem("q", ("dog", "hound")), GenItem("q", ("sun",))]
    m = gen_metrics(items, [" cat ", "a hound here", "moon"])
    assert m["exact_match"] == pytest.approx(1 / 3) and m["contains"] == pytest.approx(2 / 3) and m["n"] == 3


@pytest.mark.parametrize("line, problem", [
    ('{"choices": ["a", "b"], "gold": 0}', "missing field 'context'"),
    ('{"context": "x", "gold": 0}', "missing field 'choices'"),
    ('{"context": "x", "choices": ["a", "b"]}', "missing field 'gold'"),
    ('{"context": "x", "choices": ["a", "b"], "gold": 2}', "'gold'=2 is not an index"),
    ('{"context": "x", "choices": ["a", "b"], "gold": -1}', "'gold'=-1 is not an index"),
    ('{"context": "x", "choices": ["a"], "gold": 0}', "at least 2"),
    ('{"context": "x", "choices": ["a", "b"], "gold": 0', "malformed JSON"),
])
def test_malformed_mc_task_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "task.jsonl"
    good = '{"context": "x", "choices": ["a", "b"], "gold": 1}'
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=f"^{path}:4: .*{problem}" if problem != "malformed JSON"
                       else f"^{path}:4: malformed JSON"):
        read_mc_task(str(path))


def test_malformed_gen_task_and_missing_file(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text('{"context": "x", "answer": "y"}\n{"context": "x", "answer": 3}\n')
    with pytest.raises(DataError, match=f"^{path}:2: 'answer' must be"):
        read_gen_task(str(path))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_mc_task(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_eval_refuses_a_limit_below_one(tiny_run, tmp_path, capsys, limit):
    # --limit 0 divided by zero in mc_metrics; --limit -1 scored all but the last item (items[:-1]).
    task = tmp_path / "mc.jsonl"
    task.write_text('{"context": "x", "choices": ["a", "b"], "gold": 0}\n' * 3)
    argv = ["eval", tiny_run, "--mc", str(task), "--limit", limit, "--workers", "0", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"raylm: error: --limit={limit}: expected an integer >= 1"


def test_a_choice_longer_than_the_context_names_file_line_and_choice(tiny_run, tmp_path, capsys):
    """The context is cut to fit the model; a choice cannot be. It was a ValueError traceback."""
    task = tmp_path / "mc.jsonl"
    long = "the cat sat on the mat " * 100  # far more than the tiny run's 128 positions
    task.write_text('{"context": "x", "choices": ["a", "b"], "gold": 0}\n'
                    + json.dumps({"context": "x", "choices": ["a", long], "gold": 0}) + "\n")
    argv = ["eval", tiny_run, "--mc", str(task), "--workers", "0", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{task}:2: choice {long[:40] + '...'!r} is " in err, err
    assert "model.max_seq_len=128" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- a model trained for the task

STEPS, BATCH, HELD = 200, 32, 200


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    """A character-level tokenizer, as tests/unit/test_synthetic.py makes one."""
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=99)]
    chars = set("".join(texts)) - {"\n"}
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 4 + 5 + 256 + len(chars))


@pytest.fixture(scope="module")
def trained(char_tok):
    """A 2-layer model fine-tuned (SFT, in this process) on `word_after` chats for 200 steps, as
    tests/unit/test_synthetic.py trains one; (model, tokenizer, held-out MC items, gen items)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = char_tok
    train, held = S.split("word_after", 2000, HELD, seed=0)
    model = build_model(ModelConfig(vocab_size=(tok.vocab_size + 63) // 64 * 64, dim=64, n_layers=2, n_heads=4,
                                    max_seq_len=64), seed=0)
    tc = TrainConfig(lr=3e-3, weight_decay=0.0, warmup_steps=20, max_steps=STEPS, min_lr_ratio=1.0)
    opt = make_optimizer(model, tc, torch.device("cpu"))
    rows = sft_batch(tok, [S.messages_record(e) for e in train])
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        idx = torch.randint(0, len(train), (BATCH,), generator=g)
        train_step(model, opt, [{k: v[idx] for k, v in rows.items()}], SFTObjective(), lr_at(step, tc), 1.0)
    model.eval()
    prompt = lambda e: tok.apply_chat_template([{"role": "user", "content": e.prompt}],  # noqa: E731
                                               add_generation_prompt=True)
    mc = [MCItem(prompt(e), (e.answer + END, e.wrong + END), 0) for e in held]
    gen = [GenItem(prompt(e), (e.answer,)) for e in held[:16]]
    yield model, tok, mc, gen
    torch.set_num_threads(n)


def test_trained_model_beats_chance_on_held_out_items(trained):
    model, tok, mc, _ = trained
    m = score_mc(LocalRunner(model, tok), mc)
    print(f"word_after held-out: acc {m['acc']:.3f} ± {m['acc_stderr']:.3f}, acc_norm {m['acc_norm']:.3f}")
    # Chance is 0.5 on 200 items: sd 0.035, so 0.65 is over 4 sd above it (p < 3e-5).
    assert m["chance"] == 0.5 and m["n"] == HELD
    assert m["acc"] >= 0.65 and m["acc_norm"] >= 0.65


def test_generation_scores_through_the_runner(trained):
    model, tok, _, gen = trained
    m, outputs = score_gen(LocalRunner(model, tok), gen, max_new_tokens=8)
    assert len(outputs) == len(gen) and m["n"] == len(gen)
    assert m["exact_match"] == gen_metrics(gen, outputs)["exact_match"] <= m["contains"]
    sampled, _ = score_gen(LocalRunner(model, tok), gen, max_new_tokens=8, temperature=1.0, seed=1)
    again, _ = score_gen(LocalRunner(model, tok), gen, max_new_tokens=8, temperature=1.0, seed=1)
    assert sampled == again  # seeded sampling repeats


def test_in_training_suite_agrees_with_the_scorer(trained, tmp_path):
    model, tok, mc, gen = trained
    mc_path, gen_path = tmp_path / "word_after.jsonl", tmp_path / "word_after_gen.jsonl"
    mc_path.write_text("".join(json.dumps({"context": it.context, "choices": list(it.choices), "gold": it.gold}) + "\n"
                               for it in mc))
    gen_path.write_text("".join(json.dumps({"context": it.context, "answer": it.answers[0]}) + "\n" for it in gen))
    cfg = load_config(overrides=["eval.every=1", f"eval.mc_tasks=[{mc_path}]", f"eval.gen_tasks=[{gen_path}]",
                                 "eval.max_new_tokens=8", "model.max_seq_len=64", "data.seq_len=64"])
    row = TrainingEval(cfg, tok)(model, step=7)
    direct = score_mc(LocalRunner(model, tok), mc)
    assert row["step"] == 7 and row["eval_word_after_n"] == HELD
    assert row["eval_word_after_acc"] == direct["acc"] and row["eval_word_after_acc_norm"] == direct["acc_norm"]
    assert row["eval_word_after_acc_stderr"] == pytest.approx(direct["acc_stderr"])
    g, _ = score_gen(LocalRunner(model, tok), gen, max_new_tokens=8)
    assert row["eval_word_after_gen_exact_match"] == g["exact_match"]


def test_fit_writes_eval_rows_beside_the_loss(char_tok, tmp_path):
    import dataclasses

    import numpy as np

    from raylm.train import train_local

    tok = char_tok
    task = tmp_path / "wa.jsonl"
    task.write_text("".join(json.dumps({"context": e.prompt, "choices": [e.answer, e.wrong], "gold": 0}) + "\n"
                            for e in S.examples("word_after", 10, seed=3)))
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=r", f"tokenizer.path={tok.path}", "model.dim=32",
                                 "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=64", "data.seq_len=32",
                                 "train.micro_batch_size=4", "train.global_batch_size=4", "train.num_workers=1", "train.max_steps=4",
                                 "train.log_every=1", "train.eval_every=4", "train.ckpt_every=4",
                                 "train.eval_batches=1", "train.warmup_steps=1",
                                 "eval.every=2", f"eval.mc_tasks=[{task}]"])
    cfg = dataclasses.replace(cfg, model=cfg.model.with_vocab(tok.vocab_size))
    rows = np.random.default_rng(0).integers(10, tok.vocab_size, size=(24, 33)).astype(np.int32)
    train_local(cfg, rows[:20], rows[20:], log=lambda *_: None,
                manifest={"tokenizer_sha256": tok.sha256, "eos_id": tok.eos_id, "columns": ["tokens"]})
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_wa_n"] == 10 and 0 <= r["eval_wa_acc"] <= 1 and "eval_wa_acc_norm_stderr" in r for r in evals)
    assert not any(k.startswith("eval_") for r in lines if r.get("kind") == "train" for k in r)
    assert any(r.get("kind") == "train" and r["step"] == 2 for r in lines)  # the loss sits beside it
