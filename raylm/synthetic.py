"""Small synthetic instruction tasks whose success is measurable by exact match.

Post-training needs a task where "did it work" has a crisp answer: a tiny model cannot
show better prose, but it can learn to reverse three letters. Every task here is generated
deterministically from a seed and comes in the three shapes post-training consumes:

  messages            {"task", "messages": [{user}, {assistant}]}      SFT (chat template)
  prompt/completion   {"task", "prompt", "completion"}                 SFT, plain
  preference pair     {"task", "prompt", "chosen", "rejected"}         DPO

Each example also carries a plausible wrong answer (the letters unreversed, a sum off by
one, the neighbour on the wrong side), which is the rejected side of its DPO pair: a
preference the model can only satisfy by having learnt the task.

Tasks:
  reverse      "reverse: abc"                    -> "cba"
  add          "add: 7 + 12"                     -> "19"
  word_after   "word after sun: red sun cat"     -> "cat"
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from raylm.errors import ConfigError, DataError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("red", "blue", "green", "sun", "moon", "star", "cat", "dog", "fish", "tree", "leaf", "rock",
         "bird", "rain", "snow", "wind", "fire", "lake", "hill", "road", "ship", "bell", "milk", "corn")
TASKS = ("reverse", "add", "word_after")


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # the user's message
    answer: str  # the assistant's correct reply
    wrong: str  # a plausible incorrect reply, never equal to `answer`


def _reverse(rng: random.Random, length: int = 3) -> Example:
    s = "".join(rng.choice(LETTERS) for _ in range(length))
    answer = s[::-1]
    # The unreversed string is the natural mistake; for a palindrome it is the answer itself,
    # so the first letter is changed instead (still "almost right").
    wrong = s if s != answer else LETTERS[(LETTERS.index(answer[0]) + 1) % 26] + answer[1:]
    return Example("reverse", f"reverse: {s}", answer, wrong)


def _add(rng: random.Random, max_value: int = 20) -> Example:
    a, b = rng.randint(0, max_value), rng.randint(0, max_value)
    off = rng.choice((-1, 1)) if a + b > 0 else 1  # an off-by-one sum, never negative
    return Example("add", f"add: {a} + {b}", str(a + b), str(a + b + off))


def _word_after(rng: random.Random, n_words: int = 4) -> Example:
    words = rng.sample(WORDS, n_words)
    i = rng.randrange(n_words - 1)  # any word but the last has a successor
    # Wrong: the neighbour on the other side, or (for the first word) the word itself.
    wrong = words[i - 1] if i > 0 else words[i]
    return Example("word_after", f"word after {words[i]}: {' '.join(words)}", words[i + 1], wrong)


_MAKERS: dict[str, Callable[..., Example]] = {"reverse": _reverse, "add": _add, "word_after": _word_after}

# Each task's one option: (name, default, smallest, largest or None).
OPTIONS: dict[str, tuple[str, int, int, int | None]] = {
    "reverse": ("length", 3, 1, None), "add": ("max_value", 20, 0, None), "word_after": ("n_words", 4, 2, len(WORDS))}


def check_options(task: str, options: dict) -> dict:
    """`options` for `task` checked (name, integer, range), defaults filled in."""
    if task not in _MAKERS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    name, default, low, high = OPTIONS[task]
    unknown = [k for k in options if k != name]
    if unknown:
        raise ConfigError(f"task {task!r} has no option {unknown[0]!r}; its option is {name} (default {default})")
    value = options.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"task {task!r}: {name}={value!r}: expected an integer {span}")
    return {name: value}


def prompt_space(task: str, **options) -> int:
    """How many distinct prompts `task` has with `options`."""
    value = next(iter(check_options(task, options).values()))
    if task == "reverse":
        return len(LETTERS) ** value
    if task == "add":
        return (value + 1) ** 2
    return math.perm(len(WORDS), value) * (value - 1)  # word_after: an ordered sample, any word but the last


def _twin(ex: Example) -> object:
    """What ties prompts to one side of a split: `a + b` and `b + a` (a model that saw one
    answers the other by recall, not addition); any other prompt stands alone."""
    if ex.task == "add":
        return tuple(sorted(ex.prompt.removeprefix("add: ").split(" + "), key=int))
    return ex.prompt


def split_capacity(task: str, **options) -> int:
    """n_train + n_heldout that `split` always supplies: the number of prompts up to their
    twins (held-out examples come from twins not in train, each with at least one prompt)."""
    if task == "add":
        m = check_options(task, options)["max_value"]
        return (m + 1) * (m + 2) // 2  # the pairs a <= b
    return prompt_space(task, **options)


def _distinct(task: str, n: int, seed: int, options: dict) -> Iterator[Example]:
    """The task's examples with distinct prompts, in the order the seeded generator draws them,
    after at most 100 n + 100 draws (a small prompt space is not searched for ever)."""
    make = _MAKERS[task]
    rng = random.Random(f"{task}-{seed}")  # a string seed: stable across Python versions
    seen = set()
    for _ in range(100 * n + 100):
        ex = make(rng, **options)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            yield ex


def _given(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "default options"


def _too_few(task: str, n: int, options: dict) -> None:
    space = prompt_space(task, **options)
    if space < n:
        raise ConfigError(f"task {task!r} with {_given(options)} has fewer than {n} distinct prompts ({space})")


def examples(task: str, n: int, seed: int = 0, **options) -> list[Example]:
    """`n` examples of `task` with distinct prompts, a pure function of (task, n, seed,
    options). Options: reverse `length` (3), add `max_value` (20), word_after `n_words` (4)."""
    check_options(task, options)
    _too_few(task, n, options)
    out = list(itertools.islice(_distinct(task, n, seed, options), n))
    if len(out) < n:
        raise ConfigError(f"task {task!r}: {len(out)} distinct prompts in {100 * n + 100} draws, not {n}")
    return out


def split(task: str, n_train: int, n_heldout: int, seed: int = 0, **options) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples with no prompt in both, and no twin either (`add: 7 + 12`
    in train, `add: 12 + 7` held out): one stream of distinct prompts, train first; after
    that, a train prompt's twin is left out. Without twins (reverse, word_after) this is the
    stream cut at n_train. `split_capacity` says how much it always supplies."""
    check_options(task, options)
    n = n_train + n_heldout
    _too_few(task, n, options)
    train, held, in_train = [], [], set()
    for ex in _distinct(task, n, seed, options):
        if len(train) == n_train and len(held) == n_heldout:
            break
        twin = _twin(ex)
        if len(train) < n_train:  # nothing is held out yet
            train.append(ex)
            in_train.add(twin)
        elif len(held) < n_heldout and twin not in in_train:
            held.append(ex)
    if len(train) < n_train or len(held) < n_heldout:
        raise ConfigError(f"task {task!r} with {_given(options)}: {len(train)} train and {len(held)} "
                          f"held-out prompts with no twin on both sides, not {n_train} and {n_heldout}; "
                          f"it always supplies {split_capacity(task, **options)} in all")
    return train, held


