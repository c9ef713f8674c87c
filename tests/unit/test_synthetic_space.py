"""A recipe's `synthetic: TASK` writes SYNTHETIC_EXAMPLES train and SYNTHETIC_HELDOUT
held-out records; a task (with its `synthetic_options:`) that has fewer distinct prompts is
refused when the recipe loads, naming the numbers, not at its stage after the tokenizer,
data and pre-training ran. And a held-out `add` prompt's commuted twin (b + a) is never in
train."""

from __future__ import annotations

import itertools
import types

import pytest

from raylm import synthetic as S
from raylm.cli import main
from raylm.config import ConfigError
from raylm.recipe import SYNTHETIC_EXAMPLES, SYNTHETIC_HELDOUT, _synthetic_records, load_recipe

NEED = SYNTHETIC_EXAMPLES + SYNTHETIC_HELDOUT


def recipe(tmp_path, sft: str, dpo: str = "{synthetic: word_after}"):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path}/out\nmodel: {{preset: tiny}}\nstages:\n"
                    f"  pretrain: {{train.max_steps: 5}}\n  sft: {sft}\n  dpo: {dpo}\n")
    return str(path)


def test_add_at_its_default_options_is_refused_when_the_recipe_loads(tmp_path, capsys):
    path = recipe(tmp_path, "{synthetic: add}")
    with pytest.raises(ConfigError, match=rf"stages\.sft\.synthetic=add: with max_value=20 the task has 441 distinct "
                                          rf"prompts \(231 once a \+ b and b \+ a.*\), fewer than the {NEED} the "
                                          rf"stage writes \({SYNTHETIC_EXAMPLES} train, {SYNTHETIC_HELDOUT} held "
                                          rf"out\); set stages\.sft\.synthetic_options\.max_value to 63 or more"):
        load_recipe(path)
    assert main(["run", path, "--check"]) == 2
    assert "stages.sft.synthetic=add: with max_value=20" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"stages\.dpo\.synthetic=add: with max_value=62 .* 63 or more"):
        load_recipe(recipe(tmp_path, "{synthetic: word_after}", "{synthetic: add, synthetic_options: {max_value: 62}}"))


@pytest.mark.parametrize("sft, message", [
    ("{synthetic: reverse, synthetic_options: {length: 2}}",
     r"stages\.sft\.synthetic=reverse: with length=2 the task has 676 distinct prompts, fewer than the 2050 .*"
     r"synthetic_options\.length to 3 or more"),
    ("{synthetic: word_after, synthetic_options: {n_words: 2}}", r"n_words=2 the task has 552 distinct prompts"),
    ("{synthetic: add, synthetic_options: {length: 5}}",
     r"stages\.sft\.synthetic_options: task 'add' has no option 'length'; its option is max_value \(default 20\)"),
    ("{synthetic: add, synthetic_options: {max_value: -1}}", r"max_value=-1: expected an integer >= 0"),
    ("{synthetic: word_after, synthetic_options: {n_words: 25}}", r"n_words=25: expected an integer 2\.\.24"),
    ("{synthetic: add, synthetic_options: {max_value: true}}", r"max_value=True: expected an integer"),
    ("{synthetic: add, synthetic_options: 63}", r"stages\.sft\.synthetic_options=63: expected dict"),
    ("{data.path: /chat.jsonl, synthetic_options: {max_value: 63}}", r"stages\.sft\.synthetic_options: options of a "
                                                                     r"synthetic task; give synthetic: TASK"),
])
def test_options_that_cannot_supply_the_stage_are_refused(tmp_path, sft, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe(tmp_path, sft))


def _records(rec, stage: str, fmt: str, seed: int = 0) -> str:
    """The stage's own record writer, as run_posttrain calls it."""
    run = types.SimpleNamespace(options=rec.sections[stage][1], cfg=types.SimpleNamespace(seed=seed),
                                root=rec.root, s3=None)
    return _synthetic_records(run, fmt)


