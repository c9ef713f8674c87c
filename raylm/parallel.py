"""Parallelism applied from outside the model: float8, activation checkpointing, compile, FSDP2.

This is the only module that knows about meshes and mixed precision. The order is fixed
(as in torchtitan's `parallelize_llama`): swap in float8 linears, checkpoint-wrap each block,
compile each block, then `fully_shard` each block and finally the root, all on a model still
on the meta device. `materialize` then allocates the local shards and runs the model's own init.

The mesh is 1-D (FSDP: every rank holds 1/world of the state) unless train.replicate_degree
asks for HSDP: a 2-D mesh (replicate, shard) on which `fully_shard` shards within each group
of world/replicate_degree ranks and all-reduces gradients across the replicas.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from raylm.config import ModelConfig, device_defaults
from raylm.errors import ConfigError
from raylm.model import Transformer


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on CUDA and fp32 elsewhere (raylm.config.device_defaults)."""
    if precision == "auto":
        return device_defaults(torch.device(device).type)["precision"]
    return precision


def mixed_precision_policy(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # Master weights and optimizer state stay fp32 (the sharded parameters); bf16 is only the
    # dtype of the all-gathered compute copies. Gradients are reduced in fp32 so that small
    # per-rank contributions are not rounded away.
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None,
        reduce_dtype=torch.float32,
    )


