"""The preference losses (finetune/preference_loss.py) on one batch of log-probs: against the formulas computed by hand,
against values worked out by hand, and against TRL's formulation of the same losses written out; and the answers' log-probs of
the chunked output layer (finetune/lm_loss.py) against the full logits, values and gradients."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from finetune import lm_loss
from finetune.preference_loss import pair_losses, split_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

# three pairs: summed answer log-probs of the policy and the reference, and the answers' token counts
CHOSEN, REJECTED = [-12.0, -30.5, -8.25], [-14.0, -29.0, -20.0]
REF_CHOSEN, REF_REJECTED = [-13.0, -31.0, -9.0], [-13.5, -28.0, -18.0]
CHOSEN_TOKENS, REJECTED_TOKENS = [4, 10, 3], [5, 9, 8]


def settings(loss, beta=0.1, label_smoothing=0.0, orpo_lambda=0.1, simpo_gamma=1.0):
    return SimpleNamespace(loss=loss, beta=beta, label_smoothing=label_smoothing, orpo_lambda=orpo_lambda,
                           simpo_gamma=simpo_gamma)


def batch():
    return [torch.tensor(x, dtype=torch.float64) for x in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_TOKENS,
                                                          REJECTED_TOKENS)]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def by_hand(s, c, r, rc, rr, lc, lr) -> tuple[float, float, float]:
    """(loss, chosen reward, rejected reward) of one pair, written out from the papers' formulas."""
    if s.loss == "dpo":
        h = s.beta * ((c - rc) - (r - rr))
        loss = -(1 - s.label_smoothing) * log_sigmoid(h) - s.label_smoothing * log_sigmoid(-h)
        return loss, s.beta * (c - rc), s.beta * (r - rr)
    if s.loss == "ipo":
        return ((c - rc) / lc - (r - rr) / lr - 1 / (2 * s.beta)) ** 2, s.beta * (c - rc), s.beta * (r - rr)
    mc, mr = c / lc, r / lr
    if s.loss == "simpo":
        return -log_sigmoid(s.beta * (mc - mr) - s.simpo_gamma), s.beta * mc, s.beta * mr
    odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
    return -mc - s.orpo_lambda * log_sigmoid(odds), s.orpo_lambda * mc, s.orpo_lambda * mr


@pytest.mark.parametrize("s", [settings("dpo"), settings("dpo", beta=0.5, label_smoothing=0.2), settings("ipo"),
                               settings("orpo", orpo_lambda=0.3), settings("simpo", beta=2.0, simpo_gamma=0.8)],
                         ids=["dpo", "cdpo", "ipo", "orpo", "simpo"])
def test_each_loss_equals_its_formula_by_hand(s):
    losses, chosen_rewards, rejected_rewards = pair_losses(s, *batch())
    for i, pair in enumerate(zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS)):
        loss, chosen_reward, rejected_reward = by_hand(s, *pair)
        assert losses[i].item() == pytest.approx(loss, rel=1e-12)
        assert (chosen_rewards[i].item(), rejected_rewards[i].item()) == pytest.approx((chosen_reward, rejected_reward))


def test_dpo_starts_at_ln2_and_a_model_against_itself_has_accuracy_one_half():
    c, r, _, _, lc, lr = batch()
    losses, *_ = pair_losses(settings("dpo"), c, r, c, r, lc, lr)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    scores = torch.stack([c, r, c, r, lc, lr], 1).numpy()
    metrics = split_metrics(settings("dpo"), scores)
    assert metrics["reward_accuracy"] == 0.5 and metrics["reward_margin"] == 0  # a tie counts half
    assert metrics["chosen_nll"] == pytest.approx(-sum(CHOSEN) / sum(CHOSEN_TOKENS))


