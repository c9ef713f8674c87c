"""Review fixes for DPO: the validation split keeps a prompt's pairs on one side, datasets
prepared before are prepared again, and train.loss_chunk_size / train.z_loss are honoured or
refused, never dropped without a word."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import types

import pytest
import torch

from raylm import synthetic as S
from raylm.chat_data import CHAT_ENCODING, dataset_key, encode_file
from raylm.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from raylm.data import FORMAT_VERSION
from raylm.documents import stable_fraction
from raylm.model import build_model
from raylm.objectives import DPOObjective, make_objective, sequence_logprobs
from raylm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


def _encode(tok, records, kind, val_fraction):
    lines = "\n".join(json.dumps(r) for r in records).encode()
    return encode_file({"path": ["d/p.jsonl"], "bytes": [lines]}, tok, kind, {"d/p.jsonl": 0}, val_fraction)


# --------------------------------------------------------------------------- the split


def test_pairs_of_one_prompt_land_on_one_side_of_the_split(tok):
    """Several pairs for one prompt (in either record form) split by the prompt: a pair of a
    trained prompt in validation would measure recall, not preference."""
    prompts = [f"add: {i} + {i}" for i in range(12)]
    records = []
    for p in prompts:
        records += [{"prompt": p, "chosen": "5", "rejected": str(j)} for j in range(6, 14)]
        records.append({"messages": [{"role": "user", "content": p}], "chosen": "5", "rejected": "x"})
    out = _encode(tok, records, "dpo", 0.5)
    assert not any(out["error"])
    sides = {}
    for r, val in zip(records, out["val"].tolist()):
        p = r.get("prompt") or r["messages"][-1]["content"]
        sides.setdefault(p, set()).add(val)
    assert all(len(s) == 1 for s in sides.values()), sides
    assert {next(iter(s)) for s in sides.values()} == {True, False}  # prompts still spread over both


def test_a_multi_turn_prompt_differs_from_its_last_turn_alone(tok):
    """The whole conversation before the answers is the prompt: the same last question after
    other turns is another prompt (it may land on either side), and is hashed as such."""
    from raylm.chat_data import conversation, split_text

    short = {"prompt": "q", "chosen": "a", "rejected": "b"}
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    texts = [split_text(conversation(r, "dpo", "w"), "dpo") for r in (short, long)]
    assert texts[0] != texts[1]
    other_answers = dict(short, chosen="c", rejected="d", source="elsewhere")
    assert split_text(conversation(other_answers, "dpo", "w"), "dpo") == texts[0]


def test_sft_split_is_by_the_conversation_alone(tok):
    """SFT splits by the messages trained on, not the whole record: by the whole record, one
    conversation with another id or source landed on both sides, and validation scored text
    that trained (tests/unit/test_chat_records_cleaning.py)."""
    from raylm.chat_data import conversation, split_text

    records = [{"prompt": f"add: {i} + 1", "completion": str(i + 1), "id": i} for i in range(30)]
    out = _encode(tok, records, "sft", 0.5)
    want = [stable_fraction(split_text(conversation(r, "sft", "w"), "sft")) < 0.5 for r in records]
    assert out["val"].tolist() == want


# --------------------------------------------------------------------------- the key


def _key_before(kind, files, cfg, tokenizer_sha, seed):
    """dataset_key as it was before the DPO rows changed."""
    blob = json.dumps({"kind": kind, "sources": [[f.uri, f.size, f.etag_or_mtime] for f in files],
                       "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction, "tokenizer": tokenizer_sha,
                       "seed": seed, "version": FORMAT_VERSION, "chat_encoding": CHAT_ENCODING}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def test_dpo_datasets_prepared_before_are_prepared_again():
    """The DPO split and the refusal of identical pairs change a DPO dataset's rows, so its key
    changes. (SFT rows changed later, split by conversation: tests/unit/test_chat_records_cleaning.py.)"""
    files = [types.SimpleNamespace(uri="/d/pairs.jsonl", size=10, etag_or_mtime="1")]
    cfg = DataConfig(path="/d/pairs.jsonl")
    assert dataset_key("dpo", files, cfg, "t" * 64, 0) != _key_before("dpo", files, cfg, "t" * 64, 0)


# --------------------------------------------------------------------------- chunked log-probs

VOCAB = 64


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model(request, one_thread):
    return build_model(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, max_seq_len=64,
                                   tie_embeddings=request.param), seed=0)


def _dpo_batch(B=3, T=10, vocab=VOCAB):
    """B pairs of T tokens sharing a 4-token prompt, responses of uneven lengths (masks)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (B, 4), generator=g)
    chosen = torch.cat([prompt, torch.randint(0, vocab, (B, T - 4), generator=g)], 1)
    rejected = torch.cat([prompt, torch.randint(0, vocab, (B, T - 4), generator=g)], 1)
    cm, rm = torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        cm[b, 4:T - b % 2] = True
        rm[b, 4:T - (b + 1) % 3] = True
    return {"chosen": chosen, "chosen_mask": cm, "rejected": rejected, "rejected_mask": rm}


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_sequence_logprobs_equal_the_full_logits_ones(model, chunk_size):
    batch = _dpo_batch()
    with torch.no_grad():
        want = sequence_logprobs(model, batch["chosen"], batch["chosen_mask"])
        got = sequence_logprobs(model, batch["chosen"], batch["chosen_mask"], chunk_size)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("chunk_size", [5, 1000])
