"""Built-in task files (jsonl, local or s3://), read and checked line by line.

  multiple choice  {"context": str, "choices": [str, ...], "gold": int}
  generation       {"context": str, "answer": str | [str, ...]}   (any listed answer counts)

A task's name is its file name without `.jsonl`. Every error names the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raylm import storage
from raylm.documents import encodable, json_lines
from raylm.errors import ConfigError, DataError, PathNotFoundError

# What in-training evaluation reports of each task, as eval_<task>_<metric> (with _stderr and
# eval_<task>_n): raylm.eval.in_training writes them, and `raylm tune` ranks trials on them.
MC_METRICS = ("acc", "acc_norm")
GEN_METRICS = ("exact_match", "contains")


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    gold: int
    line: int = field(default=0, compare=False)  # its line in the task file, for messages


@dataclass(frozen=True)
class GenItem:
    context: str
    answers: tuple[str, ...]


def task_name(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name[:-len(".jsonl")] if name.endswith(".jsonl") else name


def check_task_names(mc_tasks, gen_tasks) -> None:
    """Refuse two different task files of one name: a task is named by its file name alone,
    and its metrics are keyed by that name (`eval_<task>_<metric>` in metrics.jsonl and tune,
    the task column of results), so one file's results would replace or be mistaken for the
    other's (tasks/arc/test.jsonl and tasks/piqa/test.jsonl are both `test`)."""
    seen: dict[str, tuple[str, str]] = {}
    for key, paths in (("eval.mc_tasks", mc_tasks), ("eval.gen_tasks", gen_tasks)):
        for p in paths:
            name = task_name(p)
            if name in seen and seen[name] != (key, p):
                other_key, other = seen[name]
                raise ConfigError(f"{other_key} {other} and {key} {p} are both task {name!r} (a task is named "
                                  f"by its file name, and its metrics by the task); rename one of the files")
            seen[name] = (key, p)


def _records(path: str, s3=None):
    try:
        raw = storage.read_bytes(path, s3)
    except storage.StorageError as e:
        raise PathNotFoundError(f"{path}: task file not readable ({e})") from None
    n = 0
    for line, record in json_lines(path, raw):
        if isinstance(record, DataError):
            raise record
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: a JSON {type(record).__name__}, not an object")
        n += 1
        yield line, record
    if n == 0:
        raise DataError(f"{path}: no records")


def _string(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (found: {', '.join(record) or 'no fields'})")
    if not isinstance(record[key], str):
        raise DataError(f"{where}: field {key!r} is {type(record[key]).__name__}, not a string")
    _check_text([record[key]], key, where)
    return record[key]


def _check_text(texts, key: str, where: str) -> None:
    """Refuse, naming the line, a JSON string escaping a lone UTF-16 surrogate ("\\ud800"):
    the tokenizer cannot encode it, and its error named neither the file nor the line."""
    if not all(encodable(t) for t in texts):
        raise DataError(f"{where}: field {key!r} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), not text")


def read_mc_task(path: str, s3=None) -> list[MCItem]:
    items = []
    for line, r in _records(path, s3):
        where = f"{path}:{line}"
        context = _string(r, "context", where)
        choices = r.get("choices")
        if "choices" not in r:
            raise DataError(f"{where}: missing field 'choices'")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        _check_text(choices, "choices", where)
        if "gold" not in r:
            raise DataError(f"{where}: missing field 'gold'")
        gold = r["gold"]
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise DataError(f"{where}: 'gold'={gold!r} is not an index into its {len(choices)} choices "
                            f"(0..{len(choices) - 1})")
        items.append(MCItem(context, tuple(choices), gold, line))
    return items


def check_mc_fits(path: str, items: list[MCItem], tok, max_len: int) -> None:
    """Refuse, naming the file, line and choice, an item with a choice longer than the model's
    context: the context is cut to fit (raylm.eval.loglik.fit_to_length), a choice cannot be."""
    from raylm.eval.loglik import encode_pair

    for it in items:
        for c in it.choices:
            n = len(encode_pair(tok, it.context, c)[1])
            if n > max_len:
                shown = repr(c if len(c) <= 40 else c[:40] + "...")
                raise DataError(f"{path}:{it.line}: choice {shown} is {n} tokens, more than the model's context "
                                f"(model.max_seq_len={max_len}); shorten it or remove the item")


def read_gen_task(path: str, s3=None) -> list[GenItem]:
    items = []
    for line, r in _records(path, s3):
        where = f"{path}:{line}"
        context = _string(r, "context", where)
        if "answer" not in r:
            raise DataError(f"{where}: missing field 'answer'")
        answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: 'answer' must be a string or a non-empty list of strings")
        _check_text(answers, "answer", where)
        if not all(a.strip() for a in answers):  # an empty answer is contained in every completion
            raise DataError(f"{where}: 'answer' holds an empty or whitespace-only answer; every answer "
                            f"needs text")
        items.append(GenItem(context, tuple(answers)))
    return items
