"""The objectives of task=preference (finetune/tasks/preference.py), from each pair's summed answer log-probabilities, and the metrics they imply.

    losses, chosen_rewards, rejected_rewards = pair_losses(settings, chosen, rejected, ref_chosen, ref_rejected,
                                                           chosen_tokens, rejected_tokens)

chosen / rejected: the policy's log-probability of each pair's answers, summed over their tokens ([pairs]);
ref_*: the reference model's (dpo and ipo only); *_tokens: the answers' lengths. A reward is what each loss compares:
  dpo    -(1-e) log s(b h) - e log s(-b h), h = (chosen - ref_chosen) - (rejected - ref_rejected); e: cDPO's label
         smoothing (the share of pairs presumed flipped); rewards b (logp - ref logp)                 (Rafailov et al.)
  ipo    (h' - 1/(2b))^2, h' the same difference of log-ratios averaged per answer token (as TRL, with the IPO
         authors); rewards as dpo                                                                      (Azar et al.)
  orpo   NLL(chosen) - l log s(log-odds(chosen) - log-odds(rejected)), per-token mean log-probs, no reference;
         rewards l x mean logp                                                                          (Hong et al.)
  simpo  -log s(b (mean logp chosen - mean logp rejected) - g), no reference; rewards b x mean logp       (Meng et al.)
(s: the sigmoid). A tie of rewards counts half a correct pair, so a model scored against itself has accuracy 0.5.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# what evaluation keeps of each pair, in this order: the columns of its scores
SCORES = ("logp_chosen", "logp_rejected", "ref_chosen", "ref_rejected", "tokens_chosen", "tokens_rejected")


def pair_losses(s, chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens):
    """(loss of each pair, chosen rewards, rejected rewards) for the settings `s` (loss, beta, label_smoothing,
    orpo_lambda, simpo_gamma); the SFT term (task.sft_weight) is the caller's."""
    if s.loss in ("dpo", "ipo"):
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        rewards = s.beta * chosen_ratio, s.beta * rejected_ratio
        if s.loss == "dpo":
            h = s.beta * (chosen_ratio - rejected_ratio)
            return -(1 - s.label_smoothing) * F.logsigmoid(h) - s.label_smoothing * F.logsigmoid(-h), *rewards
        delta = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        return (delta - 1 / (2 * s.beta)) ** 2, *rewards
    mean_chosen, mean_rejected = chosen / chosen_tokens, rejected / rejected_tokens
    if s.loss == "simpo":
        losses = -F.logsigmoid(s.beta * (mean_chosen - mean_rejected) - s.simpo_gamma)
        return losses, s.beta * mean_chosen, s.beta * mean_rejected
    log_odds = (mean_chosen - mean_rejected) - (_log1mexp(mean_chosen) - _log1mexp(mean_rejected))
    losses = -mean_chosen - s.orpo_lambda * F.logsigmoid(log_odds)
    return losses, s.orpo_lambda * mean_chosen, s.orpo_lambda * mean_rejected


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-7)  # a mean log-probability of exactly 0 (an answer predicted with certainty)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def batch_metrics(chosen, rejected, chosen_rewards, rejected_rewards, chosen_tokens) -> dict[str, torch.Tensor]:
    """The scalars a training step logs (means over the batch's pairs)."""
    with torch.no_grad():
        margin = chosen_rewards - rejected_rewards
        return {"reward_chosen": chosen_rewards.mean(), "reward_rejected": rejected_rewards.mean(),
                "reward_margin": margin.mean(), "reward_accuracy": _accuracy(margin).mean(),
                "logp_chosen": chosen.mean(), "logp_rejected": rejected.mean(),
                "chosen_nll": -(chosen.sum() / chosen_tokens.sum())}


def _accuracy(margin):
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def split_metrics(s, scores) -> dict[str, float]:
    """The metrics of an evaluated split from its pairs' scores ([pairs, len(SCORES)]): the rewards' means, their
    margin, reward accuracy, the answers' mean log-probs, and the chosen answers' token-weighted NLL."""
    t = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    _, chosen_rewards, rejected_rewards = pair_losses(s, *t.T)
    metrics = batch_metrics(t[:, 0], t[:, 1], chosen_rewards, rejected_rewards, t[:, 4])
    return {**{k: float(v) for k, v in metrics.items()}, "num_pairs": len(t)}
