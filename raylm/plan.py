"""`raylm plan`: target size, hardware and data in; a ready config and the reasoning out.

Every figure comes from a stated rule, so the table can be checked by hand:

token budget   Chinchilla's compute-optimal ~20 tokens per parameter (Hoffmann et al. 2022).
               With less data than that, the data is repeated up to 4 epochs, which Muennighoff
               et al. 2023 ("Scaling Data-Constrained Language Models") found about as good as
               fresh tokens; more data than that trains on a share of it (epochs < 1).
batch, LR      GPT-3's table (Brown et al. 2020, table 2.1): 0.5M tokens a step below 1B
               parameters, 1M to 5B, 2M to 20B, 4M above; the learning rate interpolated
               log-log between its sizes, plus raylm's own CPU sweep for the tiny model (3e-3).
               The batch is capped so a run takes at least MIN_STEPS optimizer steps (or
               one sequence a device a step, when the budget is smaller than that). Whole
               micro-batches make it, within a third of its target unless the cap or one
               sequence a device forces more (`_fit`); a note says when it is 10% off.
warmup         GPT-3's 375M tokens, at least 1% of the steps and 30 steps, at most 10%.
memory         per device, under raylm's FSDP2 sharding over S devices (see `memory_per_device`):
               all of them, or under HSDP (train.replicate_degree=R) the devices / R of one replica;
               train.float8 alike (`memory_for_config` says why).
time           6N + 12LdT FLOPs per token (raylm.metrics.flops_per_token) over devices x peak x
               MFU; with activation checkpointing and the default MFU, plus one more forward
               of the blocks but their last matmul (`recompute_factor`, x 1.20-1.26), which a
               run's logged MFU (--mfu) already includes.
data workers   tokens/s training consumes over the measured tokenize rate of raylm's data
               pipeline per CPU (README, `benchmarks/tokenize_throughput.py`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import yaml

from raylm import storage
from raylm.config import MODEL_PRESETS, Config, ConfigError, ModelConfig, load_config
from raylm.metrics import PEAK_BF16_FLOPS, flops_per_token
from raylm.model import count_params

GiB = 1024**3

# Size names people say, to raylm's presets.
SIZES = {"tiny": "tiny", "124m": "gpt2-124m", "125m": "gpt2-124m", "gpt2-124m": "gpt2-124m",
         "350m": "350m", "1b": "1b", "3b": "3b", "7b": "7b"}

# Devices by name, matched whole (case, spaces, hyphens and underscores aside: "a100 40gb" is
# "A100-40GB", "H100" is never "GH200"): memory in MiB, the total nvidia-smi reports for the
# device (torch.cuda.mem_get_info's total, with ECC on where the device ships with it), not
# the datasheet's decimal "GB": an "80GB" H100 has 81,559 MiB, 79.6 GiB. And the key of the
# bf16 peak in raylm.metrics.PEAK_BF16_FLOPS, so MFU means the same in plans and in runs.
# Each total is nvidia-smi's as printed in public logs and issue reports: H200 SXM 141GB,
# GH200 480GB (its 96 GB HBM3 GPU; the 144 GB HBM3e GH200 has more), H100 80GB HBM3 and H100
# PCIe alike, B200, A100-SXM4-80GB and -40GB, L40S, A10G, L4, GeForce RTX 4090, RTX A6000
# (ECC off, as it ships; 46,068 MiB with ECC on: pass --memory-gb 44.9).
DEVICES: dict[str, tuple[int, str]] = {
    "H200": (143771, "H200"), "GH200": (97871, "GH200"), "H100": (81559, "H100"),
    "H100 SXM": (81559, "H100"), "H100 PCIe": (81559, "H100 PCIe"), "B200": (183359, "B200"),
    "A100-80GB": (81920, "A100"), "A100-40GB": (40960, "A100"),
    "L40S": (46068, "L40S"), "A10G": (23028, "A10G"), "L4": (23034, "L4"),
    "RTX 4090": (24564, "RTX 4090"), "A6000": (49140, "A6000"),
}
# Names of a device sold with more than one memory size, planned as the smallest: what fits
# it fits the others, and the plan's note names the larger one to ask for instead.
DEVICE_ALIASES = {"A100": ("A100-40GB", "A100-80GB")}
MiB = 1024**2
# A CPU worker: one core's AVX2 fp32 peak (2 FMA units x 8 lanes x 2 FLOPs x 3 GHz) and a
# laptop-sized share of host memory (--memory-gb changes it).
CPU_PEAK_FLOPS = 96e9
CPU_MEMORY_GIB = 4.0
# Default MFU, of a step without activation checkpointing (the plan adds the recompute).
# GPUs: a typical bf16 FSDP2 figure for Llama shapes; runs log their own `mfu` in
# metrics.jsonl, to pass back with --mfu. CPUs: the tiny model's measured step (4,096 tokens
# in 0.31-0.39 s on 2 workers, README) is 0.41-0.51 of the peak above, at
# raylm.metrics.flops_per_token's 7.48 MFLOP a token (sequence 128).
DEFAULT_MFU = {"gpu": 0.40, "cpu": 0.45}
# Memory the estimate leaves alone on each device: 10% for the caching allocator's
# fragmentation, plus (GPUs) 1.5 GiB for the CUDA context and NCCL buffers.
HEADROOM_FRACTION = 0.10
GPU_RESERVED_BYTES = 1.5 * GiB

TOKENS_PER_PARAM = 20
MAX_EPOCHS = 4
MIN_STEPS = 2000
# How far the sequences a device takes a step may round from the target: a third, the most
# that rounding to the nearest multiple of a micro-batch no larger than the target can be off
# (1.5 micro-batches: 1 or 2). Plans off by more than BATCH_NOTE_FRACTION say so in a note.
BATCH_TOLERANCE = 1 / 3
BATCH_NOTE_FRACTION = 0.10
WARMUP_TOKENS = 375e6
# GPT-3 table 2.1 (parameters, peak LR), and raylm's CPU sweep on `tiny` (README).
LR_TABLE = [(1.1e6, 3e-3), (125e6, 6e-4), (350e6, 3e-4), (760e6, 2.5e-4), (1.3e9, 2e-4),
            (2.7e9, 1.6e-4), (6.7e9, 1.2e-4), (13e9, 1e-4), (175e9, 0.6e-4)]
# Tokenize rate of raylm's whole data pipeline (read, clean, PII, tokenize, pack, write) per
# CPU: 7.4 MB/s on 2 cores, the low end of the final 50 MB runs in the README; at 2.70 bytes
# per token with the 2k vocabulary it was measured with (200 MB -> 74.3M tokens).
TOKENIZE_BYTES_PER_S_PER_CPU = 3.7e6
MEASURED_BYTES_PER_TOKEN = (2048, 2.70)
# Bytes per token of a 32k BPE on English prose and web text, a common rule of thumb (~4
# characters a token); code and other languages pack fewer bytes into a token.
BYTES_PER_TOKEN_32K = 4.0
DOMAIN_FACTOR = {"web": 1.0, "books": 1.0, "wiki": 1.0, "code": 0.75, "math": 0.85, "chat": 1.0}
OTHER_LANGUAGE_FACTOR = 0.75
# --language values taken as English, compared case-insensitively (a tag such as en-US too):
# "EN" or "English" once got the other-language factor without a word.
ENGLISH_NAMES = ("en", "eng", "english")


@dataclass(frozen=True)
class Hardware:
    name: str  # "H100", "CPU"
    per_node: int
    nodes: int
    memory: float  # bytes per device
    peak: float  # FLOP/s per device
    kind: str  # "gpu" or "cpu"
    note: str = ""  # what the plan assumed of the name given (DEVICE_ALIASES)

    @property
    def devices(self) -> int:
        return self.per_node * self.nodes

    @property
    def sharded(self) -> bool:
        """Whether raylm's workers shard the model here (raylm.parallel.sharding_pays): always
        on GPUs (bf16) and over two workers or more; one fp32 CPU worker trains it plain."""
        return self.kind == "gpu" or self.devices > 1

    def shard(self, replicate_degree: int = 1) -> int:
        """Devices each parameter is sharded over: all of them, or one HSDP replica's share."""
        return self.devices // replicate_degree

    @property
    def usable(self) -> float:
        """Bytes the estimate may fill on one device."""
        reserved = GPU_RESERVED_BYTES if self.kind == "gpu" else 0.0
        return self.memory * (1 - HEADROOM_FRACTION) - reserved

    def __str__(self) -> str:
        nodes = f"{self.nodes} nodes x {self.per_node}" if self.nodes > 1 else "1 node"
        return f"{self.devices} x {self.name} ({nodes}), {self.memory / GiB:.1f} GiB each"


