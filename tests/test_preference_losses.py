"""The preference losses (finetune/preference_loss.py) on one batch of log-probs: against the formulas computed by hand,
and against TRL's implementations of the same losses (trl, a test dependency) to 1e-5; and the answers' log-probs of
the chunked output layer (finetune/lm_loss.py) against the full logits, values and gradients."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

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


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl(loss_type):
    """TRL's DPOTrainer._compute_loss on the same batch: its fused LM head's per-token log-probs made to sum to the
    batch's (and its reference precomputed), a stand-in for the trainer's state."""
    from collections import defaultdict

    from trl import DPOTrainer

    c, r, rc, rr, lc, lr = (t.float() for t in batch())
    width = 12
    completion = torch.zeros(6, width, dtype=torch.long)
    per_token = torch.zeros(6, width - 1)
    for i, (total, n) in enumerate(zip(torch.cat([c, r]), torch.cat([lc, lr]))):
        completion[i, 1: 1 + int(n)] = 1  # TRL scores position j + 1 from position j
        per_token[i, : int(n)] = total / n
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(6, width - 1),
                              mean_logits=torch.zeros(6, width - 1), is_top1=torch.zeros(6, width - 1, dtype=torch.bool))
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
                              precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                              loss_types=[loss_type], loss_weights=[1.0], beta=0.1, use_weighting=False,
                              _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(6, width, dtype=torch.long), "attention_mask": torch.ones(6, width),
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    expected = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    losses, chosen_rewards, _ = pair_losses(settings("dpo" if loss_type == "sigmoid" else "ipo"), c, r, rc, rr, lc, lr)
    assert losses.mean().item() == pytest.approx(expected.item(), abs=1e-5)
    assert chosen_rewards.mean().item() == pytest.approx(trainer._metrics["train"]["rewards/chosen"][0], abs=1e-5)
    metrics = split_metrics(settings("dpo"), torch.stack([c, r, rc, rr, lc, lr], 1).numpy())  # (no ties here)
    for ours, theirs in (("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                         ("logp_chosen", "logps/chosen")):
        assert metrics[ours] == pytest.approx(trainer._metrics["train"][theirs][0], abs=1e-5), ours


def test_orpo_odds_ratio_term_equals_trl():
    """TRL's ORPOTrainer.odds_ratio_loss (its term beside the NLL; TRL's NLL also counts the prompt's tokens, ORPO's
    paper and this project only the answer's)."""
    from trl.experimental.orpo import ORPOTrainer

    c, r, rc, rr, lc, lr = (t.float() for t in batch())
    trainer = SimpleNamespace(beta=0.3, accelerator=_Accelerator())
    ratio_losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(trainer, c / lc, r / lr)
    losses, ours_chosen, ours_rejected = pair_losses(settings("orpo", orpo_lambda=0.3), c, r, rc, rr, lc, lr)
    assert torch.allclose(losses - (-c / lc), -ratio_losses, atol=1e-5)  # ours: NLL - l log s(.), TRL's: l log s(.)
    assert torch.allclose(ours_chosen, chosen_rewards, atol=1e-5) and torch.allclose(ours_rejected, rejected_rewards)


def test_simpo_equals_trl():
    """TRL's CPOTrainer.cpo_loss with loss_type=simpo (and cpo_alpha=0: no NLL term)."""
    from trl.experimental.cpo import CPOTrainer

    c, r, rc, rr, lc, lr = (t.float() for t in batch())
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.8, beta=2.0, label_smoothing=0.0,
                              accelerator=_Accelerator())
    expected, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, c / lc, r / lr)
    losses, ours_chosen, ours_rejected = pair_losses(settings("simpo", beta=2.0, simpo_gamma=0.8), c, r, rc, rr, lc, lr)
    assert torch.allclose(losses, expected, atol=1e-5)
    assert torch.allclose(ours_chosen, chosen_rewards, atol=1e-5) and torch.allclose(ours_rejected, rejected_rewards)


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
