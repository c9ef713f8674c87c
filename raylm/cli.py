"""raylm: build a language model from scratch on Ray.

    raylm quickstart                         # everything on built-in defaults, local Ray
    raylm tokenizer train --data corpus/ --out tok/
    raylm data prepare --data 's3://bucket/corpus/*.jsonl.gz' --tokenizer s3://bucket/tok --out s3://bucket/prepared
    raylm pretrain --config run.yaml train.lr=1e-3 model.preset=350m
    raylm pretrain --resume --from-record runs/myrun/record.json   # continue from its newest checkpoint
    raylm pretrain --from-record runs/quickstart/record.json
    raylm generate runs/quickstart --prompt "The "
    raylm sft --from runs/quickstart --data chat.jsonl name=chat   # -> runs/chat
    raylm dpo --from runs/chat --data pairs.jsonl            # -> runs/chat-dpo
    raylm generate runs/quickstart-sft --chat --prompt "word after cat: dog cat fox"
    raylm export runs/quickstart-sft --format hf --out export/quickstart-sft
    raylm serve runs/quickstart-sft --port 8000               # OpenAI API at http://127.0.0.1:8000/v1
    raylm tune --space space.yaml name=search1 tune.num_samples=8   # -> runs/search1/best.yaml

The subcommands quickstart, pretrain, sft, dpo, tune, eval, tokenizer train and data prepare
take `--config FILE.yaml` and dotted overrides (`section.key=value`, keys in README.md);
unknown keys and wrong types are errors naming the key. run takes a recipe and dotted
overrides into it, serve ServeConfig fields (KEY=VALUE); generate, export, report and plan
take only their options, and reach S3-compatible storage through $AWS_ENDPOINT_URL and
$AWS_REGION.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys

from raylm import storage
from raylm.config import ConfigError, load_config, load_config_given, read_config_file, to_dict
from raylm.errors import UserError

# The subcommands are thin: parse, build a config, call the library.

EPILOG = "Overrides are dotted keys, e.g. train.lr=3e-4 data.seq_len=512 model.preset=gpt2-124m name=run1"


def _config(args, base: dict | None = None, given: dict | None = None, stage: str | None = None,
            check_memory: bool = True):
    """Defaults <- `base` (the subcommand's own defaults) <- --from-record's settings <- `given`
    (what the subcommand's options set) <- --config <- dotted overrides. `stage`: the run the
    subcommand trains, which a record must be of. `check_memory`: see `Config.validate`."""
    return _config_given(args, base, given, stage, check_memory)[0]


def _config_given(args, base: dict | None = None, given: dict | None = None, stage: str | None = None,
                  check_memory: bool = True):
    """`_config`, and the keys --config and the dotted overrides set (`config.load_config_given`)."""
    if getattr(args, "from_record", None):
        from raylm.record import load_record

        if getattr(args, "record", None) is None:  # read once a command, as --config below
            args.record = load_record(args.from_record)
        recorded, cfg = args.record
        if stage and recorded != stage:
            from raylm.config import STAGES

            again = f"; rerun it with `raylm {recorded} --from-record`" if recorded in STAGES else ""
            raise ConfigError(f"--from-record {args.from_record}: the record of a {recorded} stage, not {stage}{again}")
        base = _merge_dicts(base or {}, to_dict(cfg))
    base = _merge_dicts(base or {}, given or {})
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        # A (key, value) pair is never parsed as YAML: `*.jsonl`, `a: b.txt` or `true` stay paths.
        overrides.append(("data.path", args.data))
    if args.config and getattr(args, "config_text", None) is None:
        # Read once a command: a subcommand that builds its config twice (pretrain
        # --init-from-hf) must not see a file on s3:// that changed in between.
        args.config_text = read_config_file(args.config, overrides, base)
    cfg, keys = load_config_given(args.config, overrides, base=base, check_memory=check_memory,
                                  text=getattr(args, "config_text", None))
    if stage and cfg.stage != stage:  # else found only after the tokenizer, the data and record.json
        raise ConfigError(f"stage={cfg.stage}: `raylm {args.command}` trains a {stage} run; use `raylm {cfg.stage}`")
    return cfg, keys


def _merge_dicts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _max_failures(text: str) -> int:
    """--max-failures: a count of restarts, or -1 for no limit (Ray's FailureConfig convention).
    Ray Train takes any other negative number without a word, as no limit too."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < -1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0 (-1: no limit)")
    return n


def _fewshot(text: str) -> int:
    """--num-fewshot: examples before each item, 0 or more. lm-eval takes a negative count
    without a word, as none, and the results read as if the count had been run."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return n


def _path(text: str) -> str:
    """A file, directory or URI option's value, never empty: `--data "$CORPUS"` with CORPUS
    unset was read as no option at all (the built-in corpus, no --config, no --from-record,
    random init for --init-from-hf), and the run went on without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: empty; name a path (or leave the option out)")
    return text


def _name(text: str) -> str:
    """A run name option's value, never empty: `--name "$NAME"` with NAME unset took the
    default name without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: empty; give a name (or leave the option out)")
    return text


def _seed(text: str) -> int:
    """--seed: a sampling seed, 0 to 2**63 - 1 (prompt i takes seed + i; torch's generators
    take at most 2**64 - 1, and a larger one failed only after the model had loaded)."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or not 0 <= n < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer from 0 to 2**63 - 1")
    return n


def cmd_quickstart(args) -> None:
    import time

    from raylm.pipeline import pretrain, quickstart_summary
    from raylm.posttrain import quickstart_sft

    t0 = time.time()
    # Its run is a pre-training one: a record of an SFT or DPO run is refused here, as by
    # `raylm pretrain --from-record` (it ran as pre-training with the stage's settings).
    cfg = _config(args, stage="pretrain")
    summary = pretrain(cfg, resume="auto")  # its numbers are in the run's summary.json too
    sft = served = None
    if not args.no_sft:
        sft = quickstart_sft(cfg)
        from raylm.serve.local import serve_and_chat

        served = serve_and_chat(sft["run_dir"], sft["chat"]["user"])  # the OpenAI API on loopback, once
    print("\n" + quickstart_summary(summary, sft, served, time.time() - t0))


def cmd_pretrain(args) -> None:
    from raylm.pipeline import pretrain

    summary = pretrain(_pretrain_config(args), resume="must" if args.resume else "auto", max_failures=args.max_failures,
                       samples=not args.no_samples)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))


