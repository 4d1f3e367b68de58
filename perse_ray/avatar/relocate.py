"""3DGS-MCMC relocation: move dead Gaussians onto live ones instead of densifying/pruning.

The budget N never changes. A dead Gaussian is copied onto a live one chosen with probability
proportional to its opacity; the live one and its copies split its opacity and shrink their
scale so the rendered image stays (to first order) the same — Kheradmand et al., "3D Gaussian
Splatting as Markov Chain Monte Carlo" (NeurIPS 2024), eq. 9; gsplat's ``compute_relocation``
implements the same formula.
"""

from __future__ import annotations

import math

import torch

MAX_COPIES = 51  # gsplat caps the copies per live Gaussian at the same number


def split_opacity_and_scale(opacity: torch.Tensor, copies: torch.Tensor, scale: torch.Tensor):
    """New opacity and scale for ``copies`` Gaussians sharing one of opacity ``opacity``.

    opacity [M], copies [M] (≥ 1, total including the original), scale [M, 3].
    """
    copies = copies.clamp(1, MAX_COPIES)
    new_opacity = 1 - (1 - opacity).clamp_min(1e-6) ** (1.0 / copies)
    denom = torch.zeros_like(opacity)
    for n in range(1, int(copies.max()) + 1):
        term = torch.zeros_like(opacity)
        for k in range(n):
            term = term + math.comb(n - 1, k) * (-1) ** k / math.sqrt(k + 1) * new_opacity ** (k + 1)
        denom = denom + torch.where(copies >= n, term, torch.zeros_like(term))
    coeff = opacity / denom.clamp_min(1e-8)
    return new_opacity.clamp(1e-4, 1 - 1e-4), scale * coeff[:, None]


@torch.no_grad()
def relocate_dead(model, optimizer: torch.optim.Optimizer, peak_opacity: torch.Tensor,
                  threshold: float, generator: torch.Generator) -> int:
    """Relocate Gaussians whose peak opacity over recent latents is below ``threshold``.

    Peak opacity, not the canonical one: an attribute branch may make Gaussians (glasses, beard)
    visible only for some codes, and those are alive. Returns how many moved.
    """
    dead = torch.nonzero(peak_opacity < threshold).flatten()
    live = torch.nonzero(peak_opacity >= threshold).flatten()
    if len(dead) == 0 or len(live) == 0:
        return 0
    # drawn on the generator's device (the CPU): the same targets whatever device trains
    choice = torch.multinomial(peak_opacity[live].to(generator.device), len(dead), replacement=True,
                               generator=generator)
    targets = live[choice.to(live.device)]
    copies = torch.bincount(targets, minlength=len(peak_opacity))[targets] + 1  # per chosen target

    base_opacity = torch.sigmoid(model.opacity_logits[targets])
    new_opacity, new_scale = split_opacity_and_scale(base_opacity, copies.float(),
                                                     torch.exp(model.log_scales[targets]))
    new_logit = torch.logit(new_opacity)
    per_gaussian = ["means", "quats", "color_logits", "features"]
    for name in per_gaussian:
        getattr(model, name)[dead] = getattr(model, name)[targets]
    for idx in (targets, dead):
        model.opacity_logits[idx] = new_logit
        model.log_scales[idx] = torch.log(new_scale)
    _reset_adam_state(optimizer, model, torch.cat([dead, targets]))
    return len(dead)


def _reset_adam_state(optimizer, model, index: torch.Tensor) -> None:
    """Zero the Adam moments of moved Gaussians so stale momentum does not fling them away."""
    params = {id(getattr(model, n)) for n in ("means", "quats", "color_logits", "features",
                                                "opacity_logits", "log_scales")}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in params and p in optimizer.state:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in optimizer.state[p]:
                        optimizer.state[p][key][index] = 0
