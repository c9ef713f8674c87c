"""The built-in offline corpus: real English produced from the running Python itself.

Every pipeline stage (tokenizer training, tokenization, pretraining, evaluation) needs text,
and tests and smoke runs must work on a machine with no network access. Rather than
downloading a data set or committing third-party text to the repository, we generate a
corpus at run time from what every CPython install already carries:

* the pydoc help topics (`pydoc_data.topics`): the language reference in plain English;
* the docstrings of the standard library, read by *parsing* its `.py` sources with `ast`.
  Importing the modules instead would run their top-level code (some open windows, start
  threads, print, or fail on a missing C extension), so we never import them.

The result is about a few megabytes of real English mixed with code-flavoured prose: enough
for a small tokenizer and a toy model, fully reproducible (same Python -> byte-identical
shards) and free of licence questions about redistributing someone else's text.
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import json
import os
import shutil
import sysconfig
import tempfile
import tokenize
from collections.abc import Iterator
from pathlib import Path

from raylm.errors import ConfigError

SUCCESS_MARKER = "_SUCCESS"
SHARD_PATTERN = "builtin-{:05d}.jsonl"

# Test suites, the IDLE GUI, demos and the 2to3 fixtures are full of deliberately odd or
# broken code and repetitive boilerplate; site-packages is third-party code, not stdlib.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
     "__pycache__"}
)
_MIN_DOCSTRING_CHARS = 40  # shorter ones are mostly "Return self." noise


def _clean(text: str) -> str:
    """Strip trailing whitespace on every line and at both ends of the document."""
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def _pydoc_topic_docs() -> Iterator[str]:
    from pydoc_data.topics import topics  # plain data module, safe to import

    for key in sorted(topics):
        text = _clean(topics[key])
        if text:
            yield text


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, qualname: str) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    try:
        args = ast.unparse(node.args)
    except Exception:  # unparse of exotic syntax: the name alone is still a fine header
        args = "..."
    return f"{prefix} {qualname}({args}):"


def _class_header(node: ast.ClassDef, qualname: str) -> str:
    try:
        bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
    except Exception:
        bases = []
    return f"class {qualname}({', '.join(bases)}):" if bases else f"class {qualname}:"


def _definition_docs(body: list[ast.stmt], prefix: str) -> Iterator[str]:
    """Docstrings of classes and functions in source order, recursing into class bodies."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            qualname = f"{prefix}{node.name}"
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                doc = _clean(inspect.cleandoc(doc))
                if len(doc) >= _MIN_DOCSTRING_CHARS:
                    header = (
                        _class_header(node, qualname)
                        if isinstance(node, ast.ClassDef)
                        else _signature(node, qualname)
                    )
                    yield f"{header}\n{doc}"
            if isinstance(node, ast.ClassDef):  # methods; nested functions are private detail
                yield from _definition_docs(node.body, f"{qualname}.")


def _module_doc(path: Path, module: str) -> str | None:
    try:
        with tokenize.open(path) as f:  # honours PEP 263 encoding declarations
            tree = ast.parse(f.read(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, OSError):
        return None
    parts = []
    doc = ast.get_docstring(tree, clean=False)
    if doc is not None:
        doc = _clean(inspect.cleandoc(doc))
        if len(doc) >= _MIN_DOCSTRING_CHARS:
            parts.append(f"module {module}\n{doc}")
    parts.extend(_definition_docs(tree.body, ""))
    return "\n\n".join(parts) if parts else None


def _stdlib_docstring_docs() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's traversal order, so the corpus is deterministic.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            doc = _module_doc(path, ".".join(parts) or rel.name)
            if doc:
                yield doc


def iter_builtin_documents() -> Iterator[str]:
    """All candidate documents in corpus order: pydoc topics, then stdlib docstrings."""
    yield from _pydoc_topic_docs()
    yield from _stdlib_docstring_docs()


def _existing_shards(out_dir: Path) -> list[str] | None:
    if (out_dir / SUCCESS_MARKER).is_file():
        return sorted(str(p) for p in out_dir.glob("builtin-*.jsonl"))
    return None


def _remove_leftover(out: Path) -> None:
    """Remove `out`, a directory without the marker, if it holds nothing but shards (a corpus
    cut short) or nothing at all. Anything else there is someone's files, never removed: the
    corpus goes to <run>/corpus, where a user's own corpus directory was deleted without a word."""
    if out.is_dir() and not out.is_symlink():
        names = [p.name for p in out.iterdir()]
        if SUCCESS_MARKER in names:  # a concurrent writer just finished: the rename fails, its corpus is used
            return
        foreign = sorted(n for n in names if not ((out / n).is_file() and not (out / n).is_symlink()
                                                   and fnmatch.fnmatchcase(n, "builtin-*.jsonl")))
        if not foreign:
            shutil.rmtree(out)
            return
        held = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        what = f"a directory holding {held}"
    else:
        what = "a link" if out.is_symlink() else "a file"
    raise ConfigError(f"{out}: {what}, not a built-in corpus; the built-in corpus (used when data.path is "
                      f"empty) is written there and nothing else is replaced: set data.path, or move it away")


def write_builtin_corpus(
    out_dir: str, min_bytes: int = 1_500_000, docs_per_shard: int = 2000
) -> list[str]:
    """Write the built-in corpus as JSONL shards `builtin-NNNNN.jsonl`; return their paths.

    Writes whole documents until at least `min_bytes` of UTF-8 text are written (all pydoc
    topics are always included). A directory already holding a complete corpus (`_SUCCESS`
    marker) is returned as is, so concurrent or repeated callers share one copy.
    """
    if docs_per_shard < 1:
        raise ConfigError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
    out = Path(out_dir)
    existing = _existing_shards(out)
    if existing is not None:
        return existing

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build the whole corpus in a sibling temp dir and rename it into place: readers never
    # see a half-written corpus, and a crash leaves only a temp dir, never a bad out_dir.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        n_topics = sum(1 for _ in _pydoc_topic_docs())
        written = 0
        shard_idx = 0
        shard = None
        for i, text in enumerate(iter_builtin_documents()):
            if i >= n_topics and written >= min_bytes:
                break
            if i % docs_per_shard == 0:
                if shard is not None:
                    shard.close()
                shard = open(tmp / SHARD_PATTERN.format(shard_idx), "w", encoding="utf-8",
                             newline="\n")
                shard_idx += 1
            # ensure_ascii=False keeps the files readable and their size equal to the text's.
            shard.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            written += len(text.encode("utf-8"))
        if shard is not None:
            shard.close()
        (tmp / SUCCESS_MARKER).write_text("")  # written last: marks the corpus complete
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is a normal directory

        if out.exists() or out.is_symlink():
            if _existing_shards(out) is not None:  # another writer finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return _existing_shards(out)
            _remove_leftover(out)
        try:
            os.rename(tmp, out)
        except OSError:
            # Lost a race with a concurrent writer that renamed its complete corpus first.
            existing = _existing_shards(out)
            if existing is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return existing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(str(p) for p in out.glob("builtin-*.jsonl"))