def _pretrain_config(args):
    """--init-from-hf DIR: the model shape comes from DIR's config.json, beneath --config and
    overrides, which may only repeat it (checked here, before any cluster work)."""
    if not args.init_from_hf:
        return _config(args, stage="pretrain")
    from raylm.hf import check_init_from_hf, init_from_hf_settings

    s3 = _config(args, stage="pretrain").s3  # the storage settings to read DIR with
    # Its RoPE tables are checked against memory by check_init_from_hf, naming config.json.
    cfg = _config(args, given=init_from_hf_settings(args.init_from_hf, s3), stage="pretrain", check_memory=False)
    check_init_from_hf(cfg)
    return cfg


# What a post-training stage changes from the pre-training defaults, beneath any --config or
# override. Fine-tuning a trained model wants a smaller step than training one from scratch;
# DPO the smallest, as the policy must stay near its reference (the DPO paper uses 1e-6 at
# 7B; the tiny model needs more, see tests/unit/test_synthetic.py).
STAGE_DEFAULTS = {
    "sft": {"train": {"lr": 1e-3, "max_steps": 300, "warmup_steps": 10, "eval_every": 50, "ckpt_every": 100}},
    "dpo": {"train": {"lr": 1e-4, "max_steps": 100, "warmup_steps": 5, "weight_decay": 0.0, "eval_every": 25,
                      "ckpt_every": 50}},
}


def cmd_posttrain(args) -> None:
    from raylm.posttrain import posttrain

    # The name of the run (or checkpoint) --from names: `.`, `ckpt-00000200` and `./ckpt-00000200`
    # inside a run directory name that run too.
    parent = storage.absolute(args.from_run).rstrip("/")
    name = parent.rsplit("/", 1)[-1]
    if name.startswith("ckpt-"):  # a checkpoint: name the stage after its run
        name = storage.parent(parent).rsplit("/", 1)[-1] or name
    # A recorded run (--from-record) keeps its name and settings; --from and the subcommand are the line's.
    base = {"name": f"{name}-{args.stage}", **STAGE_DEFAULTS[args.stage]}
    cfg, keys = _config_given(args, base=base, given={"stage": args.stage, "init_from": args.from_run},
                              stage=args.stage)
    # The model.* keys the command line and its --config set (from the one reading of --config):
    # post-training refuses any that differs from the parent's, even at its default value
    # (`model.dim=128` on a dim-64 parent was dropped without a word, 128 being the default).
    summary = posttrain(cfg, resume="must" if args.resume else "auto", max_failures=args.max_failures,
                        given=frozenset(k for k in keys if k.startswith("model.")))
    print(json.dumps(summary, indent=1))


def cmd_tune(args) -> None:
    from raylm import tune
    from raylm.config import _nest

    # tune.* overrides set the search (TuneConfig); the rest are the trials' base config.
    searched = [o for o in args.overrides if o.split("=", 1)[0].startswith("tune.")]
    args.overrides = [o for o in args.overrides if o not in searched]
    # Trials are pre-training runs: stage=sft or dpo (an override, --config, or the record of
    # such a run) prepared the data and started Ray, then failed every trial with a traceback.
    cfg = _config(args, stage="pretrain")
    if args.resume:
        _check_resume_settings(args, searched, cfg)
        summary = tune.resume(cfg)
    elif not args.space:
        raise ConfigError("tune needs --space SPACE.yaml (or --resume to continue a search)")
    else:
        summary = tune.tune(cfg, args.space, _nest(searched).get("tune", {}))
    print(json.dumps(summary, indent=1, default=str))


def _check_resume_settings(args, searched: list, cfg) -> None:
    """`tune --resume` continues a search with the space and settings it saved: where to find
    it (name, storage, s3.*) is all the command line may give."""
    from raylm.config import Config

    where = {"name": cfg.name, "storage": cfg.storage, "s3": to_dict(cfg.s3)}
    changed = _changed({**to_dict(Config()), **where}, to_dict(cfg))  # by --config, --data or an override
    given = (["--space"] if args.space else []) + searched + [f"{k}={v!r}" for k, v in changed]
    if given:
        raise ConfigError(f"tune --resume: {given[0]} is not taken: a resumed search keeps its saved space and "
                          f"settings (only name=, storage= and s3.* apply); start a new search (another name=) "
                          f"to change them")


