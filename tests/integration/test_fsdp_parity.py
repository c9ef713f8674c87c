"""Parity: 2 Ray Train workers running FSDP2 over gloo follow the unsharded model step for step,
under plain FSDP and under HSDP (train.replicate_degree=2: a 2 x 1 mesh), and a checkpoint
written under either layout resumes under the other, as does one written by an unsharded
process (a one-worker fp32 run, which does not shard: raylm.parallel.sharding_pays).

Both start from the same weights and see the same global batches; the sharded run splits
each batch over its ranks. Per-step losses and the final weights must agree to fp32
round-off (reduction order differs, so not bit for bit). One Ray Train run holds every
case: starting a worker group costs more than the steps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from raylm.config import ModelConfig, TrainConfig
from raylm.model import build_model
from raylm.train import NextTokenObjective, make_optimizer, train_step

pytestmark = pytest.mark.integration

MODEL = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
TRAIN = TrainConfig(lr=3e-3, micro_batch_size=4, global_batch_size=8, weight_decay=0.1)
STEPS = 4
SAVE_AT = 2  # the HSDP and FSDP runs checkpoint here; the other layout resumes from it


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, MODEL.vocab_size, (TRAIN.global_batch_size, 33), generator=g) for _ in range(STEPS)]


def run_steps(model, rank: int, world: int, opt=None, steps: range = range(STEPS)) -> list[float]:
    opt = opt or make_optimizer(model, TRAIN, torch.device("cpu"))
    losses = []
    per = TRAIN.global_batch_size // world
    for b in [batches()[i] for i in steps]:
        mine = b[rank * per:(rank + 1) * per]
        stats = train_step(model, opt, [{"tokens": mine}], NextTokenObjective(), TRAIN.lr, TRAIN.grad_clip)
        losses.append(stats.loss)
    return losses


def mesh_shape(model) -> tuple[int, ...]:
    return tuple(next(model.parameters()).device_mesh.shape)


def layout_config(storage: str, name: str, degree: int = 1):
    from raylm.config import Config, DataConfig

    return Config(name=name, storage=storage, model=MODEL, data=DataConfig(seq_len=32),
                  train=replace(TRAIN, replicate_degree=degree)).validate()


def train_and_save(c, init: dict, rank: int, world: int) -> tuple:
    """setup_model, the initial weights, SAVE_AT steps, a checkpoint through CheckpointSaver."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from raylm.train import CheckpointSaver, Hooks, setup_model, storage_publisher

    quiet = lambda *_: None  # noqa: E731
    model, opt, _ = setup_model(c, torch.device("cpu"), "never", quiet)
    # A copy: set_model_state_dict replaces the dict's tensors with this model's shards.
    set_model_state_dict(model, dict(init), options=StateDictOptions(full_state_dict=True))
    losses = run_steps(model, rank, world, opt, range(SAVE_AT))
    saver = CheckpointSaver(c, Hooks(report=quiet, publish_checkpoint=storage_publisher(c),
                                     val_batches=list, checkpoint_meta={}), quiet)
    saver.save(model, opt, SAVE_AT, SAVE_AT * TRAIN.global_batch_size, {})
    saver.finish()
    return model, opt, losses


def layouts_run(config: dict, rank: int, world: int) -> dict:
    """Through raylm.train's own setup_model and CheckpointSaver, as a training run goes:
    an HSDP and a plain FSDP run from the same weights, each checkpointed at SAVE_AT; then
    each checkpoint resumed (`resume="must"`) under the other layout for the remaining steps."""
    from raylm.train import setup_model

    quiet = lambda *_: None  # noqa: E731
    out = {}
    for name, degree in (("hsdp", 2), ("fsdp", 1)):
        model, opt, losses = train_and_save(layout_config(config["storage"], name, degree), config["init"], rank, world)
        losses += run_steps(model, rank, world, opt, range(SAVE_AT, STEPS))
        out[name] = {"losses": losses, "mesh": mesh_shape(model)}
    for name, degree, source in (("fsdp_from_hsdp", 1, "hsdp"), ("hsdp_from_fsdp", 2, "fsdp"),
                                 ("fsdp_from_plain", 1, "plain")):
        model, opt, start = setup_model(layout_config(config["storage"], source, degree), torch.device("cpu"),
                                        "must", quiet)
        out[name] = {"losses": run_steps(model, rank, world, opt, range(start.step, STEPS)),
                     "mesh": mesh_shape(model), "step": start.step}
    return out