def test_chunked_dpo_loss_and_gradients_equal_the_unchunked_ones(model, chunk_size):
    batch = _dpo_batch()
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # a policy away from the reference: Δ != 0
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    results = []
    for size in (0, chunk_size):
        model.zero_grad(set_to_none=True)
        loss = DPOObjective(reference=reference, chunk_size=size).loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert float(l0) != pytest.approx(3 * 0.6931, abs=1e-4)  # not the policy-equals-reference case
    torch.testing.assert_close(l1, l0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)


def _dpo_cfg(**train):
    return Config(stage="dpo", init_from="/nowhere/parent", train=TrainConfig(**train))


def test_make_objective_gives_dpo_the_loss_chunk_size():
    obj = make_objective(_dpo_cfg(loss_chunk_size=256), {"eos_id": 1, "pad_id": 0})
    assert obj.chunk_size == 256
    assert make_objective(_dpo_cfg(loss_chunk_size=0), {"eos_id": 1, "pad_id": 0}).chunk_size == 0


def test_z_loss_with_dpo_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match=r"^train\.z_loss=0\.0001: DPO"):
        make_objective(_dpo_cfg(z_loss=1e-4), {"eos_id": 1, "pad_id": 0})
    # SFT and pre-training use it; "auto" chunking is never refused.
    sft = dataclasses.replace(_dpo_cfg(z_loss=1e-4), stage="sft")
    assert make_objective(sft, {"eos_id": 1, "pad_id": 0}).z_loss == 1e-4
    make_objective(_dpo_cfg(loss_chunk_size="auto").for_device("cpu"), {"eos_id": 1, "pad_id": 0})


def test_posttrain_refuses_z_loss_with_dpo_before_any_work(tmp_path):
    from raylm.posttrain import posttrain

    cfg = dataclasses.replace(_dpo_cfg(z_loss=1e-4), storage=str(tmp_path / "runs"),
                              init_from=str(tmp_path / "no-such-parent"))
    with pytest.raises(ConfigError, match=r"^train\.z_loss=0\.0001: DPO"):
        posttrain(cfg)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- prepare_chat's split errors


class _LocalDataset:
    """What prepare_chat asks of Ray Data (read_binary_files -> map_batches -> iter_batches),
    run in this process, one file a batch, as batch_size=1 gives."""

    def __init__(self, batches):
        self.batches = batches

    def map_batches(self, fn, batch_size=None, fn_kwargs=None):
        return _LocalDataset([fn(b, **(fn_kwargs or {})) for b in self.batches])

    def iter_batches(self, batch_format="numpy", batch_size=None):
        return iter(self.batches)


@pytest.fixture
def local_ray_data(monkeypatch):
    import numpy as np
    import ray.data

    def read_binary_files(paths, filesystem=None, include_paths=True, override_num_blocks=None):
        return _LocalDataset([{"bytes": np.array([open(p, "rb").read()], dtype=object),
                               "path": np.array([p], dtype=object)} for p in paths])

    monkeypatch.setattr(ray.data, "read_binary_files", read_binary_files)