# pair 0 worked out on paper: dpo h = 0.1 ((-12 + 13) - (-14 + 13.5)) = 0.15, log(1 + e^-0.15); ipo pair 2:
# ((-8.25 + 9) / 3 - (-20 + 18) / 8 - 1 / 0.2)^2 = (0.25 + 0.25 - 5)^2; simpo pair 0: log(1 + e^-(2 (-3 + 2.8) - 0.8))
@pytest.mark.parametrize("s, pair, loss", [(settings("dpo"), 0, 0.620957), (settings("ipo"), 2, 20.25),
                                           (settings("simpo", beta=2.0, simpo_gamma=0.8), 0, 1.463282)])
def test_losses_equal_values_worked_out_by_hand(s, pair, loss):
    assert pair_losses(s, *batch())[0][pair].item() == pytest.approx(loss, abs=1e-6)


def test_each_loss_equals_trl_formulation():
    """TRL 1.x's expressions of the same losses, as its trainers write them (DPOTrainer._compute_loss: sigmoid and
    length-normalised ipo; ORPOTrainer.odds_ratio_loss: beta x log s(log-odds), beside the NLL; CPOTrainer.cpo_loss:
    simpo as a shifted sigmoid loss with gamma / beta) and its logged rewards/accuracies and rewards/margins."""
    c, r, rc, rr, lc, lr = batch()
    beta = 0.1
    chosen_scores, rejected_scores = c - rc, r - rr
    trl = {"dpo": -F.logsigmoid(beta * (chosen_scores - rejected_scores)),
           "ipo": (chosen_scores / lc - rejected_scores / lr - 1 / (2 * beta)) ** 2}
    for name, expected in trl.items():
        losses, chosen_rewards, rejected_rewards = pair_losses(settings(name, beta=beta), c, r, rc, rr, lc, lr)
        assert torch.allclose(losses, expected, atol=1e-9), name
        assert torch.allclose(chosen_rewards, beta * chosen_scores) and torch.allclose(rejected_rewards,
                                                                                       beta * rejected_scores)
    metrics = split_metrics(settings("dpo"), torch.stack([c, r, rc, rr, lc, lr], 1).numpy())  # (no ties here)
    margins = beta * (chosen_scores - rejected_scores)
    assert metrics["reward_accuracy"] == pytest.approx((margins > 0).double().mean().item())
    assert metrics["reward_margin"] == pytest.approx(margins.mean().item())

    mc, mr = c / lc, r / lr  # TRL's average_log_prob
    log_odds = (mc - mr) - (torch.log1p(-torch.exp(mc)) - torch.log1p(-torch.exp(mr)))
    losses, chosen_rewards, _ = pair_losses(settings("orpo", orpo_lambda=0.3), c, r, rc, rr, lc, lr)
    assert torch.allclose(losses, -mc - 0.3 * F.logsigmoid(log_odds), atol=1e-9)  # TRL: NLL - (beta x ratio)
    assert torch.allclose(chosen_rewards, 0.3 * mc)

    logits = (mc - mr) - 0.8 / 2.0
    losses, chosen_rewards, _ = pair_losses(settings("simpo", beta=2.0, simpo_gamma=0.8), c, r, rc, rr, lc, lr)
    assert torch.allclose(losses, -F.logsigmoid(2.0 * logits), atol=1e-9) and torch.allclose(chosen_rewards, 2.0 * mc)


def test_answer_log_probs_of_the_chunked_head_equal_the_full_logits_with_their_gradients():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    ids = torch.randint(3, 50, (4, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # a padded row
    targets = torch.full_like(ids, -100)
    targets[:, 4:] = ids[:, 4:]  # the answers: positions 4.. (5 tokens; 2 in the padded row)
    targets[2, 6:] = -100
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25])  # what follows the log-probs (a preference loss's gradient)

    logits = model(input_ids=ids, attention_mask=mask).logits
    per_token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None].clamp(min=0))[..., 0]
    expected = (per_token * (targets[:, 1:] != -100)).sum(1)
    (expected * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    assert lm_loss.attach(model, 1, chunk_size=3)  # fewer than a batch's 16 answer tokens: several chunks
    got = model(input_ids=ids, attention_mask=mask, labels=targets, per_sequence=True).sequence_log_probs
    assert torch.allclose(got, expected, atol=1e-5)
    (got * weights).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-5), name