def apply_float8(model: Transformer) -> None:
    """float8 training (torchao) for every block's linear layers.

    Their inputs and weights are cast to e4m3 with dynamic per-tensor scales and their
    output gradients to e5m2, for float8 tensor-core matmuls (H100 and later); master weights
    stay fp32 and checkpoints keep the same keys and dtypes. The embeddings and the LM head
    are left alone (the logits are where low precision hurts most), as are layers whose
    sizes are not multiples of 16, which float8 matmul kernels need. It pays off at widths
    where matmuls dominate (~1B and up); elsewhere the casts cost more than they save. On
    CPU, torch's own float8 matmul runs it (slowly), which is how the tests check it."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError("train.float8=true needs torchao: pip install -e '.[float8]' (or torchao)") from None

    def eligible(module: nn.Module, fqn: str = "") -> bool:
        return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    if not any(eligible(m) for block in model.layers for m in block.modules()):
        raise ConfigError(f"train.float8=true: no linear layer in the blocks has sizes divisible by 16 "
                         f"(model.dim={model.cfg.dim}); use a wider model or float8=false")
    # pad_inner_dim: float8 GPU matmuls also need the token count (micro-batch x sequence,
    # the inner dimension of the weight-gradient matmul) to be a multiple of 16; padding
    # makes any batch shape work, at a negligible cost when it already is one.
    config = Float8LinearConfig(pad_inner_dim=True)
    for block in model.layers:
        convert_to_float8_training(block, config=config, module_filter_fn=eligible)


def float8_refusal(device_name: str, capability: tuple[int, int]) -> str | None:
    """Why a CUDA device of this compute capability cannot train in float8, or None. Its
    matmuls (`torch._scaled_mm`) need 8.9 or later (L4, L40, H100 and up); torchao's training
    path does not check, and an A100 failed at its first forward, in every worker, on every
    retry, after the tokenizer and data stages had run."""
    if tuple(capability) >= (8, 9):
        return None
    major, minor = capability
    return (f"train.float8=true needs float8 matmuls (CUDA compute capability 8.9 or later: L4, L40, H100 "
            f"and up); {device_name} has {major}.{minor}: set train.float8=false")


def apply_activation_checkpointing(model: Transformer) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    # Per-block compile: blocks share one graph, so compile time does not grow with depth,
    # and FSDP's hooks stay outside the compiled region.
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block, fullgraph=True)


# The HSDP mesh of the current process group, made once: each mesh is a set of new process
# groups (NCCL communicators and their buffers on GPUs), and DPO's reference model shards
# like its policy. Keyed by the default group object itself, so that a group destroyed and
# created again (tests, benchmarks) never gets a mesh of the old one.
_meshes: dict[tuple, object] = {}


def data_parallel_mesh(device: torch.device, replicate_degree: int = 1):
    """The mesh `fully_shard` runs on: None (FSDP over the default process group) for
    replicate_degree 1, else a 2-D DeviceMesh (replicate=replicate_degree, shard=world/it),
    which is how FSDP2 does HSDP. Ranks are laid out row-major, so with one Ray Train worker
    per GPU and replicate_degree = nodes each shard group is one node's GPUs (Ray Train
    gives the workers of a node consecutive ranks)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not isinstance(replicate_degree, int) or replicate_degree < 1 or world % replicate_degree:
        raise ConfigError(f"train.replicate_degree={replicate_degree!r} must be a positive divisor of "
                          f"the world size {world}")
    if replicate_degree == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    key = (dist.group.WORLD, torch.device(device).type, replicate_degree)
    if key not in _meshes:
        _meshes.clear()  # a mesh of an older process group is dead
        _meshes[key] = init_device_mesh(torch.device(device).type, (replicate_degree, world // replicate_degree),
                                        mesh_dim_names=("replicate", "shard"))
    return _meshes[key]


def shard_model(model: Transformer, precision: str, reshard_after_forward: bool = True, mesh=None,
                frozen: bool = False) -> None:
    """FSDP2 on `mesh` (None: the default process group; 2-D: HSDP): each block is one
    all-gather unit, the root (embeddings, final norm, head) another.

    A trained model keeps the root and the last block gathered after forward, as backward
    needs them at once. `frozen`: a model that never runs backward (DPO's reference, run
    under no_grad) has no backward to reshard them, so they would stay gathered (bf16 copies
    of the embeddings, head and a block) for the whole run; every unit, the root included,
    reshards after its forward instead (fully_shard's reshard_after_forward=True, which an
    explicit value applies to the root too)."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(precision)
    # A block's inputs are the residual stream, already in the compute dtype (the embedding's
    # output), and the RoPE tables, which must stay fp32: FSDP2 casts every floating input to
    # param_dtype by default, and bf16 tables put an error of up to 2^-9 on each rotation,
    # growing with the angle at long positions (`apply_rope` rotates in fp32).
    block_mp = dataclasses.replace(mp, cast_forward_inputs=False)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=block_mp,
                    reshard_after_forward=frozen or (reshard_after_forward and i < n - 1))
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=frozen)


def sharding_pays(precision: str) -> bool:
    """Whether a training process shards its model: always over two ranks or more, and on a
    world of one only for bf16, whose compute copies FSDP2's MixedPrecisionPolicy makes. An
    fp32 world of one has nothing to shard, and FSDP2's DTensor bookkeeping would cost the
    tiny CPU model about 12% of its step (one worker on 2 cores: 9.0k against 10.2k tokens/s)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return world > 1 or precision != "fp32"


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    if is_sharded(model) and device.type == "cpu":
        # DTensor keeps sharded random init consistent only on CUDA meshes; on CPU every rank
        # draws its shard from the same seed (the shards repeat, and the weights depend on the
        # worker count). Initialise a full copy and keep this rank's shard of it.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from raylm.model import build_model

        full = build_model(model.cfg, "cpu", seed)
        set_model_state_dict(model, full.state_dict(), options=StateDictOptions(full_state_dict=True))


def build_parallel_model(cfg: ModelConfig, device: torch.device, precision: str, seed: int,
                         compile: bool | str = False, activation_checkpointing: bool = False,
                         reshard_after_forward: bool = True, float8: bool = False,
                         replicate_degree: int = 1, shard: bool | None = None, frozen: bool = False) -> Transformer:
    """Meta-device model -> float8 -> checkpointing -> compile -> FSDP2 (if distributed) -> materialised.
    compile="auto" (train.compile's default) compiles on CUDA only (raylm.config.device_defaults).
    replicate_degree > 1: HSDP over `data_parallel_mesh` (train.replicate_degree).

    `shard`: None shards whenever a process group is initialised (use `init_local_process_group`
    to get the sharded path, and bf16, in one process); training passes `sharding_pays`.
    Without sharding the model stays plain and runs in fp32.
    `frozen`: a model that only runs forward (see `shard_model`), whose every unit reshards after it.
    """
    mesh = data_parallel_mesh(device, replicate_degree)  # first: a bad degree fails before any work
    with torch.device("meta"):
        model = Transformer(cfg)
    if float8:
        device = torch.device(device)
        if device.type == "cuda":
            refusal = float8_refusal(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
            if refusal:
                raise ConfigError(refusal)
        apply_float8(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile == "auto":
        compile = device_defaults(torch.device(device).type)["compile"]
    if compile:
        apply_compile(model)
    if shard is None:
        shard = dist.is_available() and dist.is_initialized()
    if shard:
        shard_model(model, precision, reshard_after_forward, mesh, frozen=frozen)
    elif precision != "fp32":
        raise ValueError(f"precision={precision!r} needs a process group: call init_local_process_group first")
    materialize(model, device, seed)
    return model


def init_local_process_group(device: torch.device) -> None:
    """A one-process group, so that a single process (benchmarks, tests, debugging without
    Ray) runs the same FSDP2 code path, mixed precision included, as a Ray Train worker."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
