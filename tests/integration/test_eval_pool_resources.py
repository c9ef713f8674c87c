"""A pool asking the local Ray cluster for more GPUs than it has is a one-line error: the
actors would wait forever, and a GPU pool's driver scores nothing meanwhile, so `raylm eval
eval.workers=1 eval.gpus_per_worker=1` on a machine without GPUs hung (Ray's autoscaler
repeating that no node fits)."""

import pytest

from raylm.errors import ConfigError
from raylm.eval.pool import PoolSpec, RayPoolRunner

pytestmark = pytest.mark.integration


def test_a_gpu_pool_on_a_local_cluster_without_gpus_is_a_config_error(ray_local, tiny_run):
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    with pytest.raises(ConfigError, match=rf"^eval.workers=1 x eval.gpus_per_worker={gpus + 1:g} needs {gpus + 1:g} "
                                          rf"GPUs; the local Ray cluster has {gpus:g}$"):
        RayPoolRunner(tiny_run, None, 128, PoolSpec(workers=1, num_cpus=1, num_gpus=gpus + 1))
