"""SFT and DPO objectives (raylm.objectives) against hand computations, on a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from raylm.config import ModelConfig
from raylm.model import build_model
from raylm.objectives import DPOObjective, SFTObjective, reference_logprobs, sequence_logprobs
from raylm.train import train_step

VOCAB = 64
CFG = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, max_seq_len=64)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture
def model():
    return build_model(CFG, seed=0)


def _tokens(B=3, T=9, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _sft_batch():
    tokens = _tokens()
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 4:7] = True  # a reply in the middle, padding after it
    mask[1, 6:] = True  # a reply running to the end
    mask[2, 0] = True  # position 0 is predicted by nothing: never a target
    mask[2, 2] = True
    return {"tokens": tokens, "loss_mask": mask}


def _per_position_nll(model, tokens):
    """(B, T) loss terms: -log p(tokens[:, t+1] | tokens[:, :t+1]), written out by hand."""
    logits = model(tokens[:, :-1])[0].float()
    return -torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


# --------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_sft_loss_is_the_cross_entropy_of_exactly_the_masked_targets(model, chunk_size):
    batch = _sft_batch()
    obj = SFTObjective(chunk_size=chunk_size)
    with torch.no_grad():
        nll = _per_position_nll(model, batch["tokens"])
        got = obj.loss_sum(model, batch)
    # The mask is aligned to the predicted token: position t + 1 of the mask selects term t.
    terms = [(0, 3), (0, 4), (0, 5), (1, 5), (1, 6), (1, 7), (2, 1)]
    want = sum(nll[b, t] for b, t in terms)
    assert obj.count(batch) == len(terms) == 7
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, nll.sum())  # the unmasked terms would change it


def test_sft_ignores_the_ids_of_non_target_tokens(model):
    """A token that is neither a target nor context for one (the last, unmasked) can take
    any id: the loss does not see it. Earlier non-target tokens are context, so the check
    for them is on the terms above: they are simply not summed."""
    batch = _sft_batch()
    other = {**batch, "tokens": batch["tokens"].clone()}
    other["tokens"][0, -1] = (other["tokens"][0, -1] + 1) % VOCAB  # row 0's mask ends at 6
    with torch.no_grad():
        torch.testing.assert_close(SFTObjective().loss_sum(model, other), SFTObjective().loss_sum(model, batch))


def test_sft_z_loss_adds_log_z_squared_on_target_positions_only(model):
    batch = _sft_batch()
    with torch.no_grad():
        logits = model(batch["tokens"][:, :-1])[0].float()
        lse = torch.logsumexp(logits, -1)
        z = (lse.square() * batch["loss_mask"][:, 1:]).sum()
        got = SFTObjective(z_loss=1e-2).loss_sum(model, batch) - SFTObjective().loss_sum(model, batch)
    torch.testing.assert_close(got, 1e-2 * z)


def test_sft_with_no_targets_contributes_zero_and_no_nan(model):
    batch = {"tokens": _tokens(), "loss_mask": torch.zeros(3, 9, dtype=torch.bool)}
    obj = SFTObjective()
    assert obj.count(batch) == 0
    assert obj.loss_sum(model, batch).item() == 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_step(model, opt, [batch], obj, 0.1, 1.0)
    assert stats.loss == 0.0 and stats.count == 0 and not stats.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # zero gradient


def test_sft_train_step_normalises_by_the_masked_tokens_of_all_micro_batches(model):
    batch = _sft_batch()
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    with torch.no_grad():
        want = SFTObjective().loss_sum(model, batch) / 7
    stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), halves, SFTObjective(), 0.0, 1.0)
    assert stats.count == 7
    assert stats.loss == pytest.approx(want.item(), rel=1e-5)
    assert SFTObjective().metrics(model, batch)["assistant_tokens"] == 7


def test_sequence_logprobs_is_log_softmax_gathered_over_the_mask(model):
    batch = _sft_batch()
    with torch.no_grad():
        got = sequence_logprobs(model, batch["tokens"], batch["loss_mask"])
        logp = torch.log_softmax(model(batch["tokens"][:, :-1])[0].float(), -1)
    want = torch.zeros(3)
    for b in range(3):
        for t in range(1, 9):
            if batch["loss_mask"][b, t]:
                want[b] += logp[b, t - 1, batch["tokens"][b, t]]
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- DPO


def _dpo_batch(B=4, T=10):
    """Pairs sharing a 4-token prompt; responses of different lengths, right-padded."""
    prompt = _tokens(B, 4, seed=1)
    chosen = torch.cat([prompt, _tokens(B, T - 4, seed=2)], 1)
    rejected = torch.cat([prompt, _tokens(B, T - 4, seed=3)], 1)
    chosen_mask = torch.zeros(B, T, dtype=torch.bool)
    rejected_mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        chosen_mask[b, 4:T - b % 2] = True
        rejected_mask[b, 4:T - (b + 1) % 3] = True
    return {"chosen": chosen, "chosen_mask": chosen_mask, "rejected": rejected, "rejected_mask": rejected_mask}


def _perturbed(model, seed=1, scale=0.05):
    """A different policy near `model`, so that Δ is non-zero."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def _delta(policy, reference, batch):
    with torch.no_grad():
        lp = {k: sequence_logprobs(m, batch[k], batch[f"{k}_mask"])
              for k, m in [("chosen", policy), ("rejected", policy)]}
        ref = {k: sequence_logprobs(reference, batch[k], batch[f"{k}_mask"]) for k in ("chosen", "rejected")}
    return (lp["chosen"] - ref["chosen"]) - (lp["rejected"] - ref["rejected"])


