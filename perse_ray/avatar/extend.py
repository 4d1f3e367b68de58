"""Grow a trained avatar without retraining it: one more edit level, or one more attribute.

The decoder is a sum of per-attribute branches, each seeing only its own slice of z, so:

- **a new level** of attribute ``a`` is one more row of ``a``'s code table. Fitting it moves that
  code and ``a``'s branch's z-input weights (``w_z``), the only part of the branch multiplied by z:
  at ``a``'s source code (zero) the branch computes exactly what it did, so every render with ``a``
  at 0 is bit-identical to the base avatar's.
- **a new attribute** is one more branch, *anchored* (``AttributeLayout.anchored``: it outputs
  f(z) − f(0), and exactly zero at its source code), with its own codes. Fitting it moves only that
  branch and those codes, so with its slider at 0 every render is bit-identical to the base's.

``grow_level``/``grow_attribute`` return the grown model (every old tensor copied) and the
``Trainable`` set that a fit may change; everything outside it must stay as it is, which
``Trainable.restore`` enforces after each optimizer step (exactly, not up to Adam's epsilon).
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


def _branch_index(layout: LatentLayout, attribute: str) -> int:
    names = [a.name for a in layout.attributes]
    if attribute not in names:
        raise KeyError(f"unknown attribute {attribute!r}; the avatar has {names}")
    return 1 + names.index(attribute)  # branch 0 is the expression


def _copy_shared(src: AvatarModel, dst: AvatarModel) -> None:
    """Copy every tensor of ``src`` into ``dst`` (same name), into the first rows where ``dst``'s is
    longer (a code table with one more level, a decoder stack with one more branch)."""
    target = dst.state_dict()
    with torch.no_grad():
        for name, value in src.state_dict().items():
            t = target[name]
            if t.shape == value.shape:
                t.copy_(value)
            elif t.dim() and t.shape[1:] == value.shape[1:] and t.shape[0] > value.shape[0]:
                t[: value.shape[0]].copy_(value)  # a stacked tensor grown by one branch
            else:
                raise ValueError(f"{name}: cannot grow {list(value.shape)} into {list(t.shape)}")


def grow_level(model: AvatarModel, attribute: str, label: str, seed: int = 0,
               init: torch.Tensor | None = None) -> tuple[AvatarModel, Trainable]:
    """``model`` with one more edit level ``label`` of ``attribute`` (its code seeded near the others,
    or ``init``), and what fitting it may change: that code and the branch's z-input weights."""
    layout = model.layout
    b = _branch_index(layout, attribute)
    old = layout.attribute(attribute)
    if label in old.edit_labels:
        raise ValueError(f"attribute {attribute!r} already has a level {label!r}: {old.edit_labels}")
    grown = LatentLayout(layout.expressions, [
        dataclasses.replace(a, edit_labels=[*a.edit_labels, label]) if a.name == attribute else a
        for a in layout.attributes])
    new = AvatarModel(grown, model.cfg)
    _copy_shared(model, new)
    codes = model.codes[attribute].detach()
    with torch.no_grad():
        if init is not None:
            new.codes[attribute][-1].copy_(init)
        else:  # near the learned levels, where the branch has seen inputs, not at the source
            gen = torch.Generator().manual_seed(seed)
            new.codes[attribute][-1].copy_(codes.mean(0) + 0.1 * torch.randn(codes.shape[1], generator=gen))
    code_mask = torch.zeros_like(new.codes[attribute], dtype=torch.bool)
    code_mask[-1] = True
    w_z = torch.zeros_like(new.decoder.w_z, dtype=torch.bool)
    w_z[b, : old.code_dim] = True
    return new, Trainable({f"codes.{attribute}": code_mask, "decoder.w_z": w_z})


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
    b = len(grown.attributes)  # the new branch (0 is the expression)
    masks = {}
    for pname, p in new.decoder.named_parameters():
        mask = torch.zeros_like(p, dtype=torch.bool)
        mask[b] = True
        masks[f"decoder.{pname}"] = mask
    masks[f"codes.{name}"] = torch.ones_like(new.codes[name], dtype=torch.bool)
    return new, Trainable(masks)
