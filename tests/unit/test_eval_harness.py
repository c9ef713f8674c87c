"""The `raylm` lm-eval model: registration beside lm-eval's own models, argument handling,
and the three request kinds against raylm's own scoring (no Ray: workers=0)."""

import importlib.metadata as md

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model, model_registry  # noqa: E402

from raylm.eval.harness import RayLM  # noqa: E402
from raylm.eval.loglik import encode_pair  # noqa: E402


def test_registered_without_hiding_lm_evals_models():
    assert get_model("raylm") is RayLM
    assert "hf" in model_registry and "dummy" in model_registry  # importing raylm's model first broke these once
    eps = [e for e in md.entry_points(group="lm_eval.models") if e.name == "raylm"]
    if eps:  # present once raylm is (re)installed with this pyproject
        assert eps[0].value == "raylm.eval.harness:RayLM"


def test_requests_match_raylm_scoring(tiny_run, one_thread):
    # lm-eval's CLI passes device="cuda" and batch_size to every model; on a CPU-only machine
    # raylm falls back to the CPU.
    lm = RayLM.create_from_arg_string(f"path={tiny_run},workers=0", {"batch_size": 8, "device": "cuda"})
    tok = lm.runner.tok
    reqs = [Instance("loglikelihood", {}, ("The cat sat on the", " mat"), 0),
            Instance("loglikelihood", {}, ("The cat sat on the", " moon"), 1)]
    got = lm.loglikelihood(reqs)
    assert got == lm.runner.loglikelihood([encode_pair(tok, *r.args) for r in reqs])
    text = "The cat sat on the mat. " * 12
    rolling, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = tok.encode(text)
    assert len(ids) > lm.runner.max_seq_len  # several windows
    # The windows cover every token exactly once: their continuations concatenate to the text.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.eos_id, lm.runner.max_seq_len, 1)]
    assert [t for _, c in windows for t in c] == ids
    assert rolling == pytest.approx(sum(lp for lp, _ in lm.runner.loglikelihood(windows)))
    out, = lm.generate_until([Instance("generate_until", {}, ("The cat", {"until": ["."], "max_gen_toks": 10}), 0)])
    assert isinstance(out, str) and "." not in out
    with pytest.raises(ValueError, match="path="):
        RayLM()


class FailingRunner:
    """A scoring pool that fails the moment lm-eval asks it anything."""

    class tok:
        sha256, eos_id = "0" * 64, 0

        @staticmethod
        def encode(text):
            return [1] * len(text)

    def loglikelihood(self, pairs):
        raise ValueError("scoring failed")


def _task_yaml(d, name, dataset_path, **kw):
    import yaml

    spec = {"task": name, "dataset_path": dataset_path, "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
            "metric_list": [{"metric": "acc"}], **kw}
    (d / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def test_a_dataset_that_cannot_be_fetched_is_a_user_error(tmp_path, monkeypatch):
    # No network and no cached copy: datasets' ConnectionError used to escape as a traceback.
    # Offline mode makes the Hub unreachable here whatever the machine's network or cache.
    import datasets.config
    import huggingface_hub.constants

    from raylm.errors import UserError
    from raylm.eval.run import harness_rows

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # leave the user's alone
    _task_yaml(tmp_path, "raylm_t_hub", "raylm-tests/not-in-any-cache")
    with pytest.raises(UserError, match=r"^lm-eval task\(s\) raylm_t_hub: cannot fetch the dataset \(.*"
                                        r"raylm-tests/not-in-any-cache.*\); connect to .*HF_DATASETS_OFFLINE=1$") as e:
        harness_rows(FailingRunner(), "run", ["raylm_t_hub"], {}, include_path=str(tmp_path))
    assert "\n" not in str(e.value) and isinstance(e.value.__cause__, ConnectionError)

    # Only fetching: a failure once the dataset is there (here, scoring) keeps its own type.
    (tmp_path / "mc.jsonl").write_text('{"context": "x", "choices": [" a", " b"], "gold": 0}\n')
    _task_yaml(tmp_path, "raylm_t_local", "json", dataset_kwargs={"data_files": {"test": str(tmp_path / "mc.jsonl")}})
    with pytest.raises(ValueError, match="scoring failed"):
        harness_rows(FailingRunner(), "run", ["raylm_t_local"], {}, include_path=str(tmp_path))
