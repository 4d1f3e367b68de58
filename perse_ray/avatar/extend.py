"""Grow a trained avatar without retraining it: one more edit level, or one more attribute.

The decoder is a sum of branches, each seeing only its own slice of z, so:

- **a new level** of attribute ``a`` is one more row of ``a``'s code table and one more *residual*
  branch on ``a``'s slice, anchored (``AttributeLayout``: it outputs f(z) − f(0), exactly zero at
  the source code). The residual starts as a copy of ``a``'s branch with a zero output layer (the
  features that branch learned, adding nothing yet); fitting it moves that residual and the new
  code. Every render with ``a`` at 0 stays bit-identical; ``a``'s old levels move only as far as
  the residual's output at their codes, which a fit replaying them keeps small.
- **a new attribute** is one more anchored branch with its own codes; fitting it moves only those,
  so with its slider at 0 every render is bit-identical to the base's.

``grow_level``/``grow_attribute`` return the grown model (every old tensor copied, matched by
branch, not by position) and the ``Trainable`` set that a fit may change; everything outside it
must stay as it is, which ``Trainable.restore`` enforces after each optimizer step (exactly, not up
to Adam's epsilon).
"""

from __future__ import annotations

import dataclasses

import torch

from perse_ray.avatar.layout import AttributeLayout, LatentLayout
from perse_ray.avatar.model import AvatarModel


@dataclasses.dataclass
class Trainable:
    """Which entries of which parameters a fit may change: ``masks[name]`` is a bool tensor shaped as
    the parameter (True = trainable); parameters not named stay frozen whole."""

    masks: dict[str, torch.Tensor]

    def parameters(self, model: AvatarModel) -> list[torch.nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[name] for name in self.masks]

    def snapshot(self, model: AvatarModel) -> dict[str, torch.Tensor]:
        named = dict(model.named_parameters())
        return {name: named[name].detach().clone() for name in self.masks}

    @torch.no_grad()
    def restore(self, model: AvatarModel, snapshot: dict[str, torch.Tensor]) -> None:
        """Put every frozen entry of the trainable parameters back to its snapshot value."""
        named = dict(model.named_parameters())
        for name, mask in self.masks.items():
            p = named[name]
            p.copy_(torch.where(mask.to(p.device), p, snapshot[name].to(p.device)))


def branch_keys(layout: LatentLayout) -> list[tuple[str, int]]:
    """Each decoder branch as (its input, how many branches before it share that input): stable
    when a layout grows, whatever the position a new branch takes."""
    seen: dict[str, int] = {}
    keys = []
    for b in layout.branches():
        keys.append((b.input, seen.get(b.input, 0)))
        seen[b.input] = seen.get(b.input, 0) + 1
    return keys


def _copy_shared(src: AvatarModel, dst: AvatarModel) -> None:
    """Copy every tensor of ``src`` into ``dst``: decoder stacks branch by branch (``branch_keys``),
    region rows attribute by attribute, code tables into their first rows, the rest whole."""
    where = {key: i for i, key in enumerate(branch_keys(dst.layout))}
    branch_map = [(i, where[key]) for i, key in enumerate(branch_keys(src.layout))]
    dst_attrs = [a.name for a in dst.layout.attributes]
    row_map = [(i, dst_attrs.index(a.name)) for i, a in enumerate(src.layout.attributes)]
    target = dst.state_dict()
    with torch.no_grad():
        for name, value in src.state_dict().items():
            t = target[name]
            if name.startswith("decoder."):
                for i, j in branch_map:
                    t[j].copy_(value[i])
            elif name == "branch_regions":
                for i, j in row_map:
                    t[j].copy_(value[i])
            elif t.shape == value.shape:
                t.copy_(value)
            elif name.startswith("codes.") and t.shape[1:] == value.shape[1:] and t.shape[0] > value.shape[0]:
                t[: value.shape[0]].copy_(value)
            else:
                raise ValueError(f"{name}: cannot grow {list(value.shape)} into {list(t.shape)}")


def _branch_masks(model: AvatarModel, branch: int) -> dict[str, torch.Tensor]:
    """Trainable masks selecting one branch's slice of every decoder parameter."""
    masks = {}
    for pname, p in model.decoder.named_parameters():
        mask = torch.zeros_like(p, dtype=torch.bool)
        mask[branch] = True
        masks[f"decoder.{pname}"] = mask
    return masks