def _changed(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object]]:
    """The dotted keys whose values differ between two config dicts, with b's values."""
    out = []
    for k, v in b.items():
        if isinstance(v, dict):
            out += _changed(a[k], v, f"{prefix}{k}.")
        elif v != a[k]:
            out.append((prefix + k, v))
    return out


def cmd_tokenizer_train(args) -> None:
    import tempfile

    from raylm.errors import OutputExistsError
    from raylm.pipeline import ensure_corpus, train_tokenizer_from

    cfg = _config(args)
    # Never written over, as export's --out: it may be a run's own tokenizer, which that run's
    # checkpoints and prepared data were made with (and checked before the work, not after it).
    # An empty local directory holds nothing to lose.
    out = args.out
    if storage.is_s3(out):
        taken = storage.exists(out, cfg.s3)
    else:  # a link, even to nothing, would be replaced by the rename into place
        taken = os.path.lexists(out) and (os.path.islink(out) or not os.path.isdir(out) or bool(os.listdir(out)))
    if taken:
        raise OutputExistsError(f"--out {out}: already exists; write the tokenizer to a new directory")
    if not storage.is_s3(out):  # else found once the tokenizer had trained, as an OSError traceback
        parent = os.path.dirname(os.path.abspath(out))
        try:
            os.makedirs(parent, exist_ok=True)
            tempfile.TemporaryDirectory(dir=parent).cleanup()  # what the tokenizer's write does there
        except OSError as e:
            raise storage.StorageError(out, f"cannot write a tokenizer there ({parent}: {e.strerror or e}); "
                                            f"name another --out") from None
    train_tokenizer_from(ensure_corpus(cfg), out)


def cmd_data_prepare(args) -> None:
    import dataclasses

    from raylm.data import corpus_files, prepare, runs_in_process
    from raylm.generate import load_tokenizer
    from raylm.pipeline import init_ray, log, preflight

    # Preparing trains no model: data.seq_len is checked against the model of the run that trains
    # on the data (`raylm pretrain` checks it), not against the model.* defaults here.
    # Last, over --config and overrides: a model.preset there replaces the model settings beneath it.
    args.overrides = [*args.overrides, ("model.max_seq_len", sys.maxsize)]
    cfg = _config(args, check_memory=False)
    if not cfg.data.path:
        raise ConfigError("data prepare needs --data (or data.path)")
    if not cfg.data.val_fraction and not cfg.data.val_path:  # else refused once the whole corpus was tokenized
        raise ConfigError("data.val_fraction=0 holds out nothing and no data.val_path is set: the validation split "
                          "would be empty; raise data.val_fraction or set data.val_path")
    tok_path = args.tokenizer or cfg.tokenizer.path
    if not tok_path:
        raise ConfigError("data prepare needs --tokenizer DIR (or tokenizer.path); train one with `raylm tokenizer train`")
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=tok_path))
    cfg, corpus = preflight(cfg, out=args.out)
    tok = load_tokenizer(tok_path, cfg.s3)
    if not runs_in_process(cfg.data, *(corpus or corpus_files(cfg.data, cfg.s3))):
        init_ray(cfg)
    manifest = prepare(cfg.data, tok, args.out, cfg.seed, cfg.s3, log=log, corpus=corpus)
    st = manifest["stats"]
    print(json.dumps({"out": args.out, "train_blocks": manifest["train"]["blocks"],
                      "val_blocks": manifest["val"]["blocks"], "documents_read": st["documents_read"],
                      "documents_kept": st["documents"], "dropped": st["dropped"],
                      "bad_records": len(st["bad_records"]), "pii_replaced": st["pii"], "tokens": st["tokens"],
                      "datacard": storage.join(args.out, "DATACARD.md")}, indent=1))