def test_policy_equal_to_reference_gives_log_2_and_the_ipo_target(model):
    batch = _dpo_batch()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        sig = DPOObjective(beta=0.1, reference=reference)
        assert sig.count(batch) == 4
        torch.testing.assert_close(sig.loss_sum(model, batch) / 4, torch.tensor(math.log(2)))
        for beta in (0.1, 0.5):
            ipo = DPOObjective(beta=beta, loss="ipo", reference=reference)
            torch.testing.assert_close(ipo.loss_sum(model, batch) / 4, torch.tensor((1 / (2 * beta)) ** 2))
        m = sig.metrics(model, batch)
    assert m["reward_margin"] == 0.0 and m["preference_accuracy"] == 0.0 and m["pairs"] == 4


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.3)])
def test_losses_follow_the_formulas(model, beta, eps):
    batch = _dpo_batch()
    policy = _perturbed(model)
    delta = _delta(policy, model, batch)
    assert delta.abs().min() > 1e-3  # the check below would hold trivially at Δ = 0
    sigmoid = -(1 - eps) * torch.log(torch.sigmoid(beta * delta)) - eps * torch.log(torch.sigmoid(-beta * delta))
    ipo = (delta - 1 / (2 * beta)) ** 2
    with torch.no_grad():
        got = DPOObjective(beta=beta, label_smoothing=eps, reference=model).loss_sum(policy, batch)
        torch.testing.assert_close(got, sigmoid.sum())
        if eps == 0:
            got = DPOObjective(beta=beta, loss="ipo", reference=model).loss_sum(policy, batch)
            torch.testing.assert_close(got, ipo.sum())


def test_averaged_logprobs_divide_each_side_by_its_response_length(model):
    batch = _dpo_batch()
    policy = _perturbed(model)
    with torch.no_grad():
        lp = {k: sequence_logprobs(policy, batch[k], batch[f"{k}_mask"]) -
              sequence_logprobs(model, batch[k], batch[f"{k}_mask"]) for k in ("chosen", "rejected")}
        n = {k: batch[f"{k}_mask"].sum(-1) for k in ("chosen", "rejected")}
        delta = lp["chosen"] / n["chosen"] - lp["rejected"] / n["rejected"]
        got = DPOObjective(beta=0.5, loss="ipo", reference=model, average_logprobs=True).loss_sum(policy, batch)
    torch.testing.assert_close(got, ((delta - 1.0) ** 2).sum())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_precomputed_and_live_reference_give_the_same_loss_and_gradient(model, loss):
    batch = _dpo_batch()
    policy = _perturbed(model)
    live = DPOObjective(beta=0.2, loss=loss, reference=model)
    cols = reference_logprobs(model, batch)
    assert set(cols) == {"ref_chosen_logp", "ref_rejected_logp"} and not cols["ref_chosen_logp"].requires_grad
    with torch.no_grad():  # each column is its side's sequence log-probability under the reference
        for side in ("chosen", "rejected"):
            want = sequence_logprobs(model, batch[side], batch[f"{side}_mask"])
            torch.testing.assert_close(cols[f"ref_{side}_logp"], want)
    pre = DPOObjective(beta=0.2, loss=loss)
    grads = []
    for obj, b in [(live, batch), (pre, {**batch, **cols})]:
        policy.zero_grad()
        value = obj.loss_sum(policy, b)
        value.backward()
        grads.append((value.detach(), [p.grad.clone() for p in policy.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in model.parameters())  # the live reference got no gradient


def test_missing_reference_is_an_error_that_says_what_to_add(model):
    with pytest.raises(ValueError, match="ref_chosen_logp"):
        DPOObjective().loss_sum(model, _dpo_batch())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_one_step_raises_the_chosen_minus_rejected_margin(model, loss):
    batch = _dpo_batch()
    policy = copy.deepcopy(model)
    obj = DPOObjective(beta=0.5, loss=loss, reference=model)
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    stats = train_step(policy, opt, [batch], obj, 0.05, 0.0)
    assert not stats.skipped and stats.count == 4
    after = obj.metrics(policy, batch)  # starts at 0: the policy was the reference
    assert after["reward_margin"] > 1e-3 and after["preference_accuracy"] > 0.5


def test_bad_settings_are_refused():
    for kw in [{"loss": "hinge"}, {"beta": 0.0}, {"label_smoothing": 0.5}, {"loss": "ipo", "label_smoothing": 0.1}]:
        with pytest.raises(ValueError):
            DPOObjective(**kw)