def grow_level(model: AvatarModel, attribute: str, label: str, seed: int = 0,
               init: torch.Tensor | None = None) -> tuple[AvatarModel, Trainable]:
    """``model`` with one more edit level ``label`` of ``attribute`` (its code seeded near the
    others, or ``init``) and one more residual branch on it, and what fitting it may change: that
    residual and the new code."""
    layout = model.layout
    names = [a.name for a in layout.attributes]
    if attribute not in names:
        raise KeyError(f"unknown attribute {attribute!r}; the avatar has {names}")
    old = layout.attribute(attribute)
    if label in old.edit_labels:
        raise ValueError(f"attribute {attribute!r} already has a level {label!r}: {old.edit_labels}")
    grown = LatentLayout(layout.expressions, [
        dataclasses.replace(a, edit_labels=[*a.edit_labels, label], residuals=a.residuals + 1)
        if a.name == attribute else a for a in layout.attributes])
    new = AvatarModel(grown, model.cfg)
    _copy_shared(model, new)
    keys = branch_keys(grown)
    residual, main = keys.index((attribute, old.residuals + 1)), keys.index((attribute, 0))
    codes = model.codes[attribute].detach()
    with torch.no_grad():
        for pname, p in new.decoder.named_parameters():  # the attribute's features, adding nothing yet
            p[residual].copy_(torch.zeros_like(p[main]) if pname in ("w_out", "b_out") else p[main])
        if init is not None:
            new.codes[attribute][-1].copy_(init)
        else:  # near the learned levels, where the branch has seen inputs, not at the source
            gen = torch.Generator().manual_seed(seed)
            new.codes[attribute][-1].copy_(codes.mean(0) + 0.1 * torch.randn(codes.shape[1], generator=gen))
    code_mask = torch.zeros_like(new.codes[attribute], dtype=torch.bool)
    code_mask[-1] = True
    return new, Trainable({**_branch_masks(new, residual), f"codes.{attribute}": code_mask})


def grow_attribute(model: AvatarModel, name: str, labels: list[str], seed: int = 0
                   ) -> tuple[AvatarModel, Trainable]:
    """``model`` with a new anchored attribute ``name`` (levels ``labels`` after the source), a new
    branch seeded as training seeds one (zero output layer), and what fitting it may change: that
    branch and its codes."""
    layout = model.layout
    if name in [a.name for a in layout.attributes]:
        raise ValueError(f"the avatar already has an attribute {name!r}")
    if not labels or len(set(labels)) != len(labels) or "source" in labels:
        raise ValueError(f"attribute {name!r} needs one or more distinct edit labels (not 'source'), got {labels}")
    code_dim = model.cfg.code_dim
    grown = LatentLayout(layout.expressions, [*layout.attributes,
                                              AttributeLayout(name, ["source", *labels], code_dim, anchored=True)])
    with torch.random.fork_rng(devices=[]):  # the new branch's weights are seeded, the caller's RNG untouched
        torch.manual_seed(seed)
        new = AvatarModel(grown, model.cfg, seed=seed)
    _copy_shared(model, new)  # every old tensor; the new branch and codes keep their fresh, seeded values
    branch = branch_keys(grown).index((name, 0))
    return new, Trainable({**_branch_masks(new, branch),
                           f"codes.{name}": torch.ones_like(new.codes[name], dtype=torch.bool)})


def random_latents(layout: LatentLayout, fixed: dict[str, float], count: int, seed: int = 0, *,
                   expression_range: tuple[float, float] = (-0.5, 1.0),
                   ) -> list[tuple[dict[str, float], dict[str, float]]]:
    """``count`` seeded (attribute sliders, expression) pairs over ``layout``, ``fixed`` held. Values
    are float32-exact, so a float32 reader (the browser's decoder) sees the same numbers."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(low: float, high: float) -> float:
        return float(np.float32(rng.uniform(low, high)))

    out = []
    for _ in range(count):
        attributes = {a.name: draw(0, a.num_edits - 1) for a in layout.attributes}
        attributes.update(fixed)
        out.append((attributes, {e: draw(*expression_range) for e in layout.expressions}))
    return out


@torch.no_grad()
def decode_mismatches(old, new, fixed: dict[str, float], count: int = 16, seed: int = 0,
                      ) -> list[tuple[dict[str, float], dict[str, float]]]:
    """The ``random_latents`` of ``new`` (``fixed`` held; attributes ``old`` lacks stay at its
    source) at which the two ``Avatar``s decode to Gaussians that differ in any bit."""
    known = {a.name for a in old.layout.attributes}
    bad = []
    for attributes, expression in random_latents(new.layout, fixed, count, seed):
        g_old = old.model.gaussians(old.latent({k: v for k, v in attributes.items() if k in known}, expression)[None])
        g_new = new.model.gaussians(new.latent(attributes, expression)[None])
        if any(not torch.equal(g_old[k], g_new[k]) for k in g_old):
            bad.append((attributes, expression))
    return bad