def cmd_serve(args) -> None:
    import time

    from raylm.config import Config, load_serve_config
    from raylm.pipeline import init_ray, serve_ingress
    from raylm.serve.app import APP_NAME, check_port_free, start
    from raylm.serve.local import serve_running, stop_app, wait_ready

    explicit = {k: v for k, v in (("engine", args.engine), ("host", args.host), ("port", args.port),
                                  ("api_key", args.api_key)) if v is not None}
    if _OVERRIDE.match(args.run) and not os.path.exists(args.run):  # else named only once Ray had started
        raise ConfigError(f"serve: no run given ({args.run!r} is a KEY=VALUE override); "
                          "usage: raylm serve RUN [KEY=VALUE ...]")
    cfg = load_serve_config(args.overrides, **explicit)
    if args.detach and not os.environ.get("RAY_ADDRESS"):  # the app would end with this command's own cluster
        raise ConfigError("serve --detach leaves the app running on a cluster this command joins (RAY_ADDRESS); "
                          "without one, the local cluster it starts ends with it: leave out --detach")
    if not os.environ.get("RAY_ADDRESS"):  # a cluster of our own: Serve is not listening there yet
        check_port_free(cfg)  # before Ray starts, not after (start() checks where Serve may run)
    if cfg.engine == "raylm":
        from raylm.serve.app import resolve_api_key

        resolve_api_key(cfg)  # a host beyond loopback without a key: refused before Ray starts, not after
        _check_served_model(args.run)
    else:
        from raylm.serve.vllm import check_access

        check_access(cfg)
    init_ray(Config())
    ran_before = serve_running()  # a joined cluster's Serve, which may carry others' apps
    if ran_before and not args.detach:
        from ray import serve

        if APP_NAME in serve.status().applications:  # replaced here, and deleted at Ctrl-C
            raise ConfigError(f"Serve on the cluster at RAY_ADDRESS already runs an app named {APP_NAME!r} "
                              "(a detached `raylm serve`?); stop it with `serve shutdown`, or update it "
                              "with `raylm serve --detach`")
    url = start(args.run, cfg)
    try:
        wait_ready(url, timeout=600)
    except BaseException:  # not ready in time, or Ctrl-C meanwhile: a joined cluster's Serve keeps no app of ours
        if not args.detach:
            stop_app(APP_NAME, ran_before)
        raise
    if args.detach:  # Serve's apps outlive this process on a cluster (jobs/serve.py)
        print(f"serving {args.run} at {url}/v1 (OpenAI API); stop it with `serve shutdown`", flush=True)
        return
    via = "HAProxy" if serve_ingress() == "haproxy" else "Serve's proxy"
    print(f"serving {args.run} at {url}/v1 (OpenAI API, through {via}; Ctrl-C stops after in-flight requests "
          "finish)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        # Graceful: replicas drain their in-flight requests first. A Serve that ran before this
        # command (a joined cluster's) keeps running, and so does one this command started
        # where other commands deployed apps on it meanwhile.
        stop_app(APP_NAME, ran_before)


def _check_served_model(run: str) -> None:
    """Before Ray starts: the replicas build the model, and RoPE tables no memory holds (a
    meta.json claiming model.max_seq_len=10^15) failed there, as a traceback once Ray and
    Serve had started. Without RAY_ADDRESS a run that is not there is named here too (it was
    named by `serve.app.start`, after Ray's start-up); a joined cluster's is left to it, as
    before."""
    from raylm.checkpoint import META, read_meta
    from raylm.config import check_rope_memory
    from raylm.generate import checkpoint_model_config, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(run)
    except UserError:
        if os.environ.get("RAY_ADDRESS"):
            return
        raise
    check_rope_memory(checkpoint_model_config(ckpt, read_meta(ckpt)), where=storage.join(ckpt, META))


def cmd_generate(args) -> None:
    from raylm.config import S3Config
    from raylm.generate import chat_reply, complete, load_for_inference

    from raylm.config import SampleConfig

    # The same ranges as the config's sample.* keys, checked before the model loads.
    SampleConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k).validate()
    if not 0 < args.top_p <= 1:  # nan too
        raise ConfigError(f"--top-p {args.top_p}: expected a number in (0, 1]; 1: no cut-off")
    model, tok, _ = load_for_inference(args.checkpoint, S3Config())
    prompts = args.prompt or (["Hello!"] if args.chat else ["The "])
    limit = model.cfg.max_seq_len
    for i, prompt in enumerate(prompts):  # the sampler keeps a prompt's last tokens and stops at the context
        n = len(tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
                if args.chat else tok.encode(prompt))
        if n >= limit:
            raise ConfigError(f"--prompt #{i + 1} is {n} tokens, the model's context is {limit} "
                              f"(model.max_seq_len): shorten it")
        if n + args.max_new_tokens > limit:
            print(f"raylm: --prompt #{i + 1}: {limit - n} new tokens fit after its {n} in the model's context "
                  f"of {limit}, not --max-new-tokens {args.max_new_tokens}", file=sys.stderr)
    if args.chat:  # the prompt is a user turn; the answer is the assistant's, up to end of turn
        for i, prompt in enumerate(prompts):
            print(chat_reply(model, tok, [{"role": "user", "content": prompt}], args.max_new_tokens, args.temperature,
                             args.top_k, args.seed + i, top_p=args.top_p))
            print("---")
        return
    for text in complete(model, tok, prompts, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                         top_p=args.top_p):
        print(text)
        print("---")


def cmd_export(args) -> None:
    from raylm.config import S3Config

    from raylm.export import exporter

    dtype, export_run = exporter(args.format, args.dtype)
    out = export_run(args.run, args.out, S3Config(), checkpoint=args.checkpoint, dtype=dtype)
    print(json.dumps({"format": args.format, "out": out}, indent=1))


