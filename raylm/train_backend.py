"""Ray Train's torch backend, set up from a controller that never imports torch.

Ray's `TorchConfig` lives in a module that imports torch (and `ray.train.torch` with it), and
Ray Train's controller unpickles its backend config as it starts: on 2 cores that import took
about 2.5 s of the controller's start, on the way to the first step, in a process that runs
no torch code at all. `LocalTorchConfig` is the same configuration (backend, init method,
timeout) whose controller side is plain Ray: it finds the master address on worker 0, then
has every worker run Ray's own torch functions (`ray.train.torch.config`), imported there,
where torch is imported anyway. Used where raylm starts the controller itself
(`raylm.train_ray.trainer_class`, a local cluster); TPU and custom backends stay Ray's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
from ray.train.v2._internal.util import TrainingFramework

log = logging.getLogger(__name__)


@dataclass
class LocalTorchConfig(BackendConfig):
    """`ray.train.torch.TorchConfig`'s fields and meaning (gloo or nccl only)."""

    backend: str | None = None  # None: nccl where workers have GPUs, else gloo (TorchTrainer sets it)
    init_method: str = "env"  # the only one raylm uses: MASTER_ADDR/MASTER_PORT on every worker
    timeout_s: int = 1800  # Ray's default for collectives

    @property
    def backend_cls(self):
        return _LocalTorchBackend

    @property
    def train_func_context(self):
        return _TorchContext

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


class _LocalTorchBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: LocalTorchConfig) -> None:
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        if backend not in ("gloo", "nccl") or backend_config.init_method != "env":
            raise ValueError(f"LocalTorchConfig sets up gloo or nccl through env://, not {backend} through "
                             f"{backend_config.init_method}; use ray.train.torch.TorchConfig")
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_torch_env_vars)
        ray.get([worker_group.execute_single_async(i, _init_process_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config) -> None:
        futures = worker_group.execute_async(_shutdown, destroy_process_group=len(worker_group) > 1)
        timeout = int(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        # Each worker's answer on its own: a worker whose process died (killed, out of memory)
        # has no process group left to shut down, and the run's error names it; ray.get of the
        # whole list raised its ActorDiedError, which Ray Train logged with its traceback above
        # raylm's one line. A live worker's failure to shut down still raises.
        if not futures:
            return
        ready, pending = ray.wait(futures, num_returns=len(futures), timeout=timeout)
        for future in ready:
            try:
                ray.get(future)
            except ray.exceptions.RayActorError as e:
                log.debug("torch process group shutdown skipped on a dead worker: %s", e)
        if pending:  # as Ray's: the workers are being torn down anyway
            log.warning("torch process group shutdown timed out after %s seconds", timeout)


# ---------------------------------------------------------------- run on the workers (torch imported there)

def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _torch_env_vars() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _init_process_group(**kw) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kw)


def _shutdown(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


class _TorchContext:
    """Ray's TorchConfigContextManager (the default CUDA device around the training function)."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)