@dataclass(frozen=True)
class Memory:
    """Bytes per device at the peak of a training step (the start of backward)."""

    params: float  # sharded fp32 master weights + the gathered (unsharded) copies FSDP holds
    grads: float  # sharded fp32 + the root's and a block's unsharded (compute dtype) + all in fp32 under accumulation
    optimizer: float  # AdamW's two fp32 moments, sharded
    activations: float  # one micro-batch's saved tensors, logits and loss included
    reference: float = 0.0  # DPO's frozen reference model: fp32 shards (+ gathered copies in its forward)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.reference


def parse_count(text: str, what: str = "--tokens") -> int:
    """'50B' -> 50_000_000_000; K, M, B (or G), T suffixes; plain numbers too."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", str(text), re.I)
    if not m:
        raise ConfigError(f"{what}={text!r}: expected a count such as 50B, 300M or 2e9")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    value = float(m.group(1)) * scale
    if not math.isfinite(value):  # 1e400: float's infinity, which no int holds
        raise ConfigError(f"{what}={text!r}: too large; expected a count such as 50B, 300M or 2e9")
    value = int(value)
    if value < 1:
        raise ConfigError(f"{what}={text!r}: must be at least 1")
    return value


def parse_hardware(gpus: str, nodes: int = 1, memory_gb: float | None = None) -> Hardware:
    """'8xH100' (8 per node), 'H200' (1), '2xCPU' (2 CPU workers)."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*[x×*]\s*)?(.+?)\s*", gpus)
    if not m:
        raise ConfigError(f"--gpus={gpus!r}: expected COUNTxNAME such as 8xH100")
    per_node, name = int(m.group(1) or 1), m.group(2)
    if re.fullmatch(r"\d+\s*[x×*]?", name):  # "0", "8", "8x": a count, no device
        raise ConfigError(f"--gpus={gpus!r}: no device named; expected COUNTxNAME such as 8xH100 or 2xCPU")
    if per_node < 1 or nodes < 1:
        raise ConfigError(f"--gpus={gpus!r} --nodes={nodes}: need at least one device and one node")
    if memory_gb is not None and not 0 < memory_gb < math.inf:  # None (not given): DEVICES' total
        raise ConfigError(f"--memory-gb={memory_gb:g}: expected a positive number of GiB")
    if name.upper() == "CPU":
        memory = (memory_gb or CPU_MEMORY_GIB) * GiB
        return Hardware("CPU", per_node, nodes, memory, CPU_PEAK_FLOPS, "cpu")
    key = _device_key(name)
    note = ""
    alias = next((a for a in DEVICE_ALIASES if _device_key(a) == key), None)
    if alias is not None:
        smallest, larger = DEVICE_ALIASES[alias]
        key = _device_key(smallest)
        if not memory_gb:
            note = (f"{alias} taken as the {smallest}, the smaller of the two, as what fits it fits the "
                    f"other; --gpus {per_node}x{larger} plans for the {larger}")
    device = next((d for d in DEVICES if _device_key(d) == key), None)
    if device is None:
        raise ConfigError(f"--gpus={gpus!r}: unknown device {name!r}; known: "
                          f"{', '.join([*DEVICES, *DEVICE_ALIASES, 'CPU'])} "
                          f"(or pass --memory-gb and a known device of the same class)")
    mib, peak_key = DEVICES[device]
    memory = memory_gb * GiB if memory_gb else mib * MiB
    return Hardware(device, per_node, nodes, memory, dict(PEAK_BF16_FLOPS)[peak_key], "gpu", note)


