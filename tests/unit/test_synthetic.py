"""Synthetic instruction tasks (raylm.synthetic), and short real SFT and DPO runs on one of
them through the pre-training step (`train_step`), which show that post-training works."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch

from raylm import synthetic as S
from raylm.config import ModelConfig, TrainConfig
from raylm.model import build_model
from raylm.objectives import (DPOObjective, SFTObjective, dpo_batch, reference_logprobs, sequence_logprobs,
                              sft_batch)
from raylm.tokenizer import train_tokenizer
from raylm.train import lr_at, make_optimizer, train_step

CPU = torch.device("cpu")

# --------------------------------------------------------------------------- the tasks


@pytest.mark.parametrize("task", S.TASKS)
def test_examples_are_deterministic_distinct_and_correct(task):
    exs = S.examples(task, 200, seed=3)
    assert exs == S.examples(task, 200, seed=3)
    assert exs != S.examples(task, 200, seed=4)
    assert len({e.prompt for e in exs}) == 200
    for e in exs:
        assert e.wrong != e.answer
        if task == "reverse":
            s = e.prompt.removeprefix("reverse: ")
            assert e.answer == s[::-1] and (e.wrong == s or s == s[::-1])
        elif task == "add":
            a, b = map(int, e.prompt.removeprefix("add: ").split(" + "))
            assert int(e.answer) == a + b and abs(int(e.wrong) - (a + b)) == 1
        else:
            head, words = e.prompt.removeprefix("word after ").split(": ")
            words = words.split()
            assert e.answer == words[words.index(head) + 1] and e.wrong in words


def test_options_and_a_too_small_prompt_space():
    assert {len(e.answer) for e in S.examples("reverse", 50, length=5)} == {5}
    assert all(int(e.answer) <= 6 for e in S.examples("add", 10, max_value=3))
    with pytest.raises(ValueError, match="fewer than 17 distinct prompts"):
        S.examples("add", 17, max_value=3)  # 4 x 4 sums
    with pytest.raises(ValueError, match="unknown task"):
        S.examples("sort", 1)


def test_written_splits_share_no_prompt(tmp_path):
    paths = S.write_jsonl(str(tmp_path), "add", 150, 40, seed=1, max_value=30)
    assert set(paths) == {f"{s}.{f}" for s in ("train", "heldout") for f in S.FORMATS}
    rows = {k: S.read_jsonl(p) for k, p in paths.items()}
    assert len(rows["train.messages"]) == 150 and len(rows["heldout.preference"]) == 40
    train = {r["prompt"] for r in rows["train.prompt_completion"]}
    held = {r["prompt"] for r in rows["heldout.prompt_completion"]}
    assert len(train) == 150 and len(held) == 40 and not train & held
    m, pc, pref = rows["train.messages"][0], rows["train.prompt_completion"][0], rows["train.preference"][0]
    assert m["messages"] == [{"role": "user", "content": pc["prompt"]},
                             {"role": "assistant", "content": pc["completion"]}]
    assert pref["prompt"] == pc["prompt"] and pref["chosen"] == pc["completion"] != pref["rejected"]
    assert json.loads((tmp_path / "add.train.messages.jsonl").read_text().splitlines()[0]) == m


def test_exact_match_scores_every_record_shape():
    exs = S.examples("word_after", 20)
    answers = {e.prompt: e.answer for e in exs}
    oracle = lambda msgs: f" {answers[msgs[-1]['content']]}\n"  # noqa: E731 (whitespace is forgiven)
    for fmt in S.FORMATS.values():
        records = [fmt(e) for e in exs]
        assert S.exact_match(oracle, records) == 1.0
        assert S.exact_match(lambda msgs: "red", records) == sum(e.answer == "red" for e in exs) / 20
        half = {e.prompt for e in exs[:10]}
        assert S.exact_match(lambda msgs: oracle(msgs) if msgs[-1]["content"] in half else "?", records) == 0.5
    with pytest.raises(ValueError):
        S.exact_match(oracle, [])


# --------------------------------------------------------------------------- with a tokenizer: columns, real runs

TASK = "reverse"  # three letters; the easiest task here that a 2-layer model learns fast
SFT_STEPS, DPO_STEPS, BATCH = 400, 40, 32


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A character-level tokenizer: the vocabulary is exactly the specials, the bytes and the
    corpus characters, so no merges. Merged letter pairs would give the same letters different
    pieces forwards and backwards, which makes reversal needlessly hard for a tiny model."""
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=99)]
    chars = set("".join(texts)) - {"\n"}  # "\n" is one of the 5 user-defined symbols
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 4 + 5 + 256 + len(chars))


@pytest.fixture(scope="module")
def one_thread_module():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    train, held = S.split(TASK, 2000, 64, seed=0)
    return train, held


