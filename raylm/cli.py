"""raylm: build a language model from scratch on Ray.

    raylm quickstart                         # everything on built-in defaults, local Ray
    raylm tokenizer train --data corpus/ --out tok/
    raylm data prepare --data 's3://bucket/corpus/*.jsonl.gz' --out s3://bucket/prepared
    raylm pretrain --config run.yaml train.lr=1e-3 model.preset=350m
    raylm pretrain --resume name=myrun       # continue from the newest complete checkpoint
    raylm pretrain --from-record runs/quickstart/record.json
    raylm generate runs/quickstart --prompt "The "
    raylm sft --from runs/quickstart --data chat.jsonl       # -> runs/quickstart-sft
    raylm dpo --from runs/quickstart-sft --data pairs.jsonl  # -> runs/quickstart-sft-dpo
    raylm generate runs/quickstart-sft --chat --prompt "reverse: abc"
    raylm export runs/quickstart-sft --format hf --out export/quickstart-sft

Every subcommand takes `--config FILE.yaml` and dotted overrides (`section.key=value`);
unknown keys and wrong types are errors naming the key. See README.md for the config keys.
"""

from __future__ import annotations

import argparse
import json
import sys

from raylm import storage
from raylm.config import ConfigError, load_config, to_dict

# The subcommands are thin: parse, build a config, call the library.

EPILOG = "Overrides are dotted keys, e.g. train.lr=3e-4 data.seq_len=512 model.preset=gpt2-124m name=run1"


def _config(args, base: dict | None = None):
    if getattr(args, "from_record", None):
        from raylm.record import load_record

        _, cfg = load_record(args.from_record)
        base = _merge_dicts(to_dict(cfg), base or {})
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        # A (key, value) pair is never parsed as YAML: `*.jsonl`, `a: b.txt` or `true` stay paths.
        overrides.append(("data.path", args.data))
    return load_config(args.config, overrides, base=base)


def _merge_dicts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cmd_quickstart(args) -> None:
    from raylm.pipeline import pretrain
    from raylm.posttrain import quickstart_sft

    cfg = _config(args)
    summary = pretrain(cfg, resume="auto")
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    if not args.no_sft:
        sft = quickstart_sft(cfg)
        print(f"next: raylm generate {sft['run_dir']} --chat --prompt '{sft['chat']['user']}'")


def cmd_pretrain(args) -> None:
    from raylm.pipeline import pretrain

    summary = pretrain(_config(args), resume="must" if args.resume else "auto", max_failures=args.max_failures,
                       samples=not args.no_samples)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))


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

    parent = args.from_run.rstrip("/")
    name = parent.rsplit("/", 1)[-1]
    if name.startswith("ckpt-"):  # a checkpoint: name the stage after its run
        name = parent.rsplit("/", 2)[-2] if parent.count("/") else name
    base = {"stage": args.stage, "init_from": args.from_run, "name": f"{name}-{args.stage}",
            **STAGE_DEFAULTS[args.stage]}
    summary = posttrain(_config(args, base=base), resume="must" if args.resume else "auto",
                        max_failures=args.max_failures)
    print(json.dumps(summary, indent=1))


def cmd_tokenizer_train(args) -> None:
    from raylm.pipeline import ensure_corpus, train_tokenizer_from

    cfg = ensure_corpus(_config(args))
    train_tokenizer_from(cfg, args.out)


def cmd_data_prepare(args) -> None:
    import dataclasses

    from raylm.data import prepare
    from raylm.generate import load_tokenizer
    from raylm.pipeline import init_ray, log, preflight

    cfg = _config(args)
    if not cfg.data.path:
        raise ConfigError("data prepare needs --data (or data.path)")
    tok_path = args.tokenizer or cfg.tokenizer.path
    if not tok_path:
        raise ConfigError("data prepare needs --tokenizer DIR (or tokenizer.path); train one with `raylm tokenizer train`")
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=tok_path))
    cfg, corpus = preflight(cfg, out=args.out)
    tok = load_tokenizer(tok_path, cfg.s3)
    init_ray(cfg)
    manifest = prepare(cfg.data, tok, args.out, cfg.seed, cfg.s3, log=log, corpus=corpus)
    st = manifest["stats"]
    print(json.dumps({"out": args.out, "train_blocks": manifest["train"]["blocks"],
                      "val_blocks": manifest["val"]["blocks"], "documents_read": st["documents_read"],
                      "documents_kept": st["documents"], "dropped": st["dropped"],
                      "bad_records": len(st["bad_records"]), "pii_replaced": st["pii"], "tokens": st["tokens"],
                      "datacard": storage.join(args.out, "DATACARD.md")}, indent=1))


