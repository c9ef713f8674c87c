"""Threads and actors are sized by the CPUs a process may run on, not the machine's count: in
a container or pod limited by CPU affinity (a cpuset), os.cpu_count() still says how many the
node has, and SentencePiece's trainer, the in-process prepare's threads and the tokenizer
actor pool oversubscribed the few allowed. Inside a Ray task or actor, the CPUs Ray assigned
it bound the count as well. Real affinity (os.sched_setaffinity), real SentencePiece, real Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                 reason="needs CPU affinity and at least two CPUs to allow one of")]

# Pinned to one CPU, a process trains a tokenizer and says the thread count SentencePiece
# recorded in the model it trained (raylm clears it from the saved file, so it is read as the
# model comes out of the trainer), and the threads the in-process prepare would use.
ONE_CPU = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from sentencepiece import sentencepiece_model_pb2
from raylm import tokenizer
from raylm.config import DataConfig
from raylm.data import _threads

clear = tokenizer._without_machine_facts
def recorded(model_bytes):
    print("trainer threads", sentencepiece_model_pb2.ModelProto.FromString(model_bytes).trainer_spec.num_threads)
    return clear(model_bytes)
tokenizer._without_machine_facts = recorded
tokenizer.train_tokenizer(["the quick brown fox jumps over the lazy dog " * 40, "pack my box with five dozen jugs " * 40],
                          sys.argv[1], 300)
print("prepare threads", _threads(DataConfig()))
"""


def test_a_process_pinned_to_one_cpu_trains_and_prepares_on_one_thread(tmp_path):
    out = subprocess.run([sys.executable, "-c", ONE_CPU, str(tmp_path / "tok")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["trainer threads 1", "prepare threads 1"], out.stdout


# Pinned to one CPU, the one-machine cluster raylm would start sizes its "auto" workers by it.
AUTO_WORKERS = """
import os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from raylm.config import load_config
from raylm.pipeline import resolve_workers
tc = resolve_workers(load_config()).train
print("workers", tc.num_workers, "cpus", tc.cpus_per_worker)
"""


def test_auto_workers_of_a_process_pinned_to_one_cpu_use_one_cpu():
    out = subprocess.run([sys.executable, "-c", AUTO_WORKERS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "workers 1 cpus 1.0", out.stdout


def test_the_tokenizer_pool_on_this_machine_fits_the_driver_cpus(ray_local):
    """A one-node cluster on this machine: no more tokenizer actors than the driver's CPUs.
    Affinity is per thread on Linux, so a thread of this process stands for a pinned driver."""
    from raylm.data import tokenizer_pool_size

    got = []

    def pinned():
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        got.append(tokenizer_pool_size())

    t = threading.Thread(target=pinned)
    t.start()
    t.join(60)
    assert got == [1]


def test_a_ray_task_counts_the_cpus_ray_assigned_it(ray_local):
    import ray

    from raylm.config import DataConfig
    from raylm.data import _threads

    assert ray.get(ray.remote(num_cpus=1)(_threads).remote(DataConfig())) == 1