def cmd_run(args) -> None:
    from raylm.recipe import load_recipe, run_recipe

    path, overrides = args.recipe, list(args.overrides)
    if args.config:  # `--config FILE`, as the per-stage entrypoints take it
        if path:
            overrides.insert(0, path)
        path = args.config
    if not path or "=" in path:
        raise ConfigError("run needs a recipe: raylm run RECIPE.yaml [KEY=VALUE ...] (see jobs/recipes/)")
    recipe = load_recipe(path, overrides)
    if args.check:
        print(json.dumps({"recipe": path, "root": storage.redact_url(recipe.root),
                          "stages": [s.name for s in recipe.stages]}, indent=1))
        return
    done = run_recipe(recipe)
    print(json.dumps({name: {"skipped": r["skipped"], "key": r["key"][:10], **r["outputs"]}
                      for name, r in done.items()}, indent=1), flush=True)
    serve = done.get("serve")
    if serve and not serve["skipped"] and not os.environ.get("RAY_ADDRESS"):
        # A local cluster ends with this process: keep serving, as `raylm serve` does. In a
        # job (RAY_ADDRESS set) the application stays on the cluster after the job ends.
        import time

        print(f"serving at {serve['outputs']['url']}/v1 (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)


def cmd_report(args) -> None:
    from raylm.config import S3Config
    from raylm.eval.report import write_report

    try:
        summary = write_report(args.runs, args.out, S3Config(), tensorboard=not args.no_tensorboard)
    except ImportError as e:  # tensorboardX is the optional extra
        raise ConfigError(str(e)) from None
    print(json.dumps(summary, indent=1))


def cmd_eval(args) -> None:
    from raylm.eval.run import evaluate_run
    from raylm.progress import to_stderr

    overrides = list(args.overrides)
    if args.mc:
        overrides.append(("eval.mc_tasks", list(args.mc)))
    if args.gen:
        overrides.append(("eval.gen_tasks", list(args.gen)))
    if args.workers is not None:
        overrides.append(f"eval.workers={args.workers}")
    cfg = load_config(args.config, overrides)
    tasks = [t for t in (args.tasks or "").split(",") if t]
    # Its log lines on stderr, as its progress: stdout is the results (`raylm eval ... > results.md`).
    out = evaluate_run(args.run, cfg, tasks=tasks, include_path=args.include_path, corpora=args.corpus or (),
                       limit=args.limit, num_fewshot=args.num_fewshot, out=args.out, log=to_stderr)
    from raylm.eval.results import limit_note, markdown_table

    if args.limit:  # as results.md says it: a table of part of each task must not read as the score
        print(limit_note(args.limit) + "\n")
    print(markdown_table(out["results"]), end="")
    print(json.dumps(out["paths"]))


def cmd_plan(args) -> None:
    from raylm import storage
    from raylm.errors import OutputExistsError
    from raylm.plan import format_table, make_plan, write_recipe

    if args.out and storage.exists(args.out):  # an output the user named is never written over
        raise OutputExistsError(f"--out {args.out}: already exists; write the config to a new file")
    plan = make_plan(args.size, args.gpus, args.nodes, args.tokens, args.language, args.domain, args.seq_len,
                     args.mfu, args.train_tokens, args.memory_gb, args.data or "", args.name,
                     args.replicate_degree, args.document_mask)
    print(format_table(plan))
    if args.out:
        write_recipe(plan, args.out)
        print(f"config: {args.out} (raylm pretrain --config {args.out})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raylm", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of every error, including the one-line ones")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help, parent=sub, record=True, run=None):
        sp = parent.add_parser(name, help=help, description=help, epilog=EPILOG)
        sp.add_argument("--config", metavar="FILE.yaml", action=_Once, type=_path,
                        help="YAML config, local or s3://; overrides apply on top")
        if record:
            sp.add_argument("--from-record", metavar="RECORD.json", type=_path,
                            help="rerun with the settings of an earlier run's record.json")
        if run:  # before the overrides, as `raylm eval RUN KEY=VALUE` is written (see _place_run)
            sp.add_argument("run", help=run)
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
        sp.set_defaults(func=func)
        return sp

    sp = add("quickstart", cmd_quickstart,
             "Train a tokenizer and a tiny model on a built-in offline corpus on a local Ray cluster "
             "sized to this machine (a few minutes on a laptop CPU), print validation perplexity and "
             "samples, then fine-tune it (SFT) on a built-in synthetic instruction set, print one "
             "chat exchange, serve it once through the OpenAI API on loopback and print a summary.")
    sp.add_argument("--no-sft", action="store_true", help="stop after pre-training")

    sp = add("pretrain", cmd_pretrain,
             "Pre-train on Ray Train: corpus -> tokenizer -> packed blocks -> FSDP2 workers. Resumes "
             "automatically from the newest complete checkpoint of the same run name.")
    sp.add_argument("--data", type=_path, help="corpus path/glob (local or s3://) or a prepared dataset directory")
    sp.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    sp.add_argument("--max-failures", type=_max_failures, default=0, metavar="N",
                    help="restart the worker group up to N times after a worker dies (-1: no limit)")
    sp.add_argument("--no-samples", action="store_true", help="skip sampling after training")
    sp.add_argument("--init-from-hf", metavar="DIR", type=_path,
                    help="start from a Hugging Face LlamaForCausalLM directory (local or s3://, safetensors): "
                         "its config.json gives the model shape; needs tokenizer.path")

    for stage, what in (("sft", "Supervised fine-tuning on chat records ({messages: [{role, content}, ...]} or "
                                "{prompt, completion}; jsonl or parquet, local or s3://): loss on assistant "
                                "turns only, conversations packed with document masking."),
                        ("dpo", "Direct preference optimisation on {prompt|messages, chosen, rejected} records, "
                                "against the starting model as the frozen reference (or its precomputed "
                                "log-probs: dpo.precompute_reference=true).")):
        sp = add(stage, cmd_posttrain, f"{what} Starts from --from RUN's weights (its tokenizer too) on the "
                                       f"same Ray Train FSDP2 loop as pretrain; the run is named RUN-{stage} "
                                       f"unless name= says otherwise.")
        sp.add_argument("--from", dest="from_run", required=True, metavar="RUN", type=_path,
                        help="run directory or checkpoint (local or s3://) whose weights to start from")
        sp.add_argument("--data", type=_path, help="records: a file, directory or glob (local or s3://)")
        sp.add_argument("--resume", action="store_true", help="require a checkpoint of this run to resume from")
        sp.add_argument("--max-failures", type=_max_failures, default=0, metavar="N",
                        help="restart the worker group up to N times after a worker dies (-1: no limit)")
        sp.set_defaults(stage=stage)

    sp = add("tune", cmd_tune,
             "Hyperparameter search (Ray Tune) over real pre-training runs on Ray Train: a search space in "
             "Tune's vocabulary over config keys, ASHA early stopping on validation loss, random, grid or "
             "Optuna TPE search; a ranked table, the best config as YAML for `raylm pretrain`, and a plot. "
             "The search lives in <storage>/<name>; tune.* overrides set the search (num_samples, "
             "max_concurrent_trials, scheduler, search, ...).")
    sp.add_argument("--space", metavar="SPACE.yaml", type=_path,
                    help="search space, e.g. 'train.lr: loguniform(1e-4, 3e-3)'")
    sp.add_argument("--data", type=_path, help="corpus path/glob (local or s3://) or a prepared dataset directory")
    sp.add_argument("--resume", action="store_true",
                    help="continue the search name= under storage= (finished trials are kept)")

    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="sub", required=True,
                                                                                 metavar="COMMAND")
    sp = add("train", cmd_tokenizer_train, "Train a SentencePiece BPE tokenizer on a corpus sample.", tok)
    sp.add_argument("--data", type=_path, help="corpus path/glob (default: the built-in corpus)")
    sp.add_argument("--out", required=True, type=_path,
                    help="output directory (local or s3://); must not exist (or be an empty directory)")

    dat = sub.add_parser("data", help="data commands").add_subparsers(dest="sub", required=True,
                                                                       metavar="COMMAND")
    sp = add("prepare", cmd_data_prepare,
             "Read, clean, de-duplicate (exact and MinHash near-duplicates), redact PII, tokenize and "
             "pack a corpus into parquet shards, with a manifest (provenance per shard) and a data card.", dat)
    sp.add_argument("--data", type=_path, help="corpus path/glob (local or s3://)")
    sp.add_argument("--out", required=True, type=_path, help="output directory (local or s3://)")
    sp.add_argument("--tokenizer", type=_path, help="tokenizer directory (default: tokenizer.path)")

    sp = sub.add_parser("export", help="Export a run (local or s3://) for other tools.",
                        description="Export a run's newest complete checkpoint (or --checkpoint). --format hf: a "
                                    "Hugging Face LlamaForCausalLM directory (config.json, model.safetensors sharded "
                                    "above 5 GB, generation_config.json, a tokenizer AutoTokenizer loads, the chat "
                                    "template). --format gguf: one llama.cpp file (llama architecture, SentencePiece "
                                    "vocabulary, chat template). The output appears only when complete.")
    sp.add_argument("run", help="run directory or checkpoint, local or s3://")
    sp.add_argument("--format", choices=["hf", "gguf"], default="hf",
                    help="hf: transformers, vLLM, lm-eval; gguf: llama.cpp")
    sp.add_argument("--out", required=True, type=_path,
                    help="output directory (hf) or file (gguf), local or s3://; must not exist")
    sp.add_argument("--checkpoint", type=_path,
                    help="a checkpoint name in the run (ckpt-00001000) instead of the newest")
    sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "f32", "f16", "q8_0"],
                    help="hf: float32 (default), bfloat16, float16; gguf: f32 (default), f16, q8_0")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("run", help="Run a recipe: tokenizer, data, pretrain, sft, dpo, eval, export, serve.",
                        description="Run the stages a recipe (jobs/recipes/*.yaml) names, in order. Stages done "
                                    "with unchanged settings and outputs still in storage are skipped; a changed "
                                    "stage reruns with everything after it. Records: <storage>/<name>/stages/.",
                        epilog="Overrides are dotted keys into the recipe, e.g. storage=s3://bucket/recipes "
                               "stages.pretrain.train.max_steps=100 train.num_workers=8")
    sp.add_argument("recipe", nargs="?", help="recipe YAML file (or --config FILE)")
    sp.add_argument("--config", metavar="RECIPE.yaml", action=_Once, type=_path, help="the recipe, as a flag")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides")
    sp.add_argument("--check", action="store_true", help="validate every stage's config and stop")
    sp.set_defaults(func=cmd_run)

    sp = add("eval", cmd_eval,
             "Evaluate a run's newest complete checkpoint (or a checkpoint): lm-evaluation-harness tasks "
             "(--tasks, on a pool of Ray actors), built-in multiple-choice and generation task files, and "
             "bits per byte on corpora. Writes results.json and results.md.", record=False,
             run="run directory or checkpoint, local or s3://")
    sp.add_argument("--tasks", help="lm-eval tasks, comma-separated (hellaswag,arc_easy); needs raylm[eval]")
    sp.add_argument("--include-path", type=_path, help="directory of lm-eval task YAMLs (your own tasks)")
    sp.add_argument("--mc", action="append", type=_path,
                    help="built-in multiple-choice task file {context, choices, gold} (repeatable)")
    sp.add_argument("--gen", action="append", type=_path,
                    help="built-in generation task file {context, answer} (repeatable)")
    sp.add_argument("--corpus", action="append", type=_path,
                    help="corpus for loss, perplexity and bits per byte (repeatable)")
    sp.add_argument("--limit", type=int, help="score only the first N items of each task and the first N documents "
                    "of each --corpus (recorded in the results as a partial score)")
    sp.add_argument("--num-fewshot", type=_fewshot, help="lm-eval few-shot examples")
    sp.add_argument("--workers", type=int, help="actors of the scoring pool (0: this process); eval.workers")
    sp.add_argument("--out", type=_path, help="output directory (default: <run>/eval/<checkpoint>)")

    sp = sub.add_parser("generate", help="Sample continuations from a checkpoint or run directory.",
                        description="Sample continuations from a checkpoint or run directory.")
    sp.add_argument("checkpoint", help="checkpoint directory, or a run directory (newest complete checkpoint)")
    sp.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    sp.add_argument("--max-new-tokens", type=int, default=100, metavar="N",
                    help="tokens to sample after each prompt, within the model's context (default 100)")
    sp.add_argument("--temperature", type=float, default=0.8,
                    help="sampling temperature; 0: greedy (default 0.8)")
    sp.add_argument("--top-k", type=int, default=50, metavar="K",
                    help="sample among the K most likely tokens; 0: no cut-off (default 50)")
    sp.add_argument("--top-p", type=float, default=1.0, metavar="P",
                    help="sample among the most likely tokens whose probabilities reach P (nucleus sampling, "
                         "as the server's top_p); 1: no cut-off (default 1)")
    sp.add_argument("--seed", type=_seed, default=0,
                    help="sampling seed, 0 to 2**63 - 1; prompt i (and chat reply i) uses seed + i (default 0)")
    sp.add_argument("--chat", action="store_true",
                    help="treat each prompt as a user turn and print the assistant's reply (SFT/DPO models)")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("serve", help="Serve a run (local or s3://) with an OpenAI-compatible API on Ray Serve.",
                        description="Serve a run or checkpoint (local or s3://) on Ray Serve: /v1/completions, "
                                    "/v1/chat/completions (streaming too), /v1/models, /health, /ready. Joins "
                                    "RAY_ADDRESS or starts a local cluster. KEY=VALUE sets ServeConfig fields "
                                    "(max_batch_size=32, max_queued_requests=128, autoscale_max_replicas=4, ...).")
    sp.add_argument("run", help="run or checkpoint directory (raylm engine), or an HF export (--engine vllm)")
    sp.add_argument("--engine", choices=["raylm", "vllm"], help="raylm (default): CPU or one GPU; vllm: GPU clusters")
    sp.add_argument("--host", help="bind address (default 127.0.0.1; anything else needs an API key)")
    sp.add_argument("--port", type=int, help="HTTP port (default 8000)")
    sp.add_argument("--api-key", help="clients send 'Authorization: Bearer KEY' (default: $RAYLM_API_KEY, the better "
                                       "place: a key given here stays in the process list, which every user of "
                                       "the machine can read)")
    sp.add_argument("--detach", action="store_true",
                    help="return once the app is ready, leaving it running on the cluster (RAY_ADDRESS)")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ServeConfig fields")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("report", help="Plot runs' metrics (PNG) and write TensorBoard event files.",
                        description="Draw train and validation loss, learning rate, throughput and every "
                                    "in-training eval metric against step into DIR/report.png (several runs "
                                    "overlaid, one colour each), and write DIR/tensorboard/<run>/ for "
                                    "`tensorboard --logdir DIR/tensorboard`.")
    sp.add_argument("runs", nargs="+", metavar="RUN", help="run directories, local or s3://")
    sp.add_argument("--out", metavar="DIR", type=_path,
                    help="output directory, local or s3:// (default: RUN/report; required for several runs); "
                         "a report.png there is replaced only if raylm report drew it")
    sp.add_argument("--no-tensorboard", action="store_true", help="write the PNG only")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("plan", help="Plan a pre-training run: budget, batch, layout, memory, time; write its config.",
                        description="Turn a target size, hardware and data into a ready config and a table: token "
                                    "budget, batch and LR, FSDP layout, micro-batch, memory per device, time at a "
                                    "stated MFU, and data-worker CPUs. Rules and sources: raylm/plan.py.")
    sp.add_argument("--size", required=True, help="tiny, 125m, 350m, 1b, 3b or 7b (raylm's presets)")
    sp.add_argument("--gpus", required=True, metavar="NxDEVICE", help="devices per node, e.g. 8xH100, 1xA100, 2xCPU")
    sp.add_argument("--nodes", type=int, default=1, help="nodes of --gpus each (default 1)")
    sp.add_argument("--tokens", help="tokens of data available, e.g. 50B (default: as many as needed)")
    sp.add_argument("--train-tokens", help="train on this many tokens instead of the compute-optimal budget")
    sp.add_argument("--language", default="en", help="the data's language (bytes per token, data CPUs)")
    sp.add_argument("--domain", default="web", help="web, books, wiki, code, math or chat")
    sp.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's context; 128 on CPUs)")
    sp.add_argument("--mfu", type=float,
                    help="model FLOPs utilisation to assume: a run's logged `mfu`, used as it is (with activation "
                         "checkpointing it already includes the recompute). Default 0.40 GPU, 0.45 CPU, for a step "
                         "without recompute: the plan then divides by the recompute (x 1.20-1.26) when it checkpoints")
    sp.add_argument("--memory-gb", type=float,
                    help="memory per device, GiB, instead of the total nvidia-smi reports for the device")
    sp.add_argument("--data", type=_path, help="corpus path for the config's data.path (local or s3://)")
    sp.add_argument("--name", type=_name, help="run name in the config (default: <preset>-<devices><device>, the preset "
                                   "--size names and the devices of all nodes: --size 125m --gpus 8xH100 "
                                   "--nodes 2 is gpt2-124m-16h100)")
    sp.add_argument("--replicate-degree", type=int, default=1, metavar="N",
                    help="HSDP: N replicas, each sharding over devices/N (train.replicate_degree; default 1, plain FSDP)")
    sp.add_argument("--document-mask", action="store_true",
                    help="data.document_mask=true: attention within each packed document (the plan counts its "
                         "per-layer attention bias, and the config sets it)")
    sp.add_argument("--out", metavar="FILE.yaml", type=_path, help="write the config here (local or s3://)")
    sp.set_defaults(func=cmd_plan)
    return p


