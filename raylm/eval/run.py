"""`raylm eval`: one checkpoint against harness tasks, built-in task files and corpora.

    evaluate_run("runs/x", cfg, tasks=["hellaswag"], corpora=["s3://b/val/*.jsonl"])

Harness tasks and the built-in scorers go through one runner (one pool of Ray actors when
eval.workers > 0, else this process); bits per byte runs in this process. The results go to
`<run>/eval/<checkpoint>/results.{json,md}` unless `out` says otherwise.
"""

from __future__ import annotations

import os
import time

from raylm import checkpoint, storage
from raylm.config import Config
from raylm.eval.pool import make_runner
from raylm.eval.results import (checkpoint_sha256, earlier_tasks, forget_other_results, rows_from_metrics,
                                write_results)
from raylm.eval.scorers import score_gen, score_mc
from raylm.eval.tasks import check_mc_fits, check_task_names, read_gen_task, read_mc_task, task_name
from raylm.errors import ConfigError, UserError


def harness_rows(runner, path: str, tasks: list[str], facts: dict, include_path: str | None = None,
                 limit: int | None = None, num_fewshot: int | None = None, log=print) -> tuple[list[dict], str]:
    """Run lm-eval tasks on `runner` (raylm.eval.harness.RayLM); rows and lm-eval's version."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("harness tasks need lm-eval: pip install 'raylm[eval]'") from None
    from raylm.eval.harness import RayLM

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}"
                         + ("" if include_path else " (for local task YAMLs pass --include-path DIR)"))
    # A task's dataset that cannot be fetched (no network, HF_DATASETS_OFFLINE=1 without a cached
    # copy) is the user's environment: datasets raises ConnectionError (OfflineModeIsEnabled is
    # one), huggingface_hub LocalEntryNotFoundError. Every other lm-eval error keeps its traceback.
    from huggingface_hub.errors import LocalEntryNotFoundError

    model = RayLM(path=path, runner=runner)
    try:
        out = lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    except (ConnectionError, LocalEntryNotFoundError) as e:
        cause = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"lm-eval task(s) {', '.join(tasks)}: cannot fetch the dataset ({cause}); connect to the "
                        f"Hugging Face Hub, or fill the datasets cache (HF_HOME) where there is network and run "
                        f"with HF_DATASETS_OFFLINE=1") from e
    rows = []
    for task, metrics in out["results"].items():
        n = (out.get("n-samples", {}).get(task) or {}).get("effective")
        flat = {"n": n}
        for key, value in metrics.items():
            if "," not in key:
                continue  # alias, sample counts
            name, filt = key.split(",", 1)
            name = name if filt == "none" else f"{name}[{filt}]"
            flat[name.replace("_stderr", "") + "_stderr" if "_stderr" in name else name] = \
                None if value == "N/A" else value
        # The examples before each item (--num-fewshot, else the task's own): a 5-shot score is not a 0-shot one.
        shots = {"num_fewshot": out.get("n-shot", {}).get(task)}
        rows += rows_from_metrics(task, flat, {**facts, **shots}, harness=f"lm-eval {lm_eval.__version__}")
    return rows, lm_eval.__version__


def evaluate_run(run: str, cfg: Config, *, tasks=(), include_path: str | None = None, corpora=(),
                 limit: int | None = None, num_fewshot: int | None = None, out: str | None = None,
                 log=print) -> dict:
    """Evaluate the newest complete checkpoint of `run` (or the checkpoint `run`)."""
    from raylm.eval.bpb import bits_per_byte, corpus_documents, trained_with_document_mask
    from raylm.generate import load_for_inference, resolve_checkpoint

    ec, s3 = cfg.eval, cfg.s3
    if not (tasks or corpora or ec.mc_tasks or ec.gen_tasks):
        raise ConfigError("nothing to evaluate: give --tasks, --corpus, eval.mc_tasks or eval.gen_tasks")
    if limit is not None and limit < 1:  # items[:0] is nothing to score; items[:-1] all but the last item
        raise ConfigError(f"--limit={limit}: expected an integer >= 1")
    if include_path and not os.path.isdir(include_path):  # lm-eval reads none, and every task there was "unknown"
        raise ConfigError(f"--include-path {include_path}: not a directory (of lm-eval task YAMLs)")
    check_task_names(ec.mc_tasks, ec.gen_tasks)  # results rows name the task: two files of one name read alike
    for p in (*ec.mc_tasks, *ec.gen_tasks):  # nor may a task file and a harness task share a name
        if task_name(p) in tasks:
            raise ConfigError(f"{p} is task {task_name(p)!r}, as is the lm-eval task of --tasks (a built-in task is "
                              f"named by its file name): their results rows would read alike; rename the file")
    ckpt = resolve_checkpoint(run, s3)
    if not storage.is_s3(ckpt):  # recorded: a path relative to this directory names nothing from another
        ckpt = os.path.abspath(ckpt)
    meta = checkpoint.read_meta(ckpt, s3)
    # The marker's sha256 names the weights: a checkpoint written again at this step has another.
    facts = {"checkpoint": ckpt, "checkpoint_sha256": checkpoint_sha256(ckpt, s3), "step": meta.get("step"),
             "tokenizer_sha256": meta.get("tokenizer_sha256", "")}
    out = out or storage.join(storage.parent(ckpt), "eval", ckpt.rstrip("/").rsplit("/", 1)[-1])
    t0 = time.time()
    rows: list[dict] = []
    # Task files are read (and checked) before any model loads: a bad line fails fast.
    mc = {p: read_mc_task(p, s3) for p in ec.mc_tasks}
    gen = {p: read_gen_task(p, s3) for p in ec.gen_tasks}
    from raylm.data import list_corpus

    for path in corpora:
        list_corpus(path, s3)
    # Results there of this checkpoint's earlier weights go now: an evaluation that then fails
    # must not leave them for a reader to take as this checkpoint's.
    if forget_other_results(out, ckpt, facts["checkpoint_sha256"], s3):
        log(f"eval: removed the results in {out}: they scored earlier weights of {ckpt}")
    # Results there of other tasks go when this evaluation writes its own: say so now (it went
    # without a word), while the user can still stop it.
    named = {*tasks, *(task_name(p) for p in (*mc, *gen)), *(f"corpus:{p}" for p in corpora)}
    others = [t for t in earlier_tasks(out, s3) if t not in named]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        log(f"eval: {out} holds results of {shown}, which this evaluation replaces with its own when it ends; "
            f"pass --out DIR to keep both")
    version = ""
    if tasks or mc or gen:
        # One runner (one actor pool, started here) for the harness's tasks and the built-in ones.
        # Ray starts here, for the pool alone (bits per byte runs in this process), once the
        # run and the task files have been checked.
        runner = make_runner(ckpt, ec.workers, ec.cpus_per_worker, ec.gpus_per_worker, ec.batch_tokens, s3=s3,
                             ray_config=cfg)
        try:
            for p, items in mc.items():  # before the harness's work: a bad line fails fast
                check_mc_fits(p, items[:limit], runner.tok, runner.max_seq_len)
            if gen and ec.max_new_tokens >= runner.max_seq_len:  # as in-training eval refuses it
                raise ConfigError(f"eval.max_new_tokens={ec.max_new_tokens} leaves no room for a prompt in the "
                                  f"model's max_seq_len={runner.max_seq_len}; set it below that")
            if not facts["tokenizer_sha256"]:
                facts["tokenizer_sha256"] = runner.tok.sha256
            if tasks:
                harness, version = harness_rows(runner, ckpt, list(tasks), facts, include_path, limit, num_fewshot,
                                                log)
                rows += harness
            for p, items in mc.items():
                rows += rows_from_metrics(task_name(p), score_mc(runner, items[:limit]), facts)
            for p, items in gen.items():
                metrics, _ = score_gen(runner, items[:limit], ec.max_new_tokens, ec.temperature, seed=cfg.seed)
                rows += rows_from_metrics(task_name(p), metrics, facts)
        finally:
            runner.close()  # the pool's actors free their CPUs before bpb runs
    if corpora:
        model, tok, _ = load_for_inference(ckpt, s3)
        facts["tokenizer_sha256"] = facts["tokenizer_sha256"] or tok.sha256
        for path in corpora:
            # --limit: the corpus's first N documents, as it is each task's first N items
            docs = corpus_documents(path, cfg.data.text_field, s3)[:limit]
            r = bits_per_byte(model, tok, docs, source=path, document_mask=trained_with_document_mask(meta))
            rows += [{"task": f"corpus:{path}", "metric": m, "value": r[m], "stderr": None, "n": r["tokens_scored"],
                      **facts, "harness": "raylm"} for m in ("bpb", "loss", "ppl")]
    # `limit`: a score of the first N items or documents only, never to be read as the full one
    header = {**facts, "lm_eval_version": version, "seconds": round(time.time() - t0, 2),
              "workers": ec.workers, "limit": limit, "num_fewshot": num_fewshot,
              # built-in generation tasks sampled (eval.temperature > 0): their scores vary with the seed
              **({"gen_temperature": ec.temperature, "seed": cfg.seed} if gen and ec.temperature > 0 else {})}
    paths = write_results(out, rows, header, s3)
    log(f"eval: {len(rows)} results -> {paths['json']}")
    return {**header, "results": rows, "paths": paths}