def _device_key(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name).strip().upper()


def resolve_size(size: str) -> tuple[str, ModelConfig]:
    preset = SIZES.get(size.lower())
    if preset is None:
        raise ConfigError(f"--size={size!r}: unknown; choose from {', '.join(SIZES)}")
    cfg = MODEL_PRESETS[preset]
    return preset, cfg if cfg.vocab_size else cfg.with_vocab(tokenizer_vocab(preset))


def tokenizer_vocab(preset: str) -> int:
    """The tokenizer size a preset was designed for (its embedding follows the tokenizer)."""
    from raylm import config
    from raylm.config import TokenizerConfig

    designed = getattr(config, "PRESET_TOKENIZER_VOCAB", {})
    return MODEL_PRESETS[preset].vocab_size or designed.get(preset) or TokenizerConfig().vocab_size


# --------------------------------------------------------------------------- memory


def _block_params(cfg: ModelConfig) -> int:
    return (count_params(cfg, non_embedding=True) - cfg.dim) // cfg.n_layers


def block_bytes_per_token(cfg: ModelConfig, compute_bytes: int) -> float:
    """What one of raylm's blocks (raylm/model.py) saves for backward, per token.

    In the compute dtype (`compute_bytes`): the two RMSNorm outputs (2d), rotated q and k and
    v kept by SDPA (d + 2 kv), its output and the reshaped copy wo reads (2d), and SwiGLU's
    w1, silu, w3 and product (4 hidden); in fp32, the two norms' inputs (2d x 4 bytes,
    RMSNorm normalises in fp32) and SDPA's log-sum-exp (4 bytes a head). With model.qk_norm
    the q and k norms' fp32 inputs and their per-head 1/rms as well (4 (q + kv) bytes and 4
    a query and a kv head), which every layer saves beside the rotated q and k."""
    d, kv, hid = cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    q = cfg.n_heads * cfg.head_dim
    qk_norm = 4 * (q + kv) + 4 * (cfg.n_heads + cfg.kv_heads) if cfg.qk_norm else 0
    return compute_bytes * (2 * d + q + 2 * kv + 2 * q + 4 * hid) + 4 * 2 * d + 4 * cfg.n_heads + qk_norm


def doc_mask_bytes(cfg: ModelConfig, tokens: int, seq_len: int, compute_bytes: int,
                   checkpointing: bool) -> tuple[float, float]:
    """What document masking adds, as (bytes each layer saves, bytes shared by all layers).

    raylm's attention with a document mask is SDPA with the boolean block-causal mask
    (raylm.model.document_mask; `Transformer.doc_mask_kernel` is "sdpa" on every device:
    FlexAttention's BlockMask, which would allocate none of this, is only what a benchmark
    compares against). SDPA turns the boolean mask into an additive bias in the compute dtype
    and saves it for backward, in every layer, eager or compiled. Under GQA `raylm.model.attend`
    folds the G = n_heads / kv_heads query heads sharing a kv head into the query length, so the
    bias is (B, 1, G T, T): G T compute-dtype elements a token, each layer. Shared: the RoPE
    tables gathered at each token's document position, cos and sin (B, T, head_dim / 2) in
    fp32, saved by every layer's rotation; under activation checkpointing also the boolean
    (B, 1, T, T) mask, an input every checkpointed block keeps for its recompute."""
    groups = cfg.n_heads // cfg.kv_heads
    bias = tokens * groups * seq_len * compute_bytes
    shared = tokens * 4 * cfg.head_dim + (tokens * seq_len if checkpointing else 0)
    return bias, shared


def activation_bytes(cfg: ModelConfig, tokens: int, compute_bytes: int, checkpointing: bool, loss_chunk: int,
                     seq_len: int = 0, doc_mask: bool = False, dpo: bool = False) -> float:
    """Peak activation memory of one micro-batch of `tokens` tokens in rows of `seq_len`.
    Without checkpointing it comes at the start of backward: every block's saved tensors
    (with `doc_mask`, each layer's attention bias too: `doc_mask_bytes`), the final norm's,
    the int64 inputs and targets, and the loss's peak (`loss_bytes`, or with `dpo` DPO's
    log-probabilities: `dpo_logprob_bytes`). With checkpointing the blocks keep only their
    inputs, and backward recomputes one block at a time (its attention bias included), after
    the loss's tensors are gone: the peak is the larger of the two."""
    loss = dpo_logprob_bytes(cfg, tokens) if dpo else loss_bytes(cfg, tokens, compute_bytes, loss_chunk)
    saved, recompute = _forward_saved(cfg, tokens, compute_bytes, checkpointing, seq_len, doc_mask)
    return saved + max(loss, recompute)