def sharded_worker(config: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from raylm.checkpoint import full_model_state
    from raylm.parallel import build_parallel_model

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_parallel_model(MODEL, torch.device("cpu"), "fp32", seed=1)
    set_model_state_dict(model, dict(config["init"]), options=StateDictOptions(full_state_dict=True))
    losses = run_steps(model, rank, world)
    final = full_model_state(model)  # a collective: every rank calls it
    if rank == 0:  # Ray Train v2 keeps metrics only with checkpoints: hand results over by file
        torch.save({"losses": losses, "final": final}, config["out"])
    layouts = layouts_run(config, rank, world)
    if rank == 0:
        torch.save(layouts, config["layouts"])


@pytest.fixture(scope="module")
def sharded_runs(ray_local, tmp_path_factory):
    """The unsharded reference's losses and weights, and one 2-worker Ray Train run of
    `sharded_worker`; its results files (missing: read the run's error)."""
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    tmp_path = tmp_path_factory.mktemp("parity")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    reference = build_model(MODEL, seed=0)
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    opt = make_optimizer(reference, TRAIN, torch.device("cpu"))
    expected = run_steps(reference, 0, 1, opt, range(SAVE_AT))
    at_save = {k: v.clone() for k, v in reference.state_dict().items()}
    expected += run_steps(reference, 0, 1, opt, range(SAVE_AT, STEPS))
    # The unsharded layout's checkpoint, written here (no process group: a plain model).
    plain, _, _ = train_and_save(layout_config(str(tmp_path / "runs"), "plain"), init, 0, 1)
    assert not hasattr(next(plain.parameters()), "device_mesh")

    paths = {"out": tmp_path / "sharded.pt", "layouts": tmp_path / "layouts.pt", "storage": tmp_path / "runs"}
    trainer = TorchTrainer(sharded_worker, train_loop_config={"init": init, **{k: str(v) for k, v in paths.items()}},
                           scaling_config=ray.train.ScalingConfig(num_workers=2),
                           run_config=ray.train.RunConfig(name="parity", storage_path=str(tmp_path)))
    try:  # a failure is each test's to report, after what the run did write
        error = trainer.fit().error
    except Exception as e:  # Ray Train v2 raises a worker's error from fit()
        error = e

    def load(key: str):
        assert paths[key].exists(), f"the Ray Train run wrote no {paths[key].name}: {error}"
        return torch.load(paths[key], weights_only=True)

    return {"expected": expected, "reference": reference, "at_save": at_save, "error": error, "load": load,
            "storage": paths["storage"]}


def test_two_fsdp2_workers_match_the_unsharded_model(sharded_runs):
    sharded, reference = sharded_runs["load"]("out"), sharded_runs["reference"]
    got = sharded["losses"]
    assert len(got) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(sharded_runs["expected"]), rtol=1e-5, atol=1e-5)
    assert got[-1] != got[0]  # the steps really updated the weights
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(sharded["final"][name], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_hsdp_matches_fsdp_and_its_checkpoints_resume_under_either_layout(sharded_runs):
    from raylm import checkpoint
    from raylm.model import Transformer

    runs = sharded_runs["load"]("layouts")
    assert sharded_runs["error"] is None
    expected = torch.tensor(sharded_runs["expected"])
    assert runs["hsdp"]["mesh"] == (2, 1) and runs["hsdp_from_fsdp"]["mesh"] == (2, 1)  # replicate x shard
    assert runs["fsdp"]["mesh"] == (2,) and runs["fsdp_from_hsdp"]["mesh"] == (2,)
    for name in ("hsdp", "fsdp"):
        torch.testing.assert_close(torch.tensor(runs[name]["losses"]), expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # Resumed under the other layout at SAVE_AT: the same weights and AdamW moments, so the
    # same remaining losses.
    assert runs["fsdp_from_plain"]["mesh"] == (2,)
    for name in ("fsdp_from_hsdp", "hsdp_from_fsdp", "fsdp_from_plain"):
        assert runs[name]["step"] == SAVE_AT
        torch.testing.assert_close(torch.tensor(runs[name]["losses"]), expected[SAVE_AT:], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # Inference and export read an HSDP checkpoint's weights into one plain process.
    with torch.device("meta"):
        plain = Transformer(MODEL)
    plain.to_empty(device="cpu")
    checkpoint.load_model_weights(plain, checkpoint.latest_complete(str(sharded_runs["storage"] / "hsdp")))
    for name, value in sharded_runs["at_save"].items():
        torch.testing.assert_close(plain.state_dict()[name], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
