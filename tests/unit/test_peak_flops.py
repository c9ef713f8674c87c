"""The bf16 peak that MFU divides by, for the names torch.cuda.get_device_name() reports.

Keys match whole words, the most specific one winning: a substring match gave the L40 the
L4's peak (121 against 181 TFLOPS), the H100 NVL and H200 NVL the SXM parts' 989 (835 on
their datasheets) and the GB200 the B200's 2250 (2500)."""

import pytest

from raylm.metrics import PEAK_BF16_FLOPS, mfu, peak_flops
from raylm.config import ModelConfig

T = 1e12


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989),  # SXM5
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835),
    ("NVIDIA GH200 480GB", 989),
    ("NVIDIA GH200 144G HBM3e", 989),
    ("NVIDIA B200", 2250),
    ("NVIDIA GB200", 2500),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-SXM4-40GB", 312),
    ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA A10", 125),
    ("NVIDIA A10G", 70),
    ("NVIDIA L4", 121),
    ("NVIDIA L40", 181),
    ("NVIDIA L40S", 362),
    ("NVIDIA GeForce RTX 4090", 165),
    ("NVIDIA RTX A6000", 155),
])
def test_each_device_name_gets_its_own_datasheet_peak(name, tflops):
    assert peak_flops(name) == tflops * T


@pytest.mark.parametrize("name", ["cpu", "", "Tesla T4", "NVIDIA H20", "NVIDIA RTX 6000 Ada Generation",
                                  "NVIDIA L40G", "Some Future GPU"])
def test_a_name_no_key_matches_whole_has_no_peak(name):
    assert peak_flops(name) is None
    assert mfu(1e6, ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4), 16, name) is None


def test_the_lookup_ignores_case_and_separators():
    assert peak_flops("nvidia h100_nvl") == peak_flops("NVIDIA-H100-NVL") == 835 * T


def test_the_peaks_are_dense_figures_in_flops_and_every_key_is_distinct():
    keys = [k for k, _ in PEAK_BF16_FLOPS]
    assert len(set(keys)) == len(keys)
    assert all(50 * T <= v <= 3000 * T for _, v in PEAK_BF16_FLOPS)


def test_the_keys_raylm_plan_names_are_in_the_table():
    """raylm.plan takes its devices' peaks from this table by key."""
    from raylm.plan import DEVICES

    table = dict(PEAK_BF16_FLOPS)
    assert all(key in table for _, key in DEVICES.values())