# --------------------------------------------------------------------------- record shapes


def messages_record(ex: Example) -> dict:
    return {"task": ex.task, "messages": [{"role": "user", "content": ex.prompt},
                                          {"role": "assistant", "content": ex.answer}]}


def prompt_completion_record(ex: Example) -> dict:
    return {"task": ex.task, "prompt": ex.prompt, "completion": ex.answer}


def preference_record(ex: Example) -> dict:
    return {"task": ex.task, "prompt": ex.prompt, "chosen": ex.answer, "rejected": ex.wrong}


FORMATS: dict[str, Callable[[Example], dict]] = {
    "messages": messages_record, "prompt_completion": prompt_completion_record, "preference": preference_record}


def write_jsonl(out_dir: str, task: str, n_train: int, n_heldout: int, seed: int = 0, **options) -> dict[str, str]:
    """Write `{task}.{split}.{format}.jsonl` for split in (train, heldout) and every format;
    returns {"{split}.{format}": path}. Held-out prompts never occur in train, nor their twins."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split_name, exs in zip(("train", "heldout"), split(task, n_train, n_heldout, seed, **options)):
        for fmt, record in FORMATS.items():
            path = out / f"{task}.{split_name}.{fmt}.jsonl"
            path.write_text("".join(json.dumps(record(ex)) + "\n" for ex in exs))
            paths[f"{split_name}.{fmt}"] = str(path)
    return paths


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- scoring


def prompt_and_answer(record: dict) -> tuple[list[dict], str]:
    """The messages to prompt with and the expected reply, from any of the three shapes."""
    if "messages" in record:
        *prompt, last = record["messages"]
        if last.get("role") != "assistant":
            raise DataError(f"record's last message is {last.get('role')!r}, not the assistant's answer")
        return prompt, last["content"]
    answer = record["completion"] if "completion" in record else record["chosen"]
    return [{"role": "user", "content": record["prompt"]}], answer


def exact_match(generate_fn: Callable[[list[dict]], str], records: Sequence[dict]) -> float:
    """Share of records whose reply, from generate_fn(prompt messages), equals the answer.
    Surrounding whitespace is ignored on both sides; nothing else is forgiven."""
    if not records:
        raise DataError("exact_match needs at least one record")
    hits = 0
    for record in records:
        prompt, answer = prompt_and_answer(record)
        hits += generate_fn(prompt).strip() == answer.strip()
    return hits / len(records)


def chat_generate_fn(model, tokenizer, max_new_tokens: int = 16) -> Callable[[list[dict]], str]:
    """A greedy generate_fn for `exact_match`: the chat template with the assistant's turn
    opened, decoding until `<|end|>`, exactly the format SFT trains on."""
    from raylm.generate import chat_reply

    return lambda messages: chat_reply(model, tokenizer, messages, max_new_tokens, temperature=0.0)