def _forward_saved(cfg: ModelConfig, tokens: int, compute_bytes: int, checkpointing: bool, seq_len: int,
                   doc_mask: bool) -> tuple[float, float]:
    """(what the forward leaves saved for backward, loss aside; what backward's recompute of
    one checkpointed block adds, 0 without checkpointing)."""
    block = block_bytes_per_token(cfg, compute_bytes)
    final = (4 + compute_bytes) * cfg.dim + 16
    bias, shared = 0.0, 0.0
    if doc_mask:
        if seq_len < 1:
            raise ValueError("doc_mask needs the rows' seq_len: the attention bias grows with its square")
        bias, shared = doc_mask_bytes(cfg, tokens, seq_len, compute_bytes, checkpointing)
    if not checkpointing:
        return tokens * (cfg.n_layers * block + final) + cfg.n_layers * bias + shared, 0.0
    return tokens * (cfg.n_layers * cfg.dim * compute_bytes + final) + shared, tokens * block + bias


def loss_bytes(cfg: ModelConfig, tokens: int, compute_bytes: int, chunk: int) -> float:
    """The loss's peak. Plain (chunk 0): at the start of backward the fp32 log-softmax
    output, its gradient and the logits' gradient are alive, 12 V bytes a token. Chunked
    (raylm.losses): the saved hidden-state gradient, the head's gradient in fp32 and in the
    compute dtype, and one chunk's fp32 logits and their compute-dtype gradient."""
    if chunk <= 0:
        return 12 * cfg.vocab_size * tokens
    return (tokens * cfg.dim * compute_bytes + cfg.vocab_size * cfg.dim * (4 + compute_bytes)
            + min(chunk, tokens) * cfg.vocab_size * (4 + compute_bytes))


# DPO's log-probabilities (raylm.objectives.sequence_logprobs) with the full logits
# (train.loss_chunk_size=0, the CPU default; "auto" chunks them on CUDA, to chunk x V logits
# at a time, which these figures do not count: for such runs they are an upper bound). The policy's forward saves their fp32 copy for logsumexp (4 V bytes a token), and
# at the start of backward logsumexp's and gather's gradient temporaries join it: 16 V bytes
# a token at the peak. The frozen reference's forward, under no_grad, peaks at 8 V (its
# compute-dtype logits, their fp32 copy and logsumexp's temporary) beside the policy's saved
# 4 V. Both measured by replaying the CPU allocator's events of these steps.
DPO_LOGPROB_BYTES = 16
REFERENCE_LOGPROB_BYTES = 8
POLICY_SAVED_LOGPROB_BYTES = 4


def dpo_logprob_bytes(cfg: ModelConfig, tokens: int) -> float:
    return DPO_LOGPROB_BYTES * cfg.vocab_size * tokens


def memory_per_device(cfg: ModelConfig, seq_len: int, micro_batch: int, shard: int, precision: str,
                      checkpointing: bool = False, accumulation: int = 1, sharded: bool = True,
                      loss_chunk: int = 0, doc_mask: bool = False, dpo: bool = False,
                      reference: bool = True, reshard_after_forward: bool = True) -> Memory:
    """Peak bytes on one device of a raylm training step (raylm.train.train_step under
    raylm.parallel.shard_model), over `shard` devices.

    `sharded=False` is the plain single-process model (no FSDP, fp32), as tests and
    benchmarks run it. Under FSDP2: fp32 master weights, gradients (reduce dtype fp32) and
    AdamW's two moments are sharded (16 N / S bytes). FSDP also holds gathered copies in the
    compute dtype: the root unit (embeddings, head, final norm), which raylm never reshards,
    and three blocks (the one computing, the one prefetched, and the last block, kept for
    backward; every block with `reshard_after_forward=False`, train.reshard_after_forward,
    which keeps each from its forward to its backward); plus the unsharded compute-dtype
    gradients of the root (alive from the head's backward to the embedding's, where the root
    unit reduces) and of the block in backward.
    With gradient accumulation raylm syncs gradients only on the last micro-batch, and FSDP2
    keeps them unsharded in fp32 between micro-batches: 4 N bytes on every device, whatever S,
    beside the current micro-batch's compute-dtype ones.

    `doc_mask`: document masking (pre-training with data.document_mask, SFT always), whose
    attention bias every layer saves (`doc_mask_bytes`). `dpo`: a DPO step, where
    `micro_batch` counts pairs: one forward over the 2 x micro_batch chosen and rejected
    sequences, its log-probabilities from the full logits (`loss_chunk` does not apply), and
    with `reference` (unless dpo.precompute_reference) the frozen reference model, sharded
    like the policy (`Memory.reference`). The reference runs its forward after the policy's,
    gathering its root and up to two blocks while the policy holds its saved activations; that
    moment is counted too, and the larger of it and the start of backward is the peak."""
    if dpo and doc_mask:
        raise ValueError("DPO batches are not document-masked (raylm.objectives.pair_logprobs)")
    n = count_params(cfg)
    p = 2 if precision == "bf16" else 4
    rows = 2 * micro_batch if dpo else micro_batch
    tokens = rows * seq_len
    acts = activation_bytes(cfg, tokens, p, checkpointing, loss_chunk, seq_len, doc_mask, dpo)
    ref_shards = (4 * n / shard if sharded else 4 * n) if dpo and reference else 0.0
    if not sharded:
        return Memory(params=4 * n, grads=4 * n, optimizer=8 * n, activations=acts, reference=ref_shards)
    block = _block_params(cfg)
    root = n - cfg.n_layers * block
    accumulated = 4 * n if accumulation > 1 else 0.0
    # Gathered blocks at the start of backward, and while a reference runs its forward.
    gathered, kept = (min(3, cfg.n_layers), 1) if reshard_after_forward else (cfg.n_layers, cfg.n_layers)
    peak = Memory(params=4 * n / shard + p * (root + gathered * block),
                  grads=4 * n / shard + accumulated + p * (root + block),
                  optimizer=8 * n / shard, activations=acts, reference=ref_shards)
    if not (dpo and reference):
        return peak
    # The reference's forward: the policy holds its root and last block gathered (every block
    # without reshard_after_forward), its saved activations with the fp32 logits, and the
    # gradients of earlier micro-batches; the reference gathers its root and up to two blocks
    # and computes its logits.
    saved, _ = _forward_saved(cfg, tokens, p, checkpointing, seq_len, False)
    logits = (POLICY_SAVED_LOGPROB_BYTES + REFERENCE_LOGPROB_BYTES) * cfg.vocab_size * tokens
    during_reference = Memory(params=4 * n / shard + p * (root + kept * block), grads=4 * n / shard + accumulated,
                              optimizer=8 * n / shard, activations=saved + logits,
                              reference=ref_shards + p * (root + min(2, cfg.n_layers) * block))
    return max(peak, during_reference, key=lambda m: m.total)