class _Once(argparse.Action):
    """An option given at most once. argparse keeps the last of several without a word, and a
    second --config would drop every setting of the first file."""

    def __call__(self, parser, namespace, values, option_string=None):
        first = getattr(namespace, self.dest, None)
        if first is not None:
            parser.error(f"{option_string} given twice ({first}, {values}): give one file, with the other's "
                         f"settings in it or as KEY=VALUE overrides")
        setattr(namespace, self.dest, values)


# A dotted override as written on the line: `eval.workers=0`, `max_batch_size=32`. A path never
# matches once it has a '/' before its first '=' (`runs/lr=3e-4`).
_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def _place_run(args, extra: list[str]) -> list[str]:
    """The run of `eval` and `serve`, wherever it sits among the KEY=VALUE overrides.
    argparse hands the run positional whichever word falls in its place (`raylm serve
    max_batch_size=32 runs/x` served the run "max_batch_size=32" with the override "runs/x"),
    or none (after an option: `raylm eval eval.workers=0 --limit 3 runs/x`). Where the run
    looks like an override and exactly one word does not, that word is the run. Returns the
    rest of `extra`."""
    run = getattr(args, "run", None)
    if not isinstance(run, str) or not hasattr(args, "overrides") or not _OVERRIDE.match(run):
        return extra
    words = [run, *args.overrides, *(e for e in extra if not e.startswith("-"))]
    paths = [i for i, w in enumerate(words) if not _OVERRIDE.match(w)]
    if len(paths) != 1:
        return extra
    args.run = words[paths[0]]
    args.overrides = words[:paths[0]] + words[paths[0] + 1:]
    return [e for e in extra if e.startswith("-")]


