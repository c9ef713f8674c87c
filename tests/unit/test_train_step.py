"""One optimizer step (single process, fp32), the numerics guard, the optimizer groups, the data
position (RankBatches) and validation batches."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from raylm.config import ModelConfig, TrainConfig
from raylm.model import RMSNorm, build_model
from raylm.batches import RankBatches, rank_val_batches
from raylm.train import NextTokenObjective, evaluate, make_optimizer, train_step

CPU = torch.device("cpu")
VOCAB = 64
CFG = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                  ffn_multiple_of=16)
TC = TrainConfig(lr=1e-3, weight_decay=0.1, micro_batch_size=4, global_batch_size=8)


@pytest.fixture(autouse=True)
def _no_process_group():
    assert not dist.is_initialized()  # these tests cover the single-process path


def _tokens(B=8, T=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


def _snapshot(model, opt):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict())
    return params, state


def _state_tensors(state_dict):
    for idx, st in sorted(state_dict["state"].items()):
        for name, t in sorted(st.items()):
            if torch.is_tensor(t):
                yield f"{idx}.{name}", t


# --------------------------------------------------------------------------- train_step


def test_steps_on_repeating_pattern_reduce_loss():
    torch.manual_seed(0)
    model = build_model(CFG, seed=0)
    opt = make_optimizer(model, replace(TC, weight_decay=0.0), CPU)
    pattern = torch.arange(17) % 6 + 3
    batch = [{"tokens": pattern.repeat(4, 1)}]
    losses = [train_step(model, opt, batch, NextTokenObjective(), 1e-2, 1.0).loss for _ in range(10)]
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=0.5)
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


def test_step_stats():
    model = build_model(CFG, seed=0)
    opt = make_optimizer(model, TC, CPU)
    tokens = _tokens(4, 9)
    with torch.no_grad():
        expected = model(tokens[:, :-1], tokens[:, 1:])[1].item()
    stats = train_step(model, opt, [{"tokens": tokens}], NextTokenObjective(), 1e-3, 1.0)
    assert not stats.skipped
    assert stats.count == 4 * 8
    assert stats.loss == pytest.approx(expected, rel=1e-6)
    assert stats.grad_norm > 0
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    assert all(p.grad is None for p in model.parameters())  # gradients cleared for the next step


def _run_split(n_micro: int, opt_factory, grad_clip: float, steps: int = 2, lr: float = 1e-3):
    model = build_model(CFG, seed=0)
    opt = opt_factory(model)
    tokens = _tokens(8, 17, seed=1)
    stats = []
    for _ in range(steps):
        mbs = [{"tokens": c} for c in tokens.chunk(n_micro)]
        stats.append(train_step(model, opt, mbs, NextTokenObjective(), lr, grad_clip))
    return model, stats


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_gradient_accumulation_equivalence(opt_name):
    # SGD without clipping exposes the gradient itself, scale included (train_step sets the lr).
    # AdamW with clipping is the real path; Adam normalises per element, so elements whose
    # gradient is ~0 amplify fp32 summation-order noise to ~1e-6 (updates are ~1e-3 per step).
    factory = {"sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
               "adamw": lambda m: make_optimizer(m, TC, CPU)}[opt_name]
    clip, lr, atol = {"sgd": (0.0, 0.1, 1e-6), "adamw": (1.0, 1e-3, 5e-6)}[opt_name]
    one, s1 = _run_split(1, factory, clip, lr=lr)
    two, s2 = _run_split(2, factory, clip, lr=lr)
    init = build_model(CFG, seed=0)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    moved = max((a - p0).abs().max().item() for a, p0 in zip(one.parameters(), init.parameters()))
    assert moved > 100 * atol  # the comparison is not vacuous
    for a, b in zip(s1, s2):
        assert a.count == b.count == 8 * 16
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)


def test_uneven_micro_batches_weight_by_tokens():
    """Masked targets make micro-batches count differently; the step is the mean over all tokens."""
    tokens = _tokens(4, 9, seed=2)
    targets = tokens[:, 1:].clone()
    targets[:2, :6] = -100
    batch = {"tokens": tokens[:, :-1], "targets": targets}
    split = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    results = []
    for mbs in ([batch], split):
        model = build_model(CFG, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        stats = train_step(model, opt, mbs, NextTokenObjective(), 1e-2, 0.0)
        results.append((stats, model))
    (sa, ma), (sb, mb) = results
    assert sa.count == sb.count == 2 * 2 + 2 * 8
    assert sa.loss == pytest.approx(sb.loss, rel=1e-6)
    for a, b in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class _NaNObjective(NextTokenObjective):
    def loss_sum(self, model, batch):
        return super().loss_sum(model, batch) * float("nan")


def _assert_untouched(model, opt, snapshot):
    params, state = snapshot
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    now = dict(_state_tensors(opt.state_dict()))
    before = dict(_state_tensors(state))
    assert now.keys() == before.keys() and before
    for k in before:
        assert torch.equal(now[k], before[k]), k


def test_nonfinite_loss_skips_step_and_leaves_everything_unchanged():
    model = build_model(CFG, seed=0)
    opt = make_optimizer(model, TC, CPU)
    batch = [{"tokens": _tokens(4, 9, seed=3)}]
    assert not train_step(model, opt, batch, NextTokenObjective(), 1e-3, 1.0).skipped  # state exists now
    snap = _snapshot(model, opt)
    stats = train_step(model, opt, batch + batch, _NaNObjective(), 1e-3, 1.0)
    assert stats.skipped
    assert stats.loss != stats.loss  # NaN is reported
    _assert_untouched(model, opt, snap)
    assert all(p.grad is None for p in model.parameters())  # no NaN gradient leaks into the next step
    after = train_step(model, opt, batch, NextTokenObjective(), 1e-3, 1.0)
    assert not after.skipped
    assert not torch.equal(model.tok_embeddings.weight, snap[0]["tok_embeddings.weight"])


def test_nonfinite_gradient_with_finite_loss_skips_step():
    model = build_model(CFG, seed=0)
    opt = make_optimizer(model, TC, CPU)
    batch = [{"tokens": _tokens(4, 9, seed=4)}]
    train_step(model, opt, batch, NextTokenObjective(), 1e-3, 1.0)
    snap = _snapshot(model, opt)
    handle = model.layers[0].attention.wq.weight.register_hook(lambda g: g * float("inf"))
    try:
        stats = train_step(model, opt, batch, NextTokenObjective(), 1e-3, 1.0)
    finally:
        handle.remove()
    assert stats.skipped and stats.loss == stats.loss  # finite loss, non-finite gradient
    _assert_untouched(model, opt, snap)


def test_nonfinite_first_step_creates_no_optimizer_state():
    model = build_model(CFG, seed=0)
    opt = make_optimizer(model, TC, CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_step(model, opt, [{"tokens": _tokens(2, 9)}], _NaNObjective(), 1e-3, 1.0)
    assert stats.skipped
    assert opt.state_dict()["state"] == {}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_z_loss_increases_loss():
    model = build_model(CFG, seed=0)
    batch = {"tokens": _tokens(4, 9, seed=5)}
    with torch.no_grad():
        plain = NextTokenObjective(0.0).loss_sum(model, batch)
        z = NextTokenObjective(1e-2).loss_sum(model, batch)
        logits, _ = model(batch["tokens"][:, :-1])
        lse = torch.logsumexp(logits.float().flatten(0, 1), dim=-1)
    assert z > plain
    torch.testing.assert_close(z - plain, 1e-2 * lse.square().sum(), rtol=1e-4, atol=1e-5)
    # And through train_step (lr 0, so both runs see the same weights).
    stats = [train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [batch], NextTokenObjective(zl),
                        0.0, 1.0).loss for zl in (0.0, 1e-2)]
    assert stats[1] > stats[0]


def test_objective_count_and_targets():
    tokens = _tokens(3, 9)
    obj = NextTokenObjective()
    assert obj.count({"tokens": tokens}) == 3 * 8
    targets = tokens.clone()
    targets[0] = -100
    assert obj.count({"tokens": tokens, "targets": targets}) == 2 * 9


def test_evaluate_is_token_weighted_mean():
    model = build_model(CFG, seed=0)
    batches = [{"tokens": _tokens(2, 9, seed=6)}, {"tokens": _tokens(3, 5, seed=7)}]
    loss, n = evaluate(model, NextTokenObjective(), batches)
    assert n == 2 * 8 + 3 * 4
    with torch.no_grad():
        sums = [model(b["tokens"][:, :-1], b["tokens"][:, 1:])[1] * b["tokens"][:, 1:].numel() for b in batches]
    assert loss == pytest.approx((sum(sums) / n).item(), rel=1e-5)


# --------------------------------------------------------------------------- optimizer


def test_make_optimizer_groups():
    model = build_model(replace(CFG, qk_norm=True, tie_embeddings=False), seed=0)
    opt = make_optimizer(model, TC, CPU)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == TC.weight_decay and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    names = {id(p): n for n, p in model.named_parameters()}
    assert ids(decay) | ids(no_decay) == set(names) and not ids(decay) & ids(no_decay)
    assert all(p.ndim >= 2 for p in decay["params"])
    norm_ids = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    assert ids(no_decay) == norm_ids
    assert id(model.tok_embeddings.weight) in ids(decay) and id(model.output.weight) in ids(decay)
    assert id(model.layers[0].attention.q_norm.weight) in ids(no_decay)
    assert opt.defaults["betas"] == (TC.beta1, TC.beta2) and opt.defaults["lr"] == TC.lr


# --------------------------------------------------------------------------- RankBatches


N_BLOCKS, G = 40, 8  # 5 steps per epoch


def _blocks():
    # Row i holds the value i everywhere, so a row's identity is its first token.
    return torch.arange(N_BLOCKS, dtype=torch.int32)[:, None].expand(N_BLOCKS, 5).contiguous()


def _stream_factory(calls=None):
    blocks = _blocks()

    def stream(epoch):
        if calls is not None:
            calls.append(epoch)
        # A different (seeded) order per epoch, as a shuffled dataset would give.
        order = torch.randperm(N_BLOCKS, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, N_BLOCKS - G + 1, G):
            yield {"tokens": blocks[order[i:i + G]]}

    return stream


def _rows(micro_batches) -> list[int]:
    return [int(r) for mb in micro_batches for r in mb["tokens"][:, 0]]


def _global_batches(n_steps, world=2, micro=2, consumed=0, blocks_per_epoch=N_BLOCKS):
    """n_steps global batches, each the rows of all ranks (rank-major within each micro-step)."""
    its = [iter(RankBatches(_stream_factory(), G, micro, r, world, blocks_per_epoch, consumed, CPU))
           for r in range(world)]
    out = []
    for _ in range(n_steps):
        per_rank = [next(it) for it in its]
        out.append([row for r in range(world) for row in _rows(per_rank[r])])
    return out


def test_rank_union_is_the_global_batch():
    stream = _stream_factory()
    expected = [b["tokens"][:, 0].tolist() for b in stream(0)]
    r0 = RankBatches(_stream_factory(), G, 2, 0, 2, N_BLOCKS, 0, CPU)
    r1 = RankBatches(_stream_factory(), G, 2, 1, 2, N_BLOCKS, 0, CPU)
    for step, (a, b) in enumerate(zip(r0, r1)):
        if step == 3:
            break
        assert len(a) == len(b) == G // (2 * 2)  # grad accumulation steps
        assert all(mb["tokens"].shape == (2, 5) and mb["tokens"].dtype == torch.long for mb in a)
        assert not set(_rows(a)) & set(_rows(b))
        assert sorted(_rows(a) + _rows(b)) == sorted(expected[step])
        assert r0.consumed == r1.consumed == (step + 1) * G


def test_micro_step_layout():
    """Micro-step a of rank r takes rows [(a * world + r) * micro, ...)."""
    batch = next(iter(_stream_factory()(0)))["tokens"][:, 0].tolist()
    r1 = next(iter(RankBatches(_stream_factory(), G, 2, 1, 2, N_BLOCKS, 0, CPU)))
    assert [mb["tokens"][:, 0].tolist() for mb in r1] == [batch[2:4], batch[6:8]]


def test_consumed_advances_by_global_batch():
    rb = RankBatches(_stream_factory(), G, 4, 0, 1, N_BLOCKS, 0, CPU)
    it = iter(rb)
    for step in range(1, 8):
        next(it)
        assert rb.consumed == step * G


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_resume_repeats_uninterrupted_run(k):
    full = _global_batches(10)
    resumed = _global_batches(10 - k, consumed=k * G)
    assert resumed == full[k:]


def test_epochs_wrap():
    calls = []
    rb = RankBatches(_stream_factory(calls), G, 8, 0, 1, N_BLOCKS, 0, CPU)
    it = iter(rb)
    rows, epochs = [], []
    for _ in range(12):
        rows.append(_rows(next(it)))
        epochs.append(rb.epoch)
    assert epochs == [0] * 4 + [1] * 5 + [2] * 3  # read after each step: the 5th step ends epoch 0
    assert calls[:3] == [0, 1, 2]
    assert sorted(r for step in rows[:5] for r in step) == list(range(N_BLOCKS))  # every block once
    assert rows[5] == next(iter(_stream_factory()(1)))["tokens"][:, 0].tolist()  # epoch 1 starts at its start
    assert rows[:5] != rows[5:10]


def test_resume_across_epoch_boundary():
    full = _global_batches(12, world=1, micro=4)
    assert _global_batches(4, world=1, micro=4, consumed=8 * G) == full[8:]


@pytest.mark.parametrize("k", [2, 5, 6])
def test_resume_on_fewer_workers_continues_same_rows(k):
    """A position reached with 2 workers resumes on 1 worker at the same global batch."""
    r0 = RankBatches(_stream_factory(), G, 2, 0, 2, N_BLOCKS, 0, CPU)
    it = iter(r0)
    for _ in range(k):
        next(it)
    uninterrupted = _global_batches(k + 3, world=2, micro=2)
    single = RankBatches(_stream_factory(), G, 2, 0, 1, N_BLOCKS, r0.consumed, CPU)
    it1 = iter(single)
    for step in range(3):
        mbs = next(it1)
        assert len(mbs) == G // 2
        assert sorted(_rows(mbs)) == sorted(uninterrupted[k + step])


def test_too_few_blocks_for_one_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        RankBatches(_stream_factory(), 64, 4, 0, 1, 40, 0, CPU)


def test_global_batch_not_divisible_by_world_is_an_error():
    with pytest.raises(ValueError):
        rb = RankBatches(_stream_factory(), G, 2, 0, 3, N_BLOCKS, 0, CPU)
        next(iter(rb))


# --------------------------------------------------------------------------- validation batches


@pytest.mark.parametrize("n_blocks,world,micro,eval_batches", [
    (100, 2, 4, 3), (10, 3, 4, 8), (7, 7, 2, 5), (33, 4, 16, 8), (50, 1, 8, 100),
])
def test_rank_val_batches_equal_counts_and_disjoint(n_blocks, world, micro, eval_batches):
    """The first eval_batches global batches of rows (or all), each on one rank only, in the same
    number of forward passes on every rank; more in tests/unit/test_val_rows.py."""
    tc = replace(TC, micro_batch_size=micro, eval_batches=eval_batches)
    blocks = torch.arange(n_blocks, dtype=torch.int32)[:, None].expand(n_blocks, 3)
    per_rank = [rank_val_batches({"tokens": blocks}, tc, r, world, CPU) for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1 and next(iter(counts)) >= 1  # same number of forward passes per rank
    assert all(0 < mb["tokens"].shape[0] <= micro for b in per_rank for mb in b)
    rows = [r for b in per_rank for mb in b for r in mb["tokens"][:, 0].tolist()]
    # These splits need no padding pass, so every row a rank holds counts.
    assert sorted(rows) == list(range(min(n_blocks, eval_batches * tc.global_batch_size)))
    assert all(mb["tokens"].dtype == torch.long for b in per_rank for mb in b)


def test_rank_val_batches_fewer_rows_than_workers():
    blocks = torch.arange(3, dtype=torch.int32)[:, None].expand(3, 5)
    per_rank = [rank_val_batches({"tokens": blocks}, TC, r, 4, CPU) for r in range(4)]
    assert [len(b) for b in per_rank] == [1, 1, 1, 1]  # rank 0's pass is padding (test_val_rows.py)
    with pytest.raises(ValueError, match="no rows to evaluate on: raise data.val_fraction"):
        rank_val_batches({"tokens": blocks[:0]}, TC, 0, 4, CPU)


def test_nonfinite_guard_counts_and_stops_naming_the_step():
    from raylm.train import StepStats, _guard_nonfinite

    bad = StepStats(loss=float("nan"), grad_norm=float("nan"), skipped=True, count=1)
    good = StepStats(loss=1.0, grad_norm=1.0, skipped=False, count=1)
    run = 0
    for step in (1, 2, 3):
        run = _guard_nonfinite(bad, step, run, 3, lambda *_: None)
    assert run == 3
    assert _guard_nonfinite(good, 4, run, 3, lambda *_: None) == 0
    with pytest.raises(FloatingPointError, match="step 7: 4 non-finite steps in a row"):
        run = 0
        for step in (4, 5, 6, 7):
            run = _guard_nonfinite(bad, step, run, 3, lambda *_: None)


def test_spike_detector_flags_jumps_after_warmup_and_ignores_spikes_in_its_baseline():
    from raylm.train import SpikeDetector

    d = SpikeDetector(window=10, factor=3.0)
    assert not d.is_spike(100.0)  # too early to judge: the start of training is steep
    d = SpikeDetector(window=10, factor=3.0)
    assert [d.is_spike(x) for x in [2.0] * 5] == [False] * 5
    assert d.is_spike(7.0) and d.is_spike(6.5)  # spikes do not enter the baseline
    assert not d.is_spike(5.9) and not d.is_spike(float("nan"))
    assert not SpikeDetector(window=10, factor=0.0).is_spike(1e9)  # factor 0 disables it


# A raw-text stream (data.mode=stream) does not know its length until its first pass ends.


def test_stream_of_unknown_length_gives_the_same_batches():
    known = _global_batches(12, world=1, micro=4)
    rb = RankBatches(_stream_factory(), G, 4, 0, 1, None, 0, CPU)
    it = iter(rb)
    assert [_rows(next(it)) for _ in range(12)] == known
    assert rb.steps_per_epoch == N_BLOCKS // G and rb.epoch == 2


@pytest.mark.parametrize("k", [2, 5, 8, 11])
def test_unknown_length_resume_continues_with_the_next_unseen_block(k):
    """k=8 and 11 resume past the first epoch, before its length is known."""
    known = _global_batches(14, world=2, micro=2)
    assert _global_batches(14 - k, world=2, micro=2, consumed=k * G, blocks_per_epoch=None) == known[k:]


def test_empty_stream_of_unknown_length_is_an_error():
    rb = RankBatches(lambda epoch: iter(()), G, 4, 0, 1, None, 0, CPU)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        next(iter(rb))


def test_later_epochs_of_an_in_memory_set_are_fresh_permutations():
    from raylm.batches import reshuffled

    # Two columns, as SFT rows have: one permutation moves both.
    batches = [{"tokens": b, "loss_mask": b % 2 == 0} for b in _blocks().split(G)]
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(reshuffled(batches, 7, 0), batches))
    e1, e2 = reshuffled(batches, 7, 1), reshuffled(batches, 7, 2)
    for e in (e1, e2):
        assert [len(b["tokens"]) for b in e] == [G] * len(batches)
        assert sorted(torch.cat([b["tokens"] for b in e])[:, 0].tolist()) == list(range(N_BLOCKS))  # every block once
        assert all(torch.equal(b["loss_mask"], b["tokens"] % 2 == 0) for b in e)  # rows stay aligned
    rows = lambda e: torch.cat([b["tokens"] for b in e])[:, 0].tolist()  # noqa: E731
    assert rows(e1) != rows(batches) and rows(e1) != rows(e2)
    assert rows(reshuffled(batches, 7, 1)) == rows(e1)  # a function of (seed, epoch)
    assert rows(reshuffled(batches, 8, 1)) != rows(e1)


def test_ray_reports_are_paced_to_the_controller_poll():
    """Training rows reach ray.train.report at most once a poll interval (the rest would block
    the step); evaluation rows and checkpoints always go; a checkpoint restarts the interval."""
    from raylm.train_ray import ReportPacer

    now = [0.0]
    pace = ReportPacer(2.0, clock=lambda: now[0])
    sent = []
    for t, row in [(0.0, {"step": 1, "loss": 1.0}), (0.5, {"step": 2, "loss": 0.9}), (1.9, {"step": 3}),
                   (2.1, {"step": 4}), (2.2, {"step": 5, "val_loss": 0.8}), (2.3, {"step": 6, "eval_acc": 0.1}),
                   (3.0, {"step": 7}), (4.4, {"step": 8}), (4.5, {"step": 9})]:
        now[0] = t
        if pace.due(row):
            sent.append(row["step"])
    assert sent == [1, 4, 5, 6, 8]  # 8: 2.1 s after the evaluation row at 2.3
    now[0] = 10.0
    pace.sent()  # a checkpoint report went out
    now[0] = 11.0
    assert not pace.due({"step": 10})
    assert ReportPacer(0.0).due({"step": 1}) and ReportPacer(0.0).due({"step": 2})  # interval 0: every row