def memory_for_config(cfg: Config, device_type: str = "cuda") -> Memory:
    """`memory_per_device` for a raylm config's training step, its settings resolved as a
    worker on `device_type` resolves them (precision, loss chunk): the stage decides the
    rest. SFT always masks documents (raylm.objectives.make_objective), pre-training when
    data.document_mask is on; DPO counts micro-batches in pairs and holds the frozen
    reference unless dpo.precompute_reference.

    train.float8 changes none of these figures. torchao's Float8Linear (raylm.parallel.
    apply_float8) saves for backward the high-precision input and weight that nn.Linear saves,
    and casts them to float8 again in backward; FSDP2 gathers the compute-dtype copies as
    without it (raylm leaves torchao's enable_fsdp_float8_all_gather off); master weights,
    gradients and AdamW's moments stay fp32. What it adds is each matmul's float8 copies of
    its operands, and uncompiled the scaling's fp32 temporaries, freed once that matmul is
    done: workspace like other operators', which the estimate leaves to HEADROOM_FRACTION."""
    tc = cfg.train.for_device(device_type)
    model = cfg.model if cfg.model.vocab_size else cfg.model.with_vocab(cfg.tokenizer.vocab_size)
    shard = tc.num_workers // tc.replicate_degree
    accumulation = tc.global_batch_size // (tc.micro_batch_size * tc.num_workers)
    sharded = tc.num_workers > 1 or tc.precision != "fp32"  # raylm.parallel.sharding_pays
    dpo = cfg.stage == "dpo"
    doc_mask = cfg.stage == "sft" or (cfg.stage not in ("sft", "dpo") and cfg.data.document_mask)
    return memory_per_device(model, cfg.data.seq_len, tc.micro_batch_size, shard, tc.precision,
                             tc.activation_checkpointing, accumulation, sharded, tc.loss_chunk_size,
                             doc_mask=doc_mask, dpo=dpo, reference=not cfg.dpo.precompute_reference,
                             reshard_after_forward=tc.reshard_after_forward)


def loss_chunk_for(kind: str) -> int:
    """What train.loss_chunk_size="auto" means on the device kind (raylm.config.device_defaults)."""
    from raylm import config

    return getattr(config, "CUDA_LOSS_CHUNK", 0) if kind == "gpu" else 0


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    size: str  # the preset
    model: ModelConfig  # its shape, vocabulary resolved
    hardware: Hardware
    params: int
    available_tokens: int | None
    train_tokens: int
    epochs: float | None
    budget_rule: str
    seq_len: int
    global_batch: int  # sequences a step
    micro_batch: int
    accumulation: int
    steps: int
    lr: float
    warmup: int
    checkpointing: bool
    precision: str
    replicate_degree: int  # train.replicate_degree: 1 is FSDP over every device, R > 1 HSDP
    memory: Memory
    mfu: float  # as given (--mfu: a run's logged MFU) or DEFAULT_MFU
    recompute: float  # what activation checkpointing's recompute divides throughput by (1: none, or in mfu)
    tokens_per_s: float
    hours: float
    data_cpus: int
    bytes_per_token: float
    language: str
    domain: str
    notes: tuple[str, ...]
    config: Config

    @property
    def device_hours(self) -> float:
        return self.hours * self.hardware.devices

    @property
    def checkpoint_bytes(self) -> int:
        """One checkpoint as DCP writes it (raylm.checkpoint): the fp32 master weights and
        AdamW's two fp32 moments, 12 bytes a parameter, whatever the compute dtype; the
        step counters, hyperparameters and torch.save's per-tensor headers add a few KB."""
        return 12 * self.params

    @property
    def prepared_tokens(self) -> int:
        """What data.mode=prepare tokenizes: the whole corpus at data.path, once (repeated
        epochs reuse it; a budget smaller than the corpus still prepares all of it), or the
        budget when the corpus size is not given (--tokens)."""
        return self.available_tokens or self.train_tokens

    @property
    def prepare_cpu_hours(self) -> float:
        return self.prepared_tokens * self.bytes_per_token / TOKENIZE_BYTES_PER_S_PER_CPU / 3600


def _lr(n: float) -> float:
    xs, ys = zip(*LR_TABLE)
    if n <= xs[0]:
        return ys[0]
    if n >= xs[-1]:
        return ys[-1]
    i = next(i for i in range(1, len(xs)) if n <= xs[i])
    t = (math.log(n) - math.log(xs[i - 1])) / (math.log(xs[i]) - math.log(xs[i - 1]))
    return float(f"{math.exp(math.log(ys[i - 1]) + t * (math.log(ys[i]) - math.log(ys[i - 1]))):.2g}")


def _batch_tokens(n: float) -> float:
    return 0.5e6 if n < 1e9 else 1e6 if n < 5e9 else 2e6 if n < 20e9 else 4e6


def bytes_per_token(vocab: int, language: str, domain: str) -> float:
    """Log-interpolated between the measured 2k-vocabulary figure and the 32k rule of thumb,
    then scaled for code and for languages other than English."""
    v0, b0 = MEASURED_BYTES_PER_TOKEN
    t = min(1.0, max(0.0, math.log(vocab / v0) / math.log(32000 / v0)))
    base = b0 + t * (BYTES_PER_TOKEN_32K - b0)
    return base * DOMAIN_FACTOR[domain] * (1.0 if _language(language) == "en" else OTHER_LANGUAGE_FACTOR)


