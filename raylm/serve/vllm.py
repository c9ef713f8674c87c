"""`raylm serve --engine vllm`: an HF export (`raylm export --format hf`) served by vLLM
through `ray.serve.llm` (`LLMConfig`, `build_openai_app`).

This path stays thin on purpose: vLLM is an optional extra (`pip install 'ray[llm]' vllm`,
GPU clusters), and without it `ray.serve.llm` cannot even be imported. `vllm_serving_args`
builds the plain arguments, which the tests check without importing either; only
`build_vllm_app` imports `ray.serve.llm`.

Differences from the raylm engine: vLLM's OpenAI ingress does not check raylm's API key (put
it behind a gateway that does, or keep it on loopback), and the request limits are vLLM's.
"""

from __future__ import annotations

import os

from raylm import storage
from raylm.config import ConfigError, ServeConfig
from raylm.errors import PathNotFoundError


def check_export(uri: str) -> None:
    """`uri` must be an HF export (config.json beside the weights), not a raylm run."""
    if storage.is_s3(uri):
        if not storage.exists(storage.join(uri, "config.json")):
            raise PathNotFoundError(f"{uri}: no config.json; --engine vllm serves an HF export "
                                    f"(raylm export RUN --format hf --out {uri})")
        return
    if not os.path.isfile(os.path.join(uri, "config.json")):
        raise PathNotFoundError(f"{uri}: no config.json; --engine vllm serves an HF export "
                                f"(raylm export RUN --format hf --out EXPORT_DIR)")


def check_access(cfg: ServeConfig) -> None:
    """The vLLM app takes no API key and so serves on loopback only: ConfigError otherwise,
    before anything starts (`raylm serve` checks it before Ray does)."""
    from raylm.serve.app import API_KEY_ENV, LOOPBACK

    if cfg.api_key or os.environ.get(API_KEY_ENV):
        what = "serve.api_key" if cfg.api_key else f"${API_KEY_ENV}"
        raise ConfigError(f"{what}: the vLLM app's ingress cannot check raylm's API key (it would be ignored); "
                          "serve it on loopback behind a gateway that authenticates, or use --engine raylm")
    if cfg.host not in LOOPBACK:
        raise ConfigError(f"serve.host={cfg.host}: the vLLM app has no API key, so it serves on loopback only; "
                          "put a gateway that authenticates in front, or use --engine raylm with an API key")


def vllm_serving_args(export: str, cfg: ServeConfig, model_name: str) -> dict:
    """The `LLMServingArgs` for `build_openai_app`, as plain data: one `LLMConfig` for the
    export (local path, or s3:// as a cloud mirror vLLM's replicas download), with raylm's
    batch, limits, backpressure and autoscaling settings mapped to Serve's and vLLM's names."""
    check_access(cfg)
    source: str | dict = {"bucket_uri": export} if storage.is_s3(export) else os.path.abspath(export)
    deployment = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "autoscaling_config": cfg.autoscaling_config or {"min_replicas": cfg.num_replicas,
                                                         "max_replicas": cfg.num_replicas},
    }
    llm_config = {
        "model_loading_config": {"model_id": model_name, "model_source": source},
        "engine_kwargs": {
            "max_num_seqs": cfg.max_batch_size,  # vLLM's name for the decode batch
            "dtype": "auto",  # the export's own (raylm exports float32 by default; bf16 with --dtype)
        },
        "deployment_config": deployment,
    }
    return {"llm_configs": [llm_config]}


def build_vllm_app(export: str, cfg: ServeConfig, model_name: str):
    """The Serve application (imports ray.serve.llm, so vLLM must be installed)."""
    check_export(export)
    args = vllm_serving_args(export, cfg, model_name)
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as e:
        raise ConfigError(f"--engine vllm needs vLLM, which ray.serve.llm imports ({e}); "
                          f"pip install 'ray[llm]' vllm on a GPU node, or use --engine raylm") from None
    return build_openai_app(args)
