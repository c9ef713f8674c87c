"""The objectives' math against computations written out here, independent of raylm's own
log-probability code: a packed pre-training block under document masking is the sum over
its documents alone; one step's gradient is the mean over every target token of the global
batch, however unequally the tokens fall over two FSDP2 ranks (not a mean of the ranks'
means); DPO takes sums of response-token log-probabilities and reports its rewards, margin
and accuracy with the right signs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from raylm.config import ModelConfig
from raylm.model import build_model
from raylm.objectives import DPOObjective, NextTokenObjective, SFTObjective
from raylm.train import train_step
from tests.unit.gloo_ranks import gloo_group, run_ranks

CPU = torch.device("cpu")
VOCAB, EOS, PAD = 64, 3, 0
CFG = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _ids(n: int, seed: int) -> list[int]:
    """n ids that are neither EOS nor PAD."""
    return torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- document masking


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_a_packed_block_is_the_sum_over_its_documents_alone(chunk_size):
    """Block `A EOS B EOS C...` (A the tail of a document cut at the block's start, C cut at
    its end): with doc_sep its targets are A's and B's tokens after their first and their EOS,
    and C's after its first, never the first token of the document after an EOS, which nothing
    visible predicts. Loss, count and gradients equal the three documents trained alone."""
    a, b, c = _ids(5, 1), _ids(6, 2), _ids(4, 3)
    block = torch.tensor([a + [EOS] + b + [EOS] + c])  # 17 tokens: 16 inputs, 16 targets
    objective = NextTokenObjective(chunk_size=chunk_size, doc_sep=EOS)
    alone = [torch.tensor([a + [EOS]]), torch.tensor([b + [EOS]]), torch.tensor([c])]

    packed_model, alone_model = build_model(CFG, seed=0), build_model(CFG, seed=0)
    packed = objective.loss_sum(packed_model, {"tokens": block})
    packed.backward()
    want = sum(NextTokenObjective(chunk_size=chunk_size).loss_sum(alone_model, {"tokens": d}) for d in alone)
    want.backward()

    assert objective.count({"tokens": block}) == 5 + 6 + 3 == 16 - 2
    assert NextTokenObjective().count({"tokens": block}) == 16  # without the switch every target counts
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-5)
    for (name, g), w in zip(_grads(packed_model).items(), _grads(alone_model).values()):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- normalisation over ranks


def _sft_rows() -> dict[str, torch.Tensor]:
    """4 SFT rows whose assistant tokens differ widely: rank 0 of 2 gets 13 + 14 targets,
    rank 1 gets 1 + 1, so a mean of the ranks' means would weigh rank 1's two tokens as
    much as rank 0's 27."""
    tokens = torch.randint(4, VOCAB, (4, 17), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(4, 17, dtype=torch.bool)
    mask[0, 3:16] = True
    mask[1, 3:17] = True
    mask[2, 5] = True
    mask[3, 16] = True
    tokens[2, 7], tokens[2, 8:] = EOS, PAD  # a short conversation, then padding
    return {"tokens": tokens, "loss_mask": mask}


def _pretrain_rows() -> dict[str, torch.Tensor]:
    """4 packed blocks; rank 1's hold many EOS, so fewer targets count there."""
    tokens = torch.randint(4, VOCAB, (4, 17), generator=torch.Generator().manual_seed(5))
    tokens[2:, 2:15] = EOS
    return {"tokens": tokens}


CASES = {"sft": (_sft_rows, SFTObjective(doc_sep=EOS, pad_id=PAD)),
         "sft-chunked": (_sft_rows, SFTObjective(chunk_size=4, doc_sep=EOS, pad_id=PAD)),
         "pretrain-doc-mask": (_pretrain_rows, NextTokenObjective(doc_sep=EOS))}


def _one_step(model, micro_batches, objective):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return train_step(model, opt, micro_batches, objective, 1.0, 0.0)


def _rank_main(rank: int, world: int, store_path: str, out_path: str) -> None:
    from raylm.parallel import build_parallel_model, is_sharded

    with gloo_group(rank, world, store_path):
        out = {}
        for name, (rows, objective) in CASES.items():
            model = build_parallel_model(CFG, CPU, "fp32", seed=0)
            assert is_sharded(model)
            mine = {k: v[2 * rank:2 * rank + 2] for k, v in rows().items()}
            # two micro-batches of one row each: accumulation and ranks both take part
            stats = _one_step(model, [{k: v[i:i + 1] for k, v in mine.items()} for i in range(2)], objective)
            weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
            out[name] = (stats.loss, stats.count, weights)
        if rank == 0:
            torch.save(out, out_path)


@pytest.mark.timeout(300)
def test_two_fsdp_ranks_step_on_the_mean_over_every_target_token(tmp_path):
    """Two gloo processes sharding the model, each with 2 micro-batches of rows whose target
    counts differ widely: the step's loss and the updated weights equal one process's step on
    the whole batch at once, the mean over all its target tokens (SFT, plain and chunked, and
    pre-training with document masking)."""
    out = str(tmp_path / "out")
    run_ranks(_rank_main, lambda r: (r, 2, str(tmp_path / "store"), out))
    got = torch.load(out)
    for name, (rows, objective) in CASES.items():
        batch = rows()
        halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
        counts = [objective.count(h) for h in halves]
        assert counts[0] > 2 * counts[1], (name, counts)  # unequal enough to tell the two normalisations apart

        init, model = build_model(CFG, seed=0), build_model(CFG, seed=0)
        with torch.no_grad():
            sums = [float(objective.loss_sum(init, h)) for h in halves]
        stats = _one_step(model, [batch], objective)
        token_mean = sum(sums) / sum(counts)
        mean_of_means = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
        assert stats.loss == pytest.approx(token_mean, rel=1e-6)
        assert abs(token_mean - mean_of_means) > 1e-3, name

        loss, count, weights = got[name]
        assert count == sum(counts) and loss == pytest.approx(token_mean, rel=1e-5), name
        moved = max(float((p - q).abs().max()) for p, q in zip(model.state_dict().values(), init.state_dict().values()))
        assert moved > 1e-2, name
        for k, v in model.state_dict().items():
            torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


# --------------------------------------------------------------------------- DPO


def _dpo_pairs() -> dict[str, torch.Tensor]:
    """3 pairs of a shared prompt; responses of unequal lengths, right-padded."""
    g = torch.Generator().manual_seed(6)
    prompt = torch.randint(4, VOCAB, (3, 3), generator=g)
    chosen = torch.cat([prompt, torch.randint(4, VOCAB, (3, 9), generator=g)], 1)
    rejected = torch.cat([prompt, torch.randint(4, VOCAB, (3, 9), generator=g)], 1)
    cm, rm = torch.zeros(3, 12, dtype=torch.bool), torch.zeros(3, 12, dtype=torch.bool)
    for i, (nc, nr) in enumerate([(5, 9), (1, 6), (9, 1)]):
        cm[i, 3:3 + nc], rm[i, 3:3 + nr] = True, True
        chosen[i, 3 + nc:], rejected[i, 3 + nr:] = PAD, PAD
    return {"chosen": chosen, "chosen_mask": cm, "rejected": rejected, "rejected_mask": rm}


def _response_logp(model, tokens, mask) -> torch.Tensor:
    """Sum over the masked positions t of log softmax(logits of row[:t])[row[t]], row by row."""
    out = []
    for row, m in zip(tokens, mask):
        logits = model(row[None, :-1])[0][0].double()
        picked = torch.log_softmax(logits, -1).gather(-1, row[1:, None]).squeeze(-1)
        out.append(picked[m[1:]].sum())
    return torch.stack(out)


def _policy_and_reference():
    reference = build_model(CFG, seed=0)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return policy, reference


@pytest.mark.parametrize("chunk_size", [0, 3])
@pytest.mark.parametrize("loss,beta,eps", [("sigmoid", 0.3, 0.0), ("sigmoid", 0.3, 0.2), ("ipo", 0.3, 0.0)])
def test_dpo_loss_and_gradient_from_summed_response_logprobs(chunk_size, loss, beta, eps):
    batch = _dpo_pairs()
    policy, reference = _policy_and_reference()
    objective = DPOObjective(beta, loss, eps, reference=reference, chunk_size=chunk_size)
    got_model, want_model = copy.deepcopy(policy), copy.deepcopy(policy)
    got = objective.loss_sum(got_model, batch)
    got.backward()

    with torch.no_grad():
        ref_c = _response_logp(reference, batch["chosen"], batch["chosen_mask"])
        ref_r = _response_logp(reference, batch["rejected"], batch["rejected_mask"])
    delta = ((_response_logp(want_model, batch["chosen"], batch["chosen_mask"]) - ref_c)
             - (_response_logp(want_model, batch["rejected"], batch["rejected_mask"]) - ref_r))
    assert delta.abs().min() > 1e-3
    if loss == "ipo":
        want = (delta - 1 / (2 * beta)).square().sum()
    else:
        want = (-(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)).sum()
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for (name, g), w in zip(_grads(got_model).items(), _grads(want_model).values()):
        w = w.to(g.dtype)  # fp32 round-off grows with the gradient (IPO's reach ~50 here)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()), msg=name)


def test_dpo_metrics_signs():
    """reward_chosen = β(log π(chosen) - log π_ref(chosen)) and likewise for rejected, the
    margin chosen minus rejected, accuracy the share of pairs whose chosen reward is higher."""
    batch = _dpo_pairs()
    policy, reference = _policy_and_reference()
    beta = 0.5
    with torch.no_grad():
        lp = {s: _response_logp(policy, batch[s], batch[f"{s}_mask"]) for s in ("chosen", "rejected")}
        ref = {s: _response_logp(reference, batch[s], batch[f"{s}_mask"]) for s in ("chosen", "rejected")}
        m = DPOObjective(beta, reference=reference).metrics(policy, batch)
    chosen, rejected = beta * (lp["chosen"] - ref["chosen"]), beta * (lp["rejected"] - ref["rejected"])
    wins = (chosen > rejected).double()
    assert 0 < wins.mean() < 1  # both signs among the pairs: a flipped comparison would show
    want = {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(), "preference_accuracy": wins.mean(),
            "logp_chosen": lp["chosen"].mean(), "logp_rejected": lp["rejected"].mean()}
    for k, v in want.items():
        assert m[k] == pytest.approx(float(v), rel=1e-4, abs=1e-5), k
    assert m["pairs"] == 3