def _root_cause(e: BaseException) -> BaseException:
    """Unwrap Ray's task/training wrappers down to the error a user can act on. Only Ray's:
    raylm's own errors are raised `from` the library error they explain (a StorageError from
    botocore's), and are the ones to show."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "worker_failures", None)
        if failures:
            # The first rank whose cause is the user's mistake, if any rank's is (another rank
            # may have crashed meanwhile, e.g. in a collective its peer left), else the first.
            causes = [_root_cause(f) for f in failures.values()]
            e = next((c for c in causes if isinstance(c, USER_ERRORS)), causes[0])
            break
        from_ray = type(e).__module__.split(".")[0] == "ray"
        inner = (getattr(e, "cause", None) or getattr(e, "controller_failure", None)
                 or (e.__cause__ if from_ray else None))
        if isinstance(inner, BaseException):
            e = inner
            continue
        break
    return e


# Exactly raylm's own error types print as one line: a ValueError or OSError from anywhere else
# may be raylm's bug, and a one-line message would hide it as if it were the user's mistake.
USER_ERRORS = (UserError,)


def _bug_report_line() -> str:
    """Where to report a bug: the package's issue tracker when its metadata names one."""
    try:
        from importlib.metadata import metadata

        for entry in metadata("raylm").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() in ("issues", "bug tracker", "bugs", "tracker"):
                return f"raylm: this is a bug in raylm; please report it with the traceback above at {url.strip()}"
    except Exception:  # the report line must never replace the traceback it follows
        pass
    return "raylm: this is a bug in raylm; please report this as a bug, with the traceback above"