def _prepare_one_prompt(tmp_path, tok, val_fraction):
    from raylm.chat_data import prepare_chat

    records = tmp_path / "pairs.jsonl"
    records.write_text("\n".join(json.dumps({"prompt": "add: 2 + 3", "chosen": "5", "rejected": str(j)})
                                 for j in range(6, 12)) + "\n")
    cfg = DataConfig(path=str(records), val_fraction=val_fraction, seq_len=64)
    return prepare_chat("dpo", cfg, tok, str(tmp_path / "data"), 0, log=lambda *a: None)


def test_all_pairs_in_validation_is_named_as_an_empty_training_split(tmp_path, tok, local_ray_data):
    """Splitting by prompt, a few prompts may all fall on one side: that is said as it is, not
    as 'no usable records' (every record was usable)."""
    from raylm.data import DataError

    # A fraction just above the prompt's hash: every pair of it goes to validation.
    fraction = stable_fraction(json.dumps([{"role": "user", "content": "add: 2 + 3"}], sort_keys=True)) + 1e-6
    with pytest.raises(DataError, match=r"training split is empty: all 6 usable records .* lower "
                                        r"data\.val_fraction"):
        _prepare_one_prompt(tmp_path, tok, min(fraction, 0.999999))


def test_prompt_split_prepares_rows_end_to_end(tmp_path, tok, local_ray_data):
    from raylm.chat_data import prepare_chat

    lines = [{"prompt": f"add: {i} + {i}", "chosen": str(2 * i), "rejected": f"-{j}"}
             for i in range(20) for j in range(3)]
    records = tmp_path / "pairs.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    cfg = DataConfig(path=str(records), val_fraction=0.3, seq_len=64)
    manifest = prepare_chat("dpo", cfg, tok, str(tmp_path / "data"), 0, log=lambda *a: None)
    n_val = manifest["stats"]["val_records"]
    assert n_val % 3 == 0 and 0 < n_val < 60  # whole prompts (3 pairs each) on each side
    assert manifest["train"]["blocks"] + manifest["val"]["blocks"] == 60


def test_chunked_logprobs_of_sequences_with_nothing_masked(model):
    """Zero for such a sequence, as the full-logits path gives; with no masked position at all
    backward still runs and reaches the head (under FSDP every rank's backward must)."""
    batch = _dpo_batch()
    mask = batch["chosen_mask"].clone()
    mask[1] = False
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(model, batch["chosen"], mask, 4),
                                   sequence_logprobs(model, batch["chosen"], mask))
    none = torch.zeros_like(mask)
    out = sequence_logprobs(model, batch["chosen"], none, 4)
    assert out.tolist() == [0.0, 0.0, 0.0]
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_chunked_logprobs_keep_no_logits_for_backward(model, chunk_size):
    """What the chunked path is for: between forward and backward no tensor over the
    vocabulary is kept (the full-logits path keeps (B, T, V) ones)."""
    batch = _dpo_batch()
    kept = []

    def pack(t):
        kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sequence_logprobs(model, batch["chosen"], batch["chosen_mask"], chunk_size).sum().backward()
    head = (32, VOCAB)  # the head's weight, transposed: kept by the matmul, not an activation
    over_vocab = [s for s in kept if s and s[-1] == VOCAB and s != head and math.prod(s)]
    assert (over_vocab == []) == (chunk_size > 0), over_vocab


def test_z_loss_with_dpo_is_refused_at_load():
    """Config.validate refuses it as the config loads (a recipe's dpo stage is checked by
    `raylm run --check`, before pre-training and SFT have run); SFT keeps it."""
    from raylm.config import load_config

    with pytest.raises(ConfigError, match=r"^train\.z_loss=0\.0001: DPO does not apply it"):
        load_config(overrides=["stage=dpo", "init_from=runs/x", "train.z_loss=1e-4"])
    assert load_config(overrides=["stage=sft", "train.z_loss=1e-4"]).train.z_loss == 1e-4
