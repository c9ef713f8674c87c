"""`--model raylm` model_args that raylm does not know."""

import pytest

pytest.importorskip("lm_eval")

from raylm.errors import ConfigError  # noqa: E402
from raylm.eval.harness import RayLM  # noqa: E402

CLI_EXTRA = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # what lm-eval's command line adds


@pytest.mark.parametrize("args, named", [("worker=2", "worker"), ("gpus_per_workers=1", "gpus_per_workers"),
                                         ("dtype=bfloat16,max_length=64", "dtype, max_length")])
def test_an_unknown_model_arg_is_refused_naming_it(tiny_run, args, named):
    """A misspelt or foreign model_args key (`worker=2`, lm-eval hf's `dtype=`) was silently
    dropped: the evaluation ran in this process, on the CPU or in float32, unlike what was typed."""
    with pytest.raises(ConfigError, match=rf"^--model_args {named}: not an argument of --model raylm"):
        RayLM.create_from_arg_string(f"path={tiny_run},workers=0,{args}", CLI_EXTRA)


def test_lm_evals_trust_remote_code_and_batch_sizes_are_still_taken(tiny_run, one_thread):
    """lm-eval's --trust_remote_code puts its key into every model's model_args, and its CLI adds
    batch sizes and a device: none of them is the user's mistake."""
    lm = RayLM.create_from_arg_string(f"path={tiny_run},workers=0,trust_remote_code=True", CLI_EXTRA)
    assert lm.runner.max_seq_len > 0
