"""Document masking: packed rows `A EOS B EOS C EOS` without cross-talk between documents.

The central property: a document's logits (and its loss's gradients) are the same packed
beside others as alone in a row, at fp32 tolerance. That needs both halves of the feature
(attention stays inside the document, RoPE positions restart at its first token); the tests
below fail when either is dropped, and the unmasked packed row is shown to differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from raylm.config import ModelConfig
from raylm.model import apply_rope, build_model, document_mask, document_positions

from tests.weights import redraw_at_unit_scale

VOCAB, EOS = 128, 1
CFG = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                  ffn_multiple_of=16, tie_embeddings=False)
LENS = {"A": 7, "B": 11, "C": 5}


def _model(cfg: ModelConfig = CFG, seed: int = 0):
    """Weights redrawn at unit scale: raylm's init (std 0.02) makes attention nearly uniform,
    which would shrink any cross-talk towards the tolerance."""
    model = build_model(cfg, seed=seed)
    return redraw_at_unit_scale(model, seed=seed + 1)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def docs():
    """A, B, C: token lists without EOS inside."""
    g = torch.Generator().manual_seed(7)
    return {name: torch.randint(EOS + 1, VOCAB, (n,), generator=g).tolist() for name, n in LENS.items()}


def _pack(docs, order, eos_last=True):
    """(row, {name: (offset, length incl. its EOS)}) for docs packed in `order`."""
    row, spans = [], {}
    for i, name in enumerate(order):
        spans[name] = (len(row), len(docs[name]) + 1)
        row += docs[name] + ([EOS] if eos_last or i < len(order) - 1 else [])
    return row, spans


def _alone(model, doc):
    """Logits of `doc EOS` as the only sequence of a row, on the plain causal path."""
    return model(torch.tensor([doc + [EOS]]))[0][0]


# --------------------------------------------------------------------------- ids and positions


def test_document_positions_hand_written():
    tokens = torch.tensor([
        [5, 6, EOS, 7, 8, EOS, 9],          # starts mid-document, ends without EOS
        [EOS, EOS, 5, EOS, EOS, 6, 7],      # consecutive EOS: one-token documents
        [3, 3, 3, 3, 3, 3, 3],              # no separator at all: one document
        [4, 5, 6, 7, 8, 9, EOS],            # one document ending exactly at the row's end
    ])
    doc_ids, positions = document_positions(tokens, EOS)
    assert doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 2],
                                [0, 1, 2, 2, 3, 4, 4],
                                [0, 0, 0, 0, 0, 0, 0],
                                [0, 0, 0, 0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0],
                                  [0, 0, 0, 1, 0, 0, 1],
                                  [0, 1, 2, 3, 4, 5, 6],
                                  [0, 1, 2, 3, 4, 5, 6]]
    assert doc_ids.dtype == positions.dtype == torch.long


def test_document_mask_is_block_causal():
    doc_ids, _ = document_positions(torch.tensor([[5, EOS, 6, 7, EOS, EOS, 8]]), EOS)
    mask = document_mask(doc_ids)
    assert mask.shape == (1, 1, 7, 7) and mask.dtype == torch.bool
    d = doc_ids[0].tolist()
    expected = [[d[q] == d[k] and k <= q for k in range(7)] for q in range(7)]
    assert mask[0, 0].tolist() == expected


# --------------------------------------------------------------------------- packed == alone


def test_packed_document_logits_equal_alone(model, docs):
    row, spans = _pack(docs, "ABC")
    with torch.no_grad():
        packed = model(torch.tensor([row]), doc_sep=EOS)[0][0]
        for name, (off, n) in spans.items():
            torch.testing.assert_close(packed[off:off + n], _alone(model, docs[name]), msg=name)


def test_batch_of_rows_packed_differently(model, docs):
    """Row 0 `A B C`, row 1 `EOS C A B`: a one-token document first (so both rows have the
    same length) and the last document cut (no final EOS). Every document matches its lone
    forward."""
    row0, spans0 = _pack(docs, "ABC")
    row1, spans1 = _pack(docs, "CAB", eos_last=False)
    row1 = [EOS] + row1  # a one-token document first; shifts the others by one
    spans1 = {k: (off + 1, n) for k, (off, n) in spans1.items()}
    assert len(row0) == len(row1)
    with torch.no_grad():
        packed = model(torch.tensor([row0, row1]), doc_sep=EOS)[0]
        for r, spans in ((0, spans0), (1, spans1)):
            for name, (off, n) in spans.items():
                alone = _alone(model, docs[name])
                n = min(n, len(row0) - off)  # row 1's B has no EOS in the row
                torch.testing.assert_close(packed[r, off:off + n], alone[:n], msg=f"row {r} {name}")


def test_rope_positions_restart_per_document(model, docs):
    """What the blocks are given: each token's rotation is that of its position inside its
    document. (The logits tests cannot see this: under a block-causal mask, RoPE scores
    depend on relative positions only, so a per-document offset changes them by rounding.)"""
    row, spans = _pack(docs, "ABC")
    seen = {}
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: seen.update(cos=args[1], sin=args[2]))
    try:
        with torch.no_grad():
            model(torch.tensor([row]), doc_sep=EOS)
    finally:
        hook.remove()
    expected = torch.cat([torch.arange(n) for _, n in sorted(spans.values())])
    assert seen["cos"].shape == (1, len(row), CFG.head_dim // 2)
    assert torch.equal(seen["cos"][0], model.rope_cos[expected])
    assert torch.equal(seen["sin"][0], model.rope_sin[expected])


def test_without_the_switch_packed_logits_differ(model, docs):
    """The same comparison fails on the plain causal path: the test above can fail."""
    row, spans = _pack(docs, "ABC")
    off, n = spans["B"]
    with torch.no_grad():
        packed = model(torch.tensor([row]))[0][0]
        diff = (packed[off:off + n] - _alone(model, docs["B"])).abs().max()
    assert diff > 0.1, diff


def test_gradients_packed_equal_alone(docs):
    """The loss over B's next-token predictions (B's tokens, then its EOS) gives the same
    parameter gradients packed as alone: nothing from A or C leaks into them either way."""
    b = docs["B"]
    targets_b = b[1:] + [EOS]  # position i predicts token i+1; B's EOS would predict C: not counted
    grads = []
    for packed in (False, True):
        model = _model()
        if packed:
            row, spans = _pack(docs, "ABC")
            off = spans["B"][0]
            targets = [-100] * len(row)
            targets[off:off + len(b)] = targets_b
            _, loss = model(torch.tensor([row]), torch.tensor([targets]), doc_sep=EOS)
        else:
            _, loss = model(torch.tensor([b + [EOS]]), torch.tensor([targets_b + [-100]]))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    alone, packed = grads
    for name in alone:
        assert alone[name].abs().max() > 0 or name == "tok_embeddings.weight", name
        torch.testing.assert_close(packed[name], alone[name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- default path and kernels


def test_without_separators_doc_masking_equals_the_causal_path(model):
    """A row without separators is one document: the gathered RoPE + boolean mask path
    computes what the default (sliced RoPE, is_causal) path computes."""
    tokens = torch.randint(EOS + 1, VOCAB, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(tokens)[0]
        torch.testing.assert_close(model(tokens, doc_sep=EOS)[0], plain)
        assert torch.equal(model(tokens, doc_sep=None)[0], plain)


def test_per_token_rope_tables_equal_sliced_tables(model):
    q = torch.randn(2, 4, 10, CFG.head_dim, generator=torch.Generator().manual_seed(4))
    pos = torch.arange(10).expand(2, 10)
    sliced = apply_rope(q, model.rope_cos[:10], model.rope_sin[:10])
    assert torch.equal(apply_rope(q, model.rope_cos[pos], model.rope_sin[pos]), sliced)


def test_gqa_equals_mha_with_repeated_kv_heads_under_document_masking(model, docs):
    assert CFG.kv_heads < CFG.n_heads
    mha_cfg = replace(CFG, n_kv_heads=None)
    mha = build_model(mha_cfg, seed=0)
    group, hd = CFG.n_heads // CFG.kv_heads, CFG.head_dim
    state = {}
    for name, w in model.state_dict().items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            w = w.view(CFG.kv_heads, hd, CFG.dim).repeat_interleave(group, dim=0).reshape(-1, CFG.dim)
        state[name] = w
    mha.load_state_dict(state)
    tokens = torch.tensor([_pack(docs, "ABC")[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, doc_sep=EOS)[0], mha(tokens, doc_sep=EOS)[0])


def test_activation_checkpointing_keeps_document_masking(docs):
    """The mask reaches the blocks as a keyword through checkpoint wrappers (raylm.parallel)."""
    from raylm.parallel import apply_activation_checkpointing

    tokens = torch.tensor([_pack(docs, "ABC")[0]])
    grads = []
    for wrap in (False, True):
        model = _model()
        if wrap:
            apply_activation_checkpointing(model)
        _, loss = model(tokens[:, :-1], tokens[:, 1:], doc_sep=EOS)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_flex_kernel_forward_matches_sdpa(model, docs):
    """The FlexAttention variant (the benchmark's candidate for GPUs) builds the same mask.
    Forward only, eager: FlexAttention has no CPU backward and is fused only when compiled."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    row, _ = _pack(docs, "ABC")
    tokens = torch.tensor([row, row[::-1]])
    with torch.no_grad():
        sdpa = model(tokens, doc_sep=EOS)[0]
        model.doc_mask_kernel = "flex"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "called without torch.compile"
                flex = model(tokens, doc_sep=EOS)[0]
        finally:
            del model.doc_mask_kernel
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_document_masking_rejects_caches_and_long_rows(model):
    tokens = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="doc_sep"):
        model(tokens, caches=model.make_caches(1), doc_sep=EOS)
    with pytest.raises(ValueError, match="doc_sep"):
        model.hidden_states(tokens, start=4, doc_sep=EOS)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, VOCAB, (1, CFG.max_seq_len + 1)), doc_sep=EOS)


def test_benchmark_runs_on_cpu():
    """benchmarks/attention_mask.py end to end at a tiny size (no timing asserted)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "attention_mask.py"), "--seq-lens", "32",
                           "--batch", "2", "--steps", "1", "--warmup", "0", "--mean-doc-len", "8"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    (row,) = out["results"]
    assert row["causal"]["step_ms_median"] > 0 and row["sdpa_mask"]["step_ms_median"] > 0
    assert row["docs_per_row"] > 1
    assert "flex" in row or "flex" in out["skipped"]