@pytest.mark.parametrize("sft, records", [
    ("{synthetic: add, synthetic_options: {max_value: 63}}", "records-add-{seed}-max_value63/add"),
    ("{synthetic: reverse}", "records-reverse-{seed}/reverse"),  # without options: the directory as before
    ("{synthetic: word_after}", "records-word_after-{seed}/word_after"),
    ("{synthetic: reverse, synthetic_options: {length: 4}}", "records-reverse-{seed}-length4/reverse"),
])
def test_what_loads_is_what_the_stage_writes(tmp_path, sft, records):
    rec = load_recipe(recipe(tmp_path, sft))
    for seed in range(3):
        path = _records(rec, "sft", "messages", seed)
        assert path == f"{rec.root}/{records.format(seed=seed)}.train.messages.jsonl"
        assert len(S.read_jsonl(path)) == SYNTHETIC_EXAMPLES
        assert len(S.read_jsonl(path.replace(".train.", ".heldout."))) == SYNTHETIC_HELDOUT


@pytest.mark.parametrize("task, option, values", [("reverse", "length", [1, 2]), ("add", "max_value", [0, 1, 5, 9]),
                                                  ("word_after", "n_words", [2, 3])])
def test_prompt_space_counts_every_distinct_prompt(task, option, values):
    for v in values:
        space = S.prompt_space(task, **{option: v})
        if task == "reverse":
            prompts = {f"reverse: {''.join(p)}" for p in itertools.product(S.LETTERS, repeat=v)}
        elif task == "add":
            prompts = {f"add: {a} + {b}" for a in range(v + 1) for b in range(v + 1)}
        else:
            prompts = {f"word after {w[i]}: {' '.join(w)}" for w in itertools.permutations(S.WORDS, v)
                       for i in range(v - 1)}
        assert space == len(prompts)
        if space <= 2000:  # the generator reaches each of them
            assert {e.prompt for e in S.examples(task, space, seed=1, **{option: v})} == prompts
    with pytest.raises(ConfigError, match=r"task 'add' with max_value=3 has fewer than 17 distinct prompts \(16\)"):
        S.examples("add", 17, max_value=3)


def _twin(prompt: str) -> str:
    a, b = prompt.removeprefix("add: ").split(" + ")
    return f"add: {b} + {a}"


@pytest.mark.parametrize("n_train, n_heldout, max_value",
                         [(350, 50, 30), (150, 40, 30), (2000, 50, 63), (2000, 50, 50)])
def test_a_held_out_sum_is_in_train_in_neither_order(n_train, n_heldout, max_value):
    for seed in range(5):
        train, held = S.split("add", n_train, n_heldout, seed=seed, max_value=max_value)
        assert (len(train), len(held)) == (n_train, n_heldout)
        seen = {e.prompt for e in train}
        assert len(seen) == n_train and not seen & {e.prompt for e in held}
        assert not [e.prompt for e in held if _twin(e.prompt) in seen]
        # train is the stream's first n_train distinct prompts, as before
        assert train == S.examples("add", n_train, seed=seed, max_value=max_value)


def test_split_always_supplies_its_capacity():
    """split_capacity is what a recipe is checked against: within it, every seed's split fills."""
    for m in (2, 5, 8):
        cap = S.split_capacity("add", max_value=m)
        assert cap == (m + 1) * (m + 2) // 2
        for n_heldout in (1, cap // 3, cap - 1):
            for seed in range(30):
                train, held = S.split("add", cap - n_heldout, n_heldout, seed=seed, max_value=m)
                assert len(held) == n_heldout and not {_twin(e.prompt) for e in held} & {e.prompt for e in train}
    with pytest.raises(ConfigError, match=r"task 'add' with default options: 350 train and \d+ held-out prompts with "
                                          r"no twin on both sides, not 350 and 50; it always supplies 231 in all"):
        S.split("add", 350, 50, seed=0)


@pytest.mark.parametrize("task", ["reverse", "word_after"])
def test_tasks_without_twins_split_as_the_stream_cut(task):
    """reverse and word_after keep their splits (the quickstart's held-out set among them)."""
    for seed in (0, 1337):
        train, held = S.split(task, 2000, 500, seed=seed)
        every = S.examples(task, 2500, seed=seed)
        assert (train, held) == (every[:2000], every[2000:])
