"""How far the sampler's token logprobs (mu) are from the trainer's (pi) on the same tokens.

Notation (docs/design.md, "Mismatch metrics"): per real completion token t, lmu = sampler logprob, lpi = trainer logprob
at the rollout parameters, d = lpi - lmu, r = exp(d). Sequence quantities sum d over a row.
"""

from __future__ import annotations

import torch

# exp() of a summed log-ratio overflows fp32 near 88; clamping keeps the statistics finite
# while still showing an astronomically large ratio.
MAX_LOG_RATIO = 20.0


def mismatch_metrics(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """All ``mismatch/*`` metrics of docs/design.md for ``[N, C]`` logprobs and a ``[N, C]`` token mask."""
    mask = mask.bool()
    lmu = sampler_logprobs.float()[mask]
    lpi = trainer_logprobs.float()[mask]
    if lmu.numel() == 0:
        return {}
    d = lpi - lmu
    r = torch.exp(d.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    p_pi, p_mu = lpi.exp(), lmu.exp()
    prob_diff = p_pi - p_mu

    rows = mask.any(dim=1)
    seq_d = ((trainer_logprobs.float() - sampler_logprobs.float()) * mask)[rows].sum(dim=1)
    seq_ratio = torch.exp(seq_d.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))

    return {
        "mismatch/token_kl_k1": (lmu - lpi).mean().item(),
        "mismatch/token_kl_k3": (r - 1 - d).mean().item(),
        "mismatch/seq_kl": (-seq_d).mean().item(),
        "mismatch/logp_abs_diff_mean": d.abs().mean().item(),
        "mismatch/logp_abs_diff_max": d.abs().max().item(),
        "mismatch/prob_abs_diff_mean": prob_diff.abs().mean().item(),
        "mismatch/prob_abs_diff_max": prob_diff.abs().max().item(),
        "mismatch/prob_diff_min": prob_diff.min().item(),
        "mismatch/prob_diff_max": prob_diff.max().item(),
        "mismatch/is_ratio_token_min": r.min().item(),
        "mismatch/is_ratio_token_mean": r.mean().item(),
        "mismatch/is_ratio_token_max": r.max().item(),
        "mismatch/is_ratio_seq_min": seq_ratio.min().item(),
        "mismatch/is_ratio_seq_mean": seq_ratio.mean().item(),
        "mismatch/is_ratio_seq_max": seq_ratio.max().item(),
        "mismatch/chi2_token": (r.square().mean() - 1).item(),
        "mismatch/ess": effective_sample_size(r),
        "mismatch/pearson_prob": pearson(p_pi, p_mu),
    }


def effective_sample_size(weights: torch.Tensor) -> float:
    """Normalised ESS of importance weights, ``1 / mean((w / mean w)^2)``, in (0, 1]; 1 = no mismatch."""
    normalised = weights / weights.mean()
    return (1.0 / normalised.square().mean()).item()


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; 1.0 when both are constant and equal (nothing to disagree on)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    if denom == 0:
        return 1.0 if torch.equal(x, y) else 0.0
    return ((x * y).sum() / denom).item()


def sampling_metrics(behaviour_logprobs: torch.Tensor, kept_mass: torch.Tensor, trainer_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float]:
    """``sampling/*``: what the sampler's processing (top-p, top-k, repetition penalty) did to the tokens.

    The mismatch metrics compare mu, the full-vocabulary distribution, on both sides (precision against
    precision); the tokens were drawn from ``mu_b``, mu after processing. Per real token: the unprocessed
    mass the processing kept, and the importance ratio against the distribution sampled, ``r_b = exp(lpi -
    lmu_b)``. Top-p/top-k renormalise the kept tokens, so ``r_b ~ kept mass < 1`` on a matched pair:
    ``--is-reference behaviour`` corrects for that bias, ``unprocessed`` (the default) ignores it.
    """
    mask = mask.bool()
    kept = kept_mass.float()[mask]
    if kept.numel() == 0:
        return {}
    d = (trainer_logprobs.float() - behaviour_logprobs.float())[mask]
    r = torch.exp(d.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    return {
        "sampling/kept_mass_mean": kept.mean().item(),
        "sampling/kept_mass_min": kept.min().item(),
        "sampling/behaviour_is_ratio_token_min": r.min().item(),
        "sampling/behaviour_is_ratio_token_mean": r.mean().item(),
        "sampling/behaviour_is_ratio_token_max": r.max().item(),
    }


# Rows of [k, V] turned into float64 at once: bounds the temporaries (~32 MB each) at 150k vocabularies.
_VOCAB_CHUNK_ELEMENTS = 2**22


def vocab_divergences(sampler_rows: torch.Tensor, trainer_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the divergence of the trainer's whole next-token distribution from the sampler's,
    from their log-probabilities ``[k, V]``, in float64:

    - each row renormalised first, ``lmu = log_softmax(float64(row))`` (the same distribution: log_softmax
      ignores a shift), so fp32's log-sum-exp rounding (~1e-7 per row, a shift of every entry) does not
      show as a KL of that size; the KL is then >= 0 up to float64 rounding;
    - ``KL(mu || pi) = sum_v mu_v (lmu_v - lpi_v)`` in log space (a token with ``mu_v = 0`` adds 0);
    - ``TV(mu, pi) = 1/2 sum_v |mu_v - pi_v|``, in [0, 1].

    Returns ``(kl [k], tv [k])`` float64.
    """
    kl, tv = [], []
    step = max(1, _VOCAB_CHUNK_ELEMENTS // max(1, sampler_rows.shape[-1]))
    for begin in range(0, sampler_rows.shape[0], step):
        lmu = torch.log_softmax(sampler_rows[begin: begin + step].double(), dim=-1)
        lpi = torch.log_softmax(trainer_rows[begin: begin + step].double(), dim=-1)
        mu, pi = lmu.exp(), lpi.exp()
        kl.append(torch.where(mu > 0, mu * (lmu - lpi), torch.zeros_like(mu)).sum(-1))
        tv.append(0.5 * (mu - pi).abs().sum(-1))
    empty = sampler_rows.new_zeros(0, dtype=torch.float64)
    return (torch.cat(kl), torch.cat(tv)) if kl else (empty, empty)


def vocab_metrics(kl: torch.Tensor, tv: torch.Tensor) -> dict[str, float]:
    """``mismatch/vocab_*`` over the sampled positions i (``kl``, ``tv`` of ``vocab_divergences``):
    ``vocab_kl = mean_i KL_i``, ``vocab_kl_max = max_i KL_i``, ``vocab_tv = mean_i TV_i``,
    ``vocab_tv_max = max_i TV_i``, ``vocab_positions`` = how many positions were compared."""
    if kl.numel() == 0:
        return {}
    return {
        "mismatch/vocab_kl": kl.mean().item(),
        "mismatch/vocab_kl_max": kl.max().item(),
        "mismatch/vocab_tv": tv.mean().item(),
        "mismatch/vocab_tv_max": tv.max().item(),
        "mismatch/vocab_positions": float(kl.numel()),
    }