def _language(language: str) -> str:
    """"en" for English however it is written (ENGLISH_NAMES in any case, alone or with a
    region: en-US, en_GB, English (UK)), otherwise the name as given; an empty name is refused."""
    name = language.strip() if isinstance(language, str) else ""
    if not name:
        raise ConfigError(f"--language={language!r}: expected a language name or code, e.g. en")
    return "en" if re.split(r"[-_\s(]", name.lower(), maxsplit=1)[0] in ENGLISH_NAMES else name


def _fit(cfg: ModelConfig, hw: Hardware, seq_len: int, per_rank: float, cap: int, precision: str,
         replicate_degree: int = 1, doc_mask: bool = False):
    """The largest power-of-two micro-batch (up to what one rank needs a step) that fits,
    without activation checkpointing if any does (recompute costs about a third more
    compute), else with it, with the state sharded over `hw.shard(replicate_degree)` devices;
    and its accumulation steps: the nearest to `per_rank` sequences a rank, but never more
    than `cap` (the MIN_STEPS bound). Rounding to the nearest multiple of a micro-batch no
    larger than `per_rank` is off by at most BATCH_TOLERANCE; where `cap` forces it further
    down (14.5 sequences a rank under a cap of 14 once gave micro-batch 8 x 1: 8, 55% of the
    target), a smaller micro-batch that fits gets closer (4 x 3), and the largest one is kept
    only when none does. None if nothing fits."""
    for checkpointing in (False, True):
        mb = 1 << (max(1, min(round(per_rank), cap)).bit_length() - 1)
        fallback = None
        while mb >= 1:
            accumulation = min(max(1, round(per_rank / mb)), cap // mb)
            mem = memory_per_device(cfg, seq_len, mb, hw.shard(replicate_degree), precision, checkpointing,
                                    accumulation, hw.sharded, loss_chunk_for(hw.kind), doc_mask=doc_mask)
            if mem.total <= hw.usable:
                if mb == 1 or abs(mb * accumulation - per_rank) <= per_rank * BATCH_TOLERANCE * (1 + 1e-9):
                    return mb, accumulation, checkpointing, mem
                fallback = fallback or (mb, accumulation, checkpointing, mem)
            mb //= 2
        if fallback is not None:  # closer only with more accumulation than memory allows
            return fallback
    return None


def recompute_factor(cfg: ModelConfig, seq_len: int) -> float:
    """Compute of a step with activation checkpointing over one without: backward recomputes
    each checkpointed block's forward, a third of the blocks' share of raylm.metrics'
    6N + 12LdT (their weights' 6 FLOPs a parameter and all of the attention's 12LdT), less
    the MLP's last matmul, w2: torch's checkpoint (non-reentrant, as checkpoint_wrapper runs
    it) stops recomputing once every tensor backward needs is back, and nothing saves w2's
    output (AOTAutograd's partitioner drops it from a compiled block's backward alike). The
    LM head and final norm sit outside the checkpointed blocks and are not recomputed. 1.20
    at gpt2-124m (T 1024), 1.24 at 1b (2048), 1.25 at 7b (4096): what torch's FLOP counter
    counts on these models' steps with and without it."""
    L, d = cfg.n_layers, cfg.dim
    blocks_forward = 2 * L * _block_params(cfg) + 4 * L * d * seq_len
    return 1 + (blocks_forward - 2 * L * d * cfg.hidden_dim) / flops_per_token(cfg, seq_len)


def make_plan(size: str, gpus: str, nodes: int = 1, tokens: str | int | None = None, language: str = "en",
              domain: str = "web", seq_len: int | None = None, mfu: float | None = None,
              train_tokens: str | int | None = None, memory_gb: float | None = None, data: str = "",
              name: str | None = None, replicate_degree: int = 1, document_mask: bool = False) -> Plan:
    """`replicate_degree` is train.replicate_degree: >1 plans HSDP, with the state sharded
    over the devices / replicate_degree devices of one replica instead of over all of them.
    `document_mask` is data.document_mask: attention within each packed document, whose
    attention bias every layer keeps (`doc_mask_bytes`).

    `mfu`: without it, DEFAULT_MFU, the share of the peak the step's own FLOPs would run at;
    activation checkpointing then adds its recompute (`recompute_factor`). Given, it is a
    run's logged `mfu` (model FLOPs, raylm.metrics: the recompute of a checkpointed run is
    already in it, as lower throughput), used as it is."""
    preset, cfg = resolve_size(size)
    hw = parse_hardware(gpus, nodes, memory_gb)
    language = _language(language)
    if domain not in DOMAIN_FACTOR:
        raise ConfigError(f"--domain={domain!r}: unknown; choose from {', '.join(DOMAIN_FACTOR)}")
    if not isinstance(replicate_degree, int) or replicate_degree < 1 or hw.devices % replicate_degree:
        raise ConfigError(f"train.replicate_degree={replicate_degree!r} must be a positive divisor of the "
                          f"{hw.devices} devices")
    n = count_params(cfg)
    notes: list[str] = [hw.note] if hw.note else []
    precision = "bf16" if hw.kind == "gpu" else "fp32"
    if seq_len is None:  # the preset's context on GPUs; on CPUs the length the CPU sweep chose
        from raylm.config import DataConfig

        seq_len = cfg.max_seq_len if hw.kind == "gpu" else min(cfg.max_seq_len, DataConfig().seq_len)
    if seq_len < 1:  # checked here, not by the config at the end: the batch divides by it first
        raise ConfigError(f"--seq-len={seq_len}: expected an integer >= 1")
    if seq_len > cfg.max_seq_len:
        cfg = replace(cfg, max_seq_len=seq_len)
        notes.append(f"model.max_seq_len raised to {seq_len}")
    mfu_given = mfu is not None
    if mfu is None:
        mfu = DEFAULT_MFU[hw.kind]
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu}: expected a fraction in (0, 1]")

    # Token budget.
    available = parse_count(tokens) if tokens is not None else None
    optimal = TOKENS_PER_PARAM * n
    if train_tokens is not None:
        budget, rule = parse_count(train_tokens, "--train-tokens"), "as asked (--train-tokens)"
    elif available is None or available >= optimal:
        budget, rule = optimal, f"compute-optimal: {TOKENS_PER_PARAM} tokens/parameter"
    else:
        budget = min(optimal, MAX_EPOCHS * available)
        rule = (f"the data, repeated ({TOKENS_PER_PARAM} tokens/parameter would need {optimal / available:.1f} "
                f"epochs; capped at {MAX_EPOCHS})") if budget < optimal else "compute-optimal, data repeated"
    step_tokens_min = seq_len * hw.devices  # one sequence on every device
    for what, value in (("--tokens", available), ("the token budget", budget)):
        if value is not None and value < step_tokens_min:
            raise ConfigError(f"{what}={value:,} is fewer tokens than one step: {hw.devices} devices x "
                              f"{seq_len} tokens = {step_tokens_min:,}")

    # Batch: the target sequences a step, split over the data-parallel ranks (every device),
    # and at most `cap` of them a rank, so that the budget makes MIN_STEPS steps (one sequence
    # a device when it is too small for that).
    target = min(_batch_tokens(n), budget / MIN_STEPS)
    per_rank = target / seq_len / hw.devices
    cap = max(1, math.floor(budget / MIN_STEPS / seq_len / hw.devices))
    fit = _fit(cfg, hw, seq_len, per_rank, cap, precision, replicate_degree, document_mask)
    if fit is None:
        need = memory_per_device(cfg, seq_len, 1, hw.shard(replicate_degree), precision, True,
                                 min(max(1, round(per_rank)), cap), hw.sharded, loss_chunk_for(hw.kind),
                                 doc_mask=document_mask)
        hsdp = f" under HSDP (train.replicate_degree={replicate_degree})" if replicate_degree > 1 else ""
        raise ConfigError(
            f"--size {size} does not fit on {hw}{hsdp}: {need.total / GiB:.1f} GiB per device even with micro-batch 1 "
            f"and activation checkpointing (params {need.params / GiB:.1f}, grads {need.grads / GiB:.1f}, "
            f"optimizer {need.optimizer / GiB:.1f}, activations {need.activations / GiB:.1f}), "
            f"{hw.usable / GiB:.1f} GiB usable; add devices (--nodes) or use a larger one"
            + (f"; {hw.note}" if hw.note else ""))
    mb, accumulation, checkpointing, mem = fit
    global_batch = mb * accumulation * hw.devices
    steps = max(1, round(budget / (global_batch * seq_len)))
    train_tokens_final = steps * global_batch * seq_len
    epochs = train_tokens_final / available if available else None
    warmup = min(max(30, round(WARMUP_TOKENS / (global_batch * seq_len)), steps // 100), max(1, steps // 10))
    lr = _lr(n)

    recompute = recompute_factor(cfg, seq_len) if checkpointing and not mfu_given else 1.0
    tokens_per_s = hw.devices * hw.peak * mfu / (flops_per_token(cfg, seq_len) * recompute)
    hours = train_tokens_final / tokens_per_s / 3600
    bpt = bytes_per_token(cfg.vocab_size, language, domain)
    data_cpus = math.ceil(tokens_per_s * bpt / TOKENIZE_BYTES_PER_S_PER_CPU)

    if hw.nodes > 1 and replicate_degree == 1:
        hsdp = _fit(cfg, hw, seq_len, per_rank, cap, precision, hw.nodes, document_mask)
        notes.append(
            f"HSDP (train.replicate_degree={hw.nodes}: shard within a node, replicate across {hw.nodes}) would keep "
            f"all-gathers on the node's links"
            + (f" and fits ({hsdp[3].total / GiB:.1f} GiB/device)" if hsdp else " but does not fit")
            + "; this plan shards FSDP2 over all devices (train.replicate_degree=1)")
    step_tokens = global_batch * seq_len
    if abs(step_tokens - target) > BATCH_NOTE_FRACTION * target:
        source = (f"{_count(budget)} tokens over {MIN_STEPS:,} steps" if budget / MIN_STEPS < _batch_tokens(n)
                  else f"GPT-3's for {_count(n)} parameters")
        notes.append(f"the global batch, {step_tokens:,} tokens a step, is {step_tokens / target:.0%} of the target "
                     f"{target:,.0f} ({source}): micro-batch {mb} x {accumulation} accumulation on each of "
                     f"{hw.devices} devices, in whole sequences, at least one a device, within memory and "
                     f"{MIN_STEPS:,} steps")
    if steps < MIN_STEPS:
        notes.append(f"{steps:,} steps, fewer than {MIN_STEPS:,}: the budget is smaller than {MIN_STEPS:,} steps of "
                     f"one sequence on each of the {hw.devices} devices ({MIN_STEPS * step_tokens_min:,} tokens)")
    if accumulation > 1:
        notes.append(f"gradient accumulation holds unsharded fp32 gradients ({_bytes(4 * n)} per device) "
                     f"between micro-batches")
    if checkpointing and mfu_given:
        notes.append(f"--mfu {mfu:g} is taken as a run's logged MFU, which already counts activation "
                     f"checkpointing's recompute (x {recompute_factor(cfg, seq_len):.2f} compute at this shape)")

    default_name = f"{preset}-{hw.devices}{hw.name.lower().replace(' ', '-')}"  # 1b-8h100-pcie
    overrides = [f"name={name or default_name}", f"model.preset={preset}",
                 f"model.max_seq_len={cfg.max_seq_len}", f"data.seq_len={seq_len}",
                 f"train.num_workers={hw.devices}", f"train.use_gpu={'true' if hw.kind == 'gpu' else 'false'}",
                 f"train.micro_batch_size={mb}", f"train.global_batch_size={global_batch}",
                 f"train.max_steps={steps}", f"train.lr={lr}", f"train.warmup_steps={warmup}",
                 f"train.activation_checkpointing={'true' if checkpointing else 'false'}",
                 f"train.replicate_degree={replicate_degree}"]
    if document_mask:
        overrides.append("data.document_mask=true")
    overrides.append(f"tokenizer.vocab_size={tokenizer_vocab(preset)}")
    if data:
        overrides.append(("data.path", data))
    config = load_config(overrides=overrides)
    return Plan(preset, cfg, hw, n, available, train_tokens_final, epochs, rule, seq_len, global_batch, mb,
                accumulation, steps, lr, warmup, checkpointing, precision, replicate_degree, mem, mfu, recompute,
                tokens_per_s, hours, data_cpus, bpt, language, domain, tuple(notes), config)


# --------------------------------------------------------------------------- output


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def format_table(plan: Plan) -> str:
    hw, m = plan.hardware, plan.memory
    r = plan.replicate_degree
    layout = ("one process, no sharding" if hw.kind == "cpu" and hw.devices == 1 else
              "FSDP2 on one device (nothing to shard; the same code path)" if hw.devices == 1 else
              f"HSDP (train.replicate_degree={r}): {r} replicas, parameters, gradients and optimizer state "
              f"sharded over the {hw.shard(r)} devices of each" if r > 1 else
              f"FSDP2, parameters sharded over all {hw.devices} devices")
    epochs = f", {plan.epochs:.2f} epochs of {_count(plan.available_tokens)}" if plan.epochs is not None else ""
    gib = _bytes
    keep = plan.config.train.keep_checkpoints
    rows = [
        ("model", f"{plan.size}: {_count(plan.params)} parameters ({plan.model.n_layers} x "
                  f"{plan.model.dim}, vocab {plan.model.vocab_size})"),
        ("hardware", str(hw)),
        ("token budget", f"{_count(plan.train_tokens)} tokens{epochs}; {plan.budget_rule}"),
        ("sequence length", f"{plan.seq_len}"),
        ("global batch", f"{plan.global_batch} sequences = {_count(plan.global_batch * plan.seq_len)} tokens/step, "
                         f"{plan.steps:,} steps"),
        ("learning rate", f"{plan.lr:g} peak, {plan.warmup} warmup steps, cosine to 0.3x"),
        ("layout", f"{layout}, {plan.precision}"),
        ("micro-batch", f"{plan.micro_batch} x {plan.accumulation} accumulation per device; activation "
                        f"checkpointing {'on' if plan.checkpointing else 'off'}"),
        ("memory/device", f"params {gib(m.params)} + grads {gib(m.grads)} + optimizer {gib(m.optimizer)} + "
                          f"activations {gib(m.activations)} = {gib(m.total)}"),
        ("headroom", f"{gib(hw.memory - m.total)} of {gib(hw.memory)} ({(hw.memory - m.total) / hw.memory:.0%})"),
        ("throughput", f"{_count(plan.tokens_per_s)} tokens/s at {plan.mfu:.0%} MFU"
                       + (f" (/ {plan.recompute:.2f} for recompute)" if plan.recompute != 1 else "")),
        ("time", f"{_duration(plan.hours)}, {plan.device_hours:,.1f} device-hours"),
        ("checkpoints", f"{gib(plan.checkpoint_bytes)} each (fp32 weights + AdamW's 2 moments, 12 bytes/parameter), "
                        f"{keep} kept (train.keep_checkpoints), {keep + 1} while the next is written: "
                        f"{gib((keep + 1) * plan.checkpoint_bytes)} of run storage"),
        ("data workers", f"{plan.data_cpus} CPU{'s' * (plan.data_cpus > 1)} to tokenize as fast as training reads "
                         f"(data.mode=stream), or {plan.prepare_cpu_hours:,.3g} CPU-hours to prepare its "
                         f"{_count(plan.prepared_tokens)} tokens ahead, "
                         f"{gib(plan.prepared_tokens * plan.bytes_per_token)} of text "
                         f"({plan.bytes_per_token:.1f} bytes/token, {plan.language}/{plan.domain})"),
    ] + [("note", note) for note in plan.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _bytes(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2**20:.1f} MiB"


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} minutes"
    return f"{hours:.1f} hours" if hours < 48 else f"{hours / 24:.1f} days"


def recipe_yaml(plan: Plan) -> str:
    """The planned keys as a config YAML (`raylm pretrain --config FILE`), the table on top."""
    from raylm.config import to_dict

    full, default = to_dict(plan.config), to_dict(Config())
    keep: dict = {}
    for section, values in full.items():
        if isinstance(values, dict):
            changed = {k: v for k, v in values.items() if v != default[section].get(k)}
            if section == "model":  # a preset, then the fields that differ from it
                preset = to_dict(MODEL_PRESETS[plan.size])
                changed = {"preset": plan.size, **{k: v for k, v in values.items() if v != preset[k]
                                                    and k != "vocab_size"}}
            if changed:
                keep[section] = changed
        elif values != default[section]:
            keep[section] = values
    header = "".join(f"# {line}\n" for line in ("raylm plan", *format_table(plan).splitlines()))
    return header + yaml.safe_dump(keep, sort_keys=False)


def write_recipe(plan: Plan, out: str) -> None:
    storage.write_text(out, recipe_yaml(plan))