def cmd_generate(args) -> None:
    from raylm.config import S3Config
    from raylm.generate import chat_reply, complete, load_for_inference

    from raylm.config import SampleConfig

    # The same ranges as the config's sample.* keys, checked before the model loads.
    SampleConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k).validate()
    model, tok, _ = load_for_inference(args.checkpoint, S3Config())
    if args.chat:  # the prompt is a user turn; the answer is the assistant's, up to end of turn
        for i, prompt in enumerate(args.prompt or ["Hello!"]):
            print(chat_reply(model, tok, [{"role": "user", "content": prompt}], args.max_new_tokens, args.temperature,
                             args.top_k, args.seed + i))
            print("---")
        return
    for text in complete(model, tok, args.prompt or ["The "], args.max_new_tokens, args.temperature, args.top_k,
                         args.seed):
        print(text)
        print("---")


def cmd_export(args) -> None:
    from raylm.config import S3Config

    try:
        if args.format == "hf":
            from raylm.export.hf import export_run
        else:
            from raylm.export.gguf import export_run_gguf as export_run
    except ImportError as e:
        raise ConfigError(f"--format {args.format} needs {e.name}: pip install -e '.[export]'") from None
    dtype = args.dtype or ("float32" if args.format == "hf" else "f32")
    out = export_run(args.run, args.out, S3Config(), checkpoint=args.checkpoint, dtype=dtype)
    print(json.dumps({"format": args.format, "out": out}, indent=1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raylm", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help, parent=sub, record=True):
        sp = parent.add_parser(name, help=help, description=help, epilog=EPILOG)
        sp.add_argument("--config", metavar="FILE.yaml", help="YAML config; overrides apply on top")
        if record:
            sp.add_argument("--from-record", metavar="RECORD.json",
                            help="rerun with the settings of an earlier run's record.json")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
        sp.set_defaults(func=func)
        return sp

    sp = add("quickstart", cmd_quickstart,
             "Train a tokenizer and a tiny model on a built-in offline corpus with 2 local Ray workers "
             "(a few minutes on a laptop CPU), print validation perplexity and samples, then fine-tune it "
             "(SFT) on a built-in synthetic instruction set and print one chat exchange.")
    sp.add_argument("--no-sft", action="store_true", help="stop after pre-training")

    sp = add("pretrain", cmd_pretrain,
             "Pre-train on Ray Train: corpus -> tokenizer -> packed blocks -> FSDP2 workers. Resumes "
             "automatically from the newest complete checkpoint of the same run name.")
    sp.add_argument("--data", help="corpus path/glob (local or s3://) or a prepared dataset directory")
    sp.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    sp.add_argument("--max-failures", type=int, default=0,
                    help="restart the worker group this many times after a worker dies")
    sp.add_argument("--no-samples", action="store_true", help="skip sampling after training")

    for stage, what in (("sft", "Supervised fine-tuning on chat records ({messages: [{role, content}, ...]} or "
                                "{prompt, completion}; jsonl or parquet, local or s3://): loss on assistant "
                                "turns only, conversations packed with document masking."),
                        ("dpo", "Direct preference optimisation on {prompt|messages, chosen, rejected} records, "
                                "against the starting model as the frozen reference (or its precomputed "
                                "log-probs: dpo.precompute_reference=true).")):
        sp = add(stage, cmd_posttrain, f"{what} Starts from --from RUN's weights (its tokenizer too) on the "
                                       f"same Ray Train FSDP2 loop as pretrain; the run is named RUN-{stage} "
                                       f"unless name= says otherwise.")
        sp.add_argument("--from", dest="from_run", required=True, metavar="RUN",
                        help="run directory or checkpoint (local or s3://) whose weights to start from")
        sp.add_argument("--data", help="records: a file, directory or glob (local or s3://)")
        sp.add_argument("--resume", action="store_true", help="require a checkpoint of this run to resume from")
        sp.add_argument("--max-failures", type=int, default=0,
                        help="restart the worker group this many times after a worker dies")
        sp.set_defaults(stage=stage)

    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="sub", required=True)
    sp = add("train", cmd_tokenizer_train, "Train a SentencePiece BPE tokenizer on a corpus sample.", tok)
    sp.add_argument("--data", help="corpus path/glob (default: the built-in corpus)")
    sp.add_argument("--out", required=True, help="output directory (local or s3://)")

    dat = sub.add_parser("data", help="data commands").add_subparsers(dest="sub", required=True)
    sp = add("prepare", cmd_data_prepare,
             "Read, clean, de-duplicate (exact and MinHash near-duplicates), redact PII, tokenize and "
             "pack a corpus into parquet shards, with a manifest (provenance per shard) and a data card.", dat)
    sp.add_argument("--data", help="corpus path/glob (local or s3://)")
    sp.add_argument("--out", required=True, help="output directory (local or s3://)")
    sp.add_argument("--tokenizer", help="tokenizer directory (default: tokenizer.path)")

    sp = sub.add_parser("export", help="Export a run (local or s3://) for other tools.",
                        description="Export a run's newest complete checkpoint (or --checkpoint). --format hf: a "
                                    "Hugging Face LlamaForCausalLM directory (config.json, model.safetensors sharded "
                                    "above 5 GB, generation_config.json, a tokenizer AutoTokenizer loads, the chat "
                                    "template). --format gguf: one llama.cpp file (llama architecture, SentencePiece "
                                    "vocabulary, chat template). The output appears only when complete.")
    sp.add_argument("run", help="run directory or checkpoint, local or s3://")
    sp.add_argument("--format", choices=["hf", "gguf"], default="hf",
                    help="hf: transformers, vLLM, lm-eval; gguf: llama.cpp")
    sp.add_argument("--out", required=True, help="output directory (hf) or file (gguf), local or s3://; must not exist")
    sp.add_argument("--checkpoint", help="a checkpoint name in the run (ckpt-00001000) instead of the newest")
    sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "f32", "f16", "q8_0"],
                    help="hf: float32 (default), bfloat16, float16; gguf: f32 (default), f16, q8_0")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("generate", help="Sample continuations from a checkpoint or run directory.",
                        description="Sample continuations from a checkpoint or run directory.")
    sp.add_argument("checkpoint", help="checkpoint directory, or a run directory (newest complete checkpoint)")
    sp.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    sp.add_argument("--max-new-tokens", type=int, default=100)
    sp.add_argument("--temperature", type=float, default=0.8)
    sp.add_argument("--top-k", type=int, default=50)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--chat", action="store_true",
                    help="treat each prompt as a user turn and print the assistant's reply (SFT/DPO models)")
    sp.set_defaults(func=cmd_generate)
    return p


def _root_cause(e: BaseException) -> BaseException:
    """Unwrap Ray's task/training wrappers down to the error a user can act on. Only Ray's:
    raylm's own errors are raised `from` the library error they explain (a StorageError from
    botocore's), and are the ones to show."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "worker_failures", None)
        if failures:
            e = next(iter(failures.values()))
            continue
        from_ray = type(e).__module__.split(".")[0] == "ray"
        inner = (getattr(e, "cause", None) or getattr(e, "controller_failure", None)
                 or (e.__cause__ if from_ray else None))
        if isinstance(inner, BaseException):
            e = inner
            continue
        break
    return e


USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, OSError, FloatingPointError, TimeoutError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may sit anywhere on the line (`pretrain --data x train.lr=1e-3 --resume`).
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("raylm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for errors a user can fix; a traceback for bugs
        cause = _root_cause(e)
        if isinstance(cause, USER_ERRORS):
            msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            print(f"raylm: error: {msg}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
