"""Run records: everything needed to rerun a stage with the same settings.

`<run_dir>/record.json` holds the resolved config, the raylm version and git commit, the
tokenizer hash, the data manifest's identity (sources with sizes and ETags), the seed, and
the hardware and library versions: the driver's, which wrote it, and the training workers'
(`hardware.training`), which rank 0 adds once the Train run has started. On a cluster they
differ: a CPU-only head node or a laptop drives runs trained on GPU nodes.
`raylm <stage> --from-record record.json` reruns it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import raylm
from raylm.errors import ConfigError
from raylm import storage
from raylm.config import Config, S3Config, _build, to_dict

RECORD = "record.json"


def git_commit() -> str:
    """The commit of the raylm checkout, with '-dirty' for local changes; '' outside git.
    raylm installed (not editable) inside another project's repository, say in its ignored
    .venv, is outside git too: that project's HEAD says nothing of raylm's code. So is a
    repository with no commit yet (`git rev-parse HEAD` prints 'HEAD' there)."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)

    try:
        # This very file tracked: the repository is raylm's own checkout.
        if git("ls-files", "--error-unmatch", "--", os.path.basename(__file__)).returncode != 0:
            return ""
        head = git("rev-parse", "--verify", "--quiet", "HEAD^{commit}")
        sha = head.stdout.strip()
        if head.returncode != 0 or not sha:
            return ""
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def hardware() -> dict:
    """This process's machine and libraries. gpu_count is the GPUs it sees: a Ray Train
    worker sees those it was given."""
    import torch

    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": gpu.name if gpu else None, "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else None}
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


def training_hardware(node_ids: list[str], device: str) -> dict:
    """What trains, as rank 0 of a Train run sees it: the world size, the number of distinct
    nodes its ranks run on (`node_ids`, one per rank), the device type, and rank 0's `hardware()`."""
    return {"world_size": len(node_ids), "nodes": len(set(node_ids)), "device": device, **hardware()}


def add_training_hardware(run_dir: str, training: dict, s3: S3Config | None = None) -> None:
    """Set the run record's hardware.training (`training_hardware`). Rank 0 calls it once
    the Train run has started, as it writes metrics.jsonl: the driver writes the record
    before it starts the run and not after, so nothing else writes it meanwhile, and the
    rewrite is atomic (storage.write_text). A run with no record (a direct caller of
    raylm.train_ray.run_ray_training) has none to add to."""
    uri = storage.join(run_dir, RECORD)
    if not storage.exists(uri, s3):
        return
    record = json.loads(storage.read_text(uri, s3))
    record["hardware"] = {**record.get("hardware", {}), "training": training}
    storage.write_text(uri, json.dumps(record, indent=1), s3)


def bad_records(manifest: dict) -> list[str] | None:
    """The bad records the run's data skipped (file, line, error; corpus order), as its manifest
    lists them: a prepared dataset's under "stats" (its data card's list too), a stream's at the
    top. A stream keeps no other copy: its log said them once, and the record is what stays.
    None where they were not listed: a stream without de-duplication (data.dedup=none) has no
    first pass to list them, and its training workers skip them uncounted here."""
    if manifest.get("mode") == "stream":
        return None if manifest.get("dedup") == "none" else list(manifest.get("bad_records", []))
    listed = (manifest.get("stats") or {}).get("bad_records")
    return list(listed) if listed is not None else None


def write_record(cfg: Config, stage: str, tokenizer=None, manifest: dict | None = None,
                 extra: dict | None = None) -> str:
    record = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "raylm_version": raylm.__version__,
        "git_commit": git_commit(),
        "seed": cfg.seed,
        "config": to_dict(cfg, redact=True),  # records are shared: no credentials in URLs
        "tokenizer": {"path": tokenizer.path, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size}
        if tokenizer is not None else None,
        "data": {"mode": manifest.get("mode", "prepare"), "key": manifest["key"], "sources": manifest["sources"],
                 "val_sources": manifest["val_sources"],
                 # A stream's block counts are known only once it has been read through.
                 "train_blocks": manifest.get("train", {}).get("blocks"),
                 "val_blocks": manifest.get("val", {}).get("blocks"),
                 "bad_records": bad_records(manifest)}
        if manifest else None,
        # "training" stays null until the training workers have started (`add_training_hardware`).
        "hardware": {"driver": hardware(), "training": None},
        **(extra or {}),
    }
    uri = storage.join(cfg.run_dir, RECORD)
    storage.write_text(uri, json.dumps(record, indent=1), cfg.s3)
    return uri


def write_stage_record(uri: str, stage: str, key: str, cfg: Config, options: dict, inputs: dict, outputs: dict,
                       seconds: float) -> dict:
    """A recipe stage's record (raylm.recipe): its key, its config (credentials redacted), and
    the key, path and content hash of each input, so records chain from a served model back to
    the corpus. Written after the outputs are committed: its presence means the stage is done."""
    from raylm.storage import redact_url

    record = {"stage": stage, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "raylm_version": raylm.__version__, "git_commit": git_commit(), "seconds": seconds,
              "config": to_dict(cfg, redact=True),
              "options": {k: redact_url(v) if isinstance(v, str) else v for k, v in options.items()},
              "inputs": inputs, "outputs": {k: redact_url(v) if isinstance(v, str) else v for k, v in outputs.items()}}
    storage.write_text(uri, json.dumps(record, indent=1), cfg.s3)
    return record


def load_record(uri: str) -> tuple[str, Config]:
    """(stage, config) from a record file. The config's keys and types are checked here (an
    error names the record); its settings as a whole are validated as any config's once the
    command's own settings and overrides are laid over it (raylm.cli), so that an override can
    mend a record whose settings a later raylm refuses (train.warmup_steps past max_steps)."""
    try:
        record = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{uri}: not a JSON run record ({e.msg})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{uri}: not a JSON run record (not UTF-8 text)") from None
    except RecursionError:
        raise ConfigError(f"{uri}: not a JSON run record (nested too deeply to read)") from None
    if not isinstance(record, dict) or "config" not in record or "stage" not in record:
        raise ConfigError(f"{uri}: not a raylm run record (no 'config' or 'stage')")
    try:
        return record["stage"], _build(Config, record["config"], "")
    except ConfigError as e:
        raise ConfigError(f"{uri}: {e}") from None