def test_batch_columns_pad_right_and_padding_changes_nothing(tok):
    exs = [e for t in S.TASKS for e in S.examples(t, 3, seed=5)]  # replies of different lengths
    batch = sft_batch(tok, [S.messages_record(e) for e in exs])
    assert torch.equal(sft_batch(tok, [S.prompt_completion_record(e) for e in exs])["tokens"], batch["tokens"])
    for i, e in enumerate(exs):
        ids, mask = tok.encode_chat(S.messages_record(e)["messages"])
        n = len(ids)
        assert batch["tokens"][i, :n].tolist() == ids and batch["loss_mask"][i, :n].tolist() == mask
        assert (batch["tokens"][i, n:] == tok.pad_id).all() and not batch["loss_mask"][i, n:].any()
    width = batch["tokens"].shape[1]
    wider = sft_batch(tok, [S.messages_record(e) for e in exs], width=width + 7)
    model = build_model(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=4, max_seq_len=64), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(SFTObjective().loss_sum(model, wider), SFTObjective().loss_sum(model, batch))
    with pytest.raises(ValueError, match="does not fit the width"):
        sft_batch(tok, [S.messages_record(e) for e in exs], width=width - 1)
    pairs = dpo_batch(tok, [S.preference_record(e) for e in exs])
    assert pairs["chosen"].shape == pairs["rejected"].shape
    answers = sft_batch(tok, [S.messages_record(e) for e in exs], width=pairs["chosen"].shape[1])
    assert torch.equal(pairs["chosen"], answers["tokens"]) and torch.equal(pairs["chosen_mask"], answers["loss_mask"])


@pytest.fixture(scope="module")
def sft_run(tok, data, one_thread_module):
    """SFT of a fresh 2-layer model on reversal: (model, held-out exact match before and
    after, last loss, seconds of training)."""
    train, held = data
    cfg = ModelConfig(vocab_size=(tok.vocab_size + 63) // 64 * 64, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    model = build_model(cfg, seed=0)
    # Constant LR after warmup: reversal is learnt in a sudden drop (around step 250-350
    # here) that a decaying LR delays.
    tc = TrainConfig(lr=3e-3, weight_decay=0.0, warmup_steps=20, max_steps=SFT_STEPS, min_lr_ratio=1.0)
    opt = make_optimizer(model, tc, CPU)
    held_records = [S.messages_record(e) for e in held]
    score = lambda: S.exact_match(S.chat_generate_fn(model, tok, max_new_tokens=8), held_records)  # noqa: E731
    before = score()
    rows = sft_batch(tok, [S.messages_record(e) for e in train])
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(SFT_STEPS):
        idx = torch.randint(0, len(train), (BATCH,), generator=g)
        stats = train_step(model, opt, [{k: v[idx] for k, v in rows.items()}], SFTObjective(), lr_at(step, tc), 1.0)
        assert not stats.skipped
    seconds = time.perf_counter() - t0
    return model, before, score(), stats.loss, seconds


def test_sft_learns_to_reverse_held_out_strings(sft_run):
    _, before, after, last_loss, seconds = sft_run
    print(f"held-out exact match {before:.2f} -> {after:.2f} in {SFT_STEPS} steps ({seconds:.1f}s), "
          f"last loss {last_loss:.4f}")
    assert before <= 0.05  # 64 unseen strings; 1/26^3 by chance per string
    assert after >= 0.5


def test_dpo_from_the_sft_model_prefers_chosen_on_held_out_pairs(tok, data, sft_run):
    """DPO through the same train_step, with reference log-probs precomputed once (the
    reference model is not used after that), then scored on held-out pairs.

    The SFT model already gives the right reversal a log-probability near 0 (about -0.004),
    so DPO can only push the rejected (unreversed) reply down; on a few held-out pairs that
    generalises the wrong way, hence an accuracy near 0.9 rather than 1."""
    train, held = data
    sft_model = sft_run[0]
    policy = copy.deepcopy(sft_model)
    rows = dpo_batch(tok, [S.preference_record(e) for e in train])
    rows.update(reference_logprobs(sft_model, rows))
    held_rows = dpo_batch(tok, [S.preference_record(e) for e in held])
    held_rows.update(reference_logprobs(sft_model, held_rows))
    obj = DPOObjective(beta=0.5)
    before = obj.metrics(policy, held_rows)
    tc = TrainConfig(lr=1e-4, weight_decay=0.0, warmup_steps=5, max_steps=DPO_STEPS, min_lr_ratio=1.0)
    opt = make_optimizer(policy, tc, CPU)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(DPO_STEPS):
        idx = torch.randint(0, len(train), (BATCH // 2,), generator=g)
        stats = train_step(policy, opt, [{k: v[idx] for k, v in rows.items()}], obj, lr_at(step, tc), 1.0)
        assert not stats.skipped and stats.count == BATCH // 2
        losses.append(stats.loss)
    after = obj.metrics(policy, held_rows)
    # The same numbers from sequence_logprobs directly, side by side: a mix-up of the sides
    # inside the objective would fool its own metrics, not this.
    with torch.no_grad():
        reward = {side: obj.beta * (sequence_logprobs(policy, held_rows[side], held_rows[f"{side}_mask"])
                                    - sequence_logprobs(sft_model, held_rows[side], held_rows[f"{side}_mask"]))
                  for side in ("chosen", "rejected")}
    assert after["preference_accuracy"] == (reward["chosen"] > reward["rejected"]).float().mean().item()
    assert after["reward_margin"] == pytest.approx((reward["chosen"] - reward["rejected"]).mean().item(), abs=1e-4)
    still = S.exact_match(S.chat_generate_fn(policy, tok, max_new_tokens=8), [S.messages_record(e) for e in held])
    print(f"held-out preference accuracy {before['preference_accuracy']:.2f} -> {after['preference_accuracy']:.2f}, "
          f"reward margin {before['reward_margin']:.3f} -> {after['reward_margin']:.3f}, train loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f}; held-out exact match after DPO {still:.2f}")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert before["preference_accuracy"] == 0.0 and before["reward_margin"] == 0.0
    assert after["preference_accuracy"] >= 0.8
    assert after["reward_margin"] >= 0.25
    assert sum(losses[-5:]) / 5 < 0.8 * math.log(2)
    assert still >= 0.5  # preference training did not wreck the skill SFT taught
