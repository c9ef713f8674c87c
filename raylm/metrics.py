"""Throughput arithmetic (FLOPs per token, MFU) and the run's metrics log.

FLOPs per trained token = 6 N + 12 L d T  (PaLM appendix B; Chinchilla's 6N plus attention):
  N  non-embedding parameters plus the LM head (the head is a real matmul per token; the
     input embedding is a lookup),
  L  layers, d  model width, T  sequence length: 2*L*T*d for the QK^T and AV matmuls
     forward, times 3 for forward + backward, times 2 FLOPs per multiply-add.
MFU = achieved FLOP/s / (devices * dense bf16 peak of one device).
The loss plot is drawn by raylm.eval.report (one plotting place for the run and `raylm report`).
"""

from __future__ import annotations

import errno
import os
import re
import time

from raylm import storage
from raylm.config import ModelConfig, S3Config
from raylm.errors import DataError
from raylm.eval.report import row_json
from raylm.model import count_params

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in FLOP/s, one
# GPU each (NVIDIA's headline figures are with 2:4 sparsity: twice these). `peak_flops`
# matches a key's words whole within torch.cuda.get_device_name() and takes the key of the
# most words: "NVIDIA L40" is an L40, not an L4; "NVIDIA H100 NVL" an H100 NVL, not an SXM
# H100; "NVIDIA GB200" a GB200, not a B200. raylm.plan looks its devices' peaks up here by key.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3"): 1,979 sparse
    ("H100 PCIe", 756e12),  # 1,513 sparse
    ("H100 NVL", 835e12),  # 94 GB PCIe card: 1,671 sparse
    ("H200", 989e12),  # SXM: 1,979 sparse
    ("H200 NVL", 835e12),  # 1,671 sparse
    ("GH200", 989e12),  # the Grace Hopper superchip's H100/H200: 1,979 sparse
    ("B200", 2250e12),  # HGX B200 (1,000 W): 4.5 PFLOPS sparse
    ("GB200", 2500e12),  # Grace Blackwell's GPU (1,200 W): NVL72's 360 PFLOPS sparse / 72
    ("A100", 312e12),  # SXM and PCIe alike
    ("A10", 125e12),  # 250 sparse
    ("A10G", 70e12),  # AWS's A10 variant (G5 instances)
    ("L4", 121e12),  # 242 sparse
    ("L40", 181e12),  # 181.05; 362.1 sparse
    ("L40S", 362e12),  # 362.05; 733 sparse
    ("RTX 4090", 165e12),  # fp32 accumulate
    ("A6000", 155e12),  # RTX A6000: 154.8; 309.7 sparse
]


def _words(name: str) -> tuple[str, ...]:
    return tuple(re.split(r"[\s_-]+", name.strip().upper())) if name.strip() else ()


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    n = count_params(cfg, non_embedding=True) + cfg.vocab_size * cfg.dim
    return 6 * n + 12 * cfg.n_layers * cfg.dim * seq_len


def peak_flops(device_name: str) -> float | None:
    """bf16 dense peak of one device, or None when unknown (CPUs: MFU is not reported).
    Words are compared whole (case, spaces, hyphens and underscores aside), and of the keys
    whose words all appear in a row in the name the longest wins (PEAK_BF16_FLOPS)."""
    words = _words(device_name)
    best, best_len = None, 0
    for key, value in PEAK_BF16_FLOPS:
        k = _words(key)
        if len(k) > best_len and any(words[i:i + len(k)] == k for i in range(len(words) - len(k) + 1)):
            best, best_len = value, len(k)
    return best


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, device_name: str, n_devices: int = 1) -> float | None:
    peak = peak_flops(device_name)
    if peak is None:
        return None
    return tokens_per_s * flops_per_token(cfg, seq_len) / (peak * n_devices)


class MetricsLog:
    """`metrics.jsonl` in the run directory. Local files are appended line by line (a whole
    rewrite at every row cost O(rows) bytes and an fsync per log step: 75 ms a row at 20,000
    rows, inside the training window); object storage has no append, so the file is rewritten
    whole at `flush` (checkpoint, end). `truncate` and `flush` rewrite it atomically. Lines are
    strict JSON (`raylm.eval.report.row_json`: a NaN loss is null, named under "non_finite")."""

    def __init__(self, run_dir: str, s3: S3Config | None = None):
        self.uri, self.s3, self.rows = storage.join(run_dir, "metrics.jsonl"), s3, []
        if storage.exists(self.uri, s3):  # a resumed run keeps its history
            self.rows = read_metrics(self.uri, s3)

    def log(self, row: dict) -> None:
        self.rows.append({"time": round(time.time(), 3), **row})
        if not storage.is_s3(self.uri):
            path = storage._local(self.uri)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:  # never through a link planted in its place (a run directory others can write to)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                self.flush()  # the run's own file, renamed over the link: the link's target is untouched
                return
            with os.fdopen(fd, "a", encoding="utf-8") as f:  # one write: a crash cuts the last line at most
                f.write(row_json(self.rows[-1]) + "\n")

    def truncate(self, step: int) -> None:
        """On resume from `step`, drop rows after it: the resumed run redoes those steps."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        self.flush()

    def flush(self) -> None:
        storage.write_text(self.uri, "".join(row_json(r) + "\n" for r in self.rows), self.s3)


def read_metrics(uri: str, s3: S3Config | None = None) -> list[dict]:
    """The rows of a metrics.jsonl, as `raylm report` reads them (`metrics_rows`): a last line
    cut short (a crash during its append) is left out, as the resume drops every row after
    its checkpoint; a damaged line before it, or a row without a whole-number step (as
    `raylm report` refuses it), is a one-line error naming the file and line, rather than
    history silently dropped or a bare JSONDecodeError or TypeError on the resuming worker."""
    from raylm.eval.report import check_step, metrics_rows

    shown = storage.redact_url(uri)
    try:
        text = storage.read_text(uri, s3)
    except UnicodeDecodeError as e:  # e.object: the file's bytes
        text = metrics_text(e.object, shown)
    return metrics_rows(text, shown, check_step)  # a null or text step: `truncate` compares them


def metrics_text(data: bytes, shown: str) -> str:
    """A metrics.jsonl's bytes as text (`shown`: its name in errors). raylm writes ASCII
    (`row_json`), so a byte that is not UTF-8 is damage: a one-line error naming the line,
    where a bare UnicodeDecodeError stopped the resuming worker and `raylm report`. In the
    last line, with no newline yet (cut by a crash), it is replaced: that line is left out."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        if b"\n" not in data[e.start:]:
            return data[:start].decode("utf-8") + data[start:].decode("utf-8", "replace")
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{shown} line {line}: not UTF-8 text "
                        f"(byte 0x{data[e.start]:02x} at column {e.start - start + 1})") from None


def plot_loss_curve(rows: list[dict], uri: str, s3: S3Config | None = None) -> None:
    """Training and validation loss against step, as a PNG. Drawn by `raylm.eval.report`,
    raylm's one plotting place, so the run's plot and `raylm report` agree."""
    from raylm.eval.report import plot_loss_curve as draw

    draw(rows, uri, s3)
