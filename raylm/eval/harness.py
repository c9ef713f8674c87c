"""raylm as an lm-evaluation-harness model (`--model raylm`).

The harness owns prompts, few-shot examples, filters and metrics; this class only answers
its three kinds of request with raylm's scoring (raylm.eval.loglik), in this process or on a
pool of Ray actors, started here, while lm-eval builds its requests (raylm.eval.pool):

    python -m raylm.eval.harness_cli run --model raylm --model_args path=runs/x,workers=2 --tasks hellaswag
    raylm eval --tasks hellaswag,arc_easy runs/x

model_args: path (run or checkpoint, local or s3://), workers (0: score in this process;
N: a pool of N Ray actors, each loading the model once), cpus_per_worker, gpus_per_worker,
batch_tokens (tokens per work unit), device (in-process: cpu or cuda), endpoint_url (S3).
lm-eval's --apply_chat_template (and --fewshot_as_multiturn) render prompts with raylm's chat
template, the one SFT trains on (`apply_chat_template`).

Discovery: lm-eval 0.4.13 (the newest release) resolves `--model NAME` only in its own
registry (lm_eval/api/registry.py get_model, filled from the fixed MODEL_MAPPING of
lm_eval/models/__init__.py); it reads no entry points and its command line has no option that
imports user code (--include_path loads task YAMLs only). So `lm_eval --model raylm` cannot
work from an installed raylm; importing this module registers the model (`register_model`),
and `python -m raylm.eval.harness_cli` is lm-eval's own command line with it registered. The
`lm_eval.models` entry point in raylm's pyproject is for lm-eval versions that load model
plugins from entry points (upstream pull request #4013, not in 0.4.13; its group name is not
confirmed against a release).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval's own models first: get_model fills an empty registry only)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from raylm.eval.loglik import encode_pair
from raylm.eval.pool import make_runner
from raylm.errors import ConfigError


def _arg(key: str, value, kind: type, low: float, strict: bool = False):
    """model_args `key` as `kind`, at least `low` (above it when `strict`), or a one-line error
    naming it: lm-eval passes model_args as the strings typed."""
    try:
        number = None if isinstance(value, bool) else kind(value)
    except (TypeError, ValueError):
        number = None
    if kind is int and number is not None and number != float(value):  # 1.5 is no count of workers
        number = None
    if number is None or not (number > low if strict else number >= low):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"--model_args {key}={value}: expected {what} {'>' if strict else '>='} {low:g}")
    return number


@register_model("raylm")
class RayLM(LM):
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        # lm-eval's command line adds its own device (and batch sizes) to every model's
        # model_args; its constructor call then failed on `model_args device=...` (a keyword
        # given twice). model_args, the user's own, win.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def __init__(self, path: str = "", workers: int = 0, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 batch_tokens: int = 4096, device: str | None = None, endpoint_url: str = "", runner=None,
                 batch_size=None, max_batch_size=None, **unused):
        super().__init__()
        # batch_size/max_batch_size: the harness passes them to every model; raylm batches by
        # tokens (batch_tokens), as requests of one task vary widely in length.
        # A model_args key raylm does not know (a misspelt `worker=4`, or `dtype=` of lm-eval's
        # hf model) was dropped without a word: the evaluation then ran, and was recorded, with
        # a setting other than the one typed. lm-eval's --trust_remote_code adds its key to
        # every model's model_args; raylm runs no remote code, so that one means nothing here.
        unknown = sorted(k for k in unused if k != "trust_remote_code")
        if unknown:
            raise ConfigError(f"--model_args {', '.join(unknown)}: not an argument of --model raylm (it takes path, "
                              f"workers, cpus_per_worker, gpus_per_worker, batch_tokens, device, endpoint_url)")
        if runner is None:
            if not path:
                raise ConfigError("--model raylm needs model_args path=<run or checkpoint directory>")
            from raylm.config import S3Config

            import torch

            # lm-eval's command line passes its own default device ("cuda") to every model.
            if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
                device = "cuda" if torch.cuda.is_available() else "cpu"
            runner = make_runner(str(path), _arg("workers", workers, int, 0),
                                 _arg("cpus_per_worker", cpus_per_worker, float, 0, strict=True),
                                 _arg("gpus_per_worker", gpus_per_worker, float, 0),
                                 _arg("batch_tokens", batch_tokens, int, 1), device,
                                 S3Config(endpoint_url=endpoint_url))
        self.runner = runner
        self.path = str(path)

    @property
    def tokenizer_name(self) -> str:
        return f"raylm-{self.runner.tok.sha256[:12]}"

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """`--apply_chat_template`: the chat rendered with raylm's template, the one SFT trained on,
        `encode_chat` encodes and the HF export saves (`<|role|>\\n{content}<|end|>\\n` a message);
        the harness encodes this text as markup, so its ids are `encode_chat`'s (for content without a
        chat marker string, which markup reads as the marker). With the assistant's
        turn opened (`add_generation_prompt`), else continuing the last message (a task's
        gen_prefix), as lm-eval's hf model asks transformers to (`continue_final_message`)."""
        tok = self.runner.tok
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in chat_history]
        text = tok.apply_chat_template(messages, add_generation_prompt=bool(add_generation_prompt))
        if not add_generation_prompt and messages:
            from raylm.tokenizer import END

            text = text.removesuffix(END + "\n")  # the last message stays open
        return text

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm-eval records with the results of `--apply_chat_template` (the base
        class recorded an empty one): the Jinja form of raylm's, as the HF export writes it."""
        from raylm.export.hf import CHAT_TEMPLATE

        return CHAT_TEMPLATE

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.runner.tok, *req.args) for req in requests]
        # An empty continuation (nothing after the context, no trailing whitespace moved to it)
        # has probability 1: log-likelihood 0, and greedy decoding produces it, as lm-eval's onnx
        # model answers (0.4.13's hf model stops on an assertion). It raised a bare ValueError from
        # scoring, which ended the whole evaluation. The others are scored as they would be without it.
        scored = [i for i, (_, cont) in enumerate(pairs) if cont]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for i, result in zip(scored, self.runner.loglikelihood([pairs[i] for i in scored]) if scored else []):
            out[i] = result
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in windows of the model's length (the harness's own
        window functions), each window scored after EOS or the preceding tokens."""
        tok = self.runner.tok
        pairs, owner = [], []
        for i, req in enumerate(requests):
            windows = get_rolling_token_windows(token_list=tok.encode(req.args[0]), prefix_token=tok.eos_id,
                                                max_seq_len=self.runner.max_seq_len, context_len=1)
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self.runner.loglikelihood(pairs)):
            totals[i] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tok = self.runner.tok
        batch = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            # A sampling task's nucleus (humaneval_64: temperature 0.2, top_p 0.95) was dropped, so
            # it sampled from the whole distribution; greedy decoding reads no top_p, as in lm-eval's hf model.
            top_p = float(kwargs.get("top_p", 1.0) or 1.0) if sample else 1.0
            batch.append(([tok.eos_id] + tok.encode(context), until, int(kwargs.get("max_gen_toks", 256)),
                          temperature, int(kwargs.get("top_k", 0) or 0), int(kwargs.get("seed", 0) or 0) + i, top_p))
        return self.runner.complete(batch)