def _stdout_gone() -> bool:
    """Whether stdout's reader has gone (`raylm plan ... | head -1`), which is no bug: then
    stdout is pointed at /dev/null, so that Python's own flush at exit stays quiet too. A
    broken pipe anywhere else (a socket, a subprocess) leaves stdout writable: a bug as before."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in stream (tests) has no reader to lose
        return False
    poll = select.poll()  # a pipe's write end whose read end has closed polls as an error
    poll.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poll.poll(0)):
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True


def user_error_line(cause: BaseException) -> str:
    """The one line a user's mistake ends with (`cause`: one of USER_ERRORS, `_root_cause`'s)."""
    msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    # Messages echo the values they name, and stderr reaches job logs: no URL credentials.
    return f"raylm: error: {storage.redact_url(msg)}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may sit anywhere on the line (`pretrain --data x train.lr=1e-3 --resume`).
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # also accepted after the subcommand
        extra = [a for a in extra if a != "--debug"]
        args.debug = True
    extra = _place_run(args, extra)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from raylm.interrupts import stop_on_sigterm

    stop_on_sigterm()  # before Ray too: it is not started for every command, nor at once
    try:
        args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that has gone is seen below
    except KeyboardInterrupt:
        print("raylm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for errors a user can fix; a traceback for bugs
        import traceback

        if isinstance(e, BrokenPipeError) and _stdout_gone():
            return 128 + signal.SIGPIPE  # as a process that SIGPIPE ended: the shell's 141
        cause = _root_cause(e)
        if isinstance(cause, USER_ERRORS):
            if args.debug:
                traceback.print_exception(e, file=sys.stderr)
            print(user_error_line(cause), file=sys.stderr)
            return 2
        traceback.print_exception(e, file=sys.stderr)
        print(_bug_report_line(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
