"""Edit: every edit level of every attribute, applied to the aligned source portrait.

Level 0 is the source itself (attribute "", zero mask); levels 1..K-1 of attribute ``a`` come
from ``cfg.synth.attributes[a].edits``. With ``synth.combined_frames`` the subject also gets
composed edits: every attribute at once, made by applying each attribute's edit to the previous
one's result, so any editor composes (see ``combined_levels``). Outputs are checked (shape, dtype, mask range) so a
backend that returns something else fails here, naming itself, instead of corrupting frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perse_ray.config import Config, EditSpec
from perse_ray.synth.backends import Editor
from perse_ray.synth.ingest import stage_seed


@dataclass
class Edit:
    attribute: str  # "" for the source
    edit_index: int  # 0 = the source
    image: np.ndarray  # uint8 [S, S, 3]
    mask: np.ndarray | None  # float32 [S, S] region the edit changed; None for the source
    also_edits: dict[str, int] | None = None  # a composed edit: the other attributes' levels


def edit_levels(cfg: Config) -> list[tuple[str, int, EditSpec | None]]:
    """(attribute, edit_index, spec) of the source and every edit, in a fixed order."""
    levels: list[tuple[str, int, EditSpec | None]] = [("", 0, None)]
    for attr in cfg.synth.attributes:
        levels += [(attr.name, k, spec) for k, spec in enumerate(attr.edits, start=1)]
    return levels


def combined_levels(cfg: Config) -> list[tuple[int, dict[str, int]]]:
    """(motion-script frame, {attribute: level}) of every combined frame, the same for every subject.

    ``synth.combined_frames`` frames evenly spaced over the script (never frame 0, the portrait
    view), each with every attribute at a non-source level drawn from ``synth.seed``. Empty with
    fewer than two attributes, where there is nothing to combine.
    """
    attrs = [a for a in cfg.synth.attributes if a.edits]
    n = cfg.synth.motion.num_frames
    count = min(cfg.synth.combined_frames, n - 1)
    if count <= 0 or len(attrs) < 2:
        return []
    frames = sorted({int(round(f)) for f in np.linspace(1, n - 1, count)})
    rng = np.random.default_rng([cfg.synth.seed, 0xC0])
    return [(f, {a.name: int(rng.integers(1, len(a.edits) + 1)) for a in attrs}) for f in frames]


def check_image(image: np.ndarray, shape: tuple[int, ...], who: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.shape != tuple(shape):
        raise ValueError(f"{who} returned {image.dtype} {image.shape}, expected uint8 {tuple(shape)}")
    return image


def check_mask(mask: np.ndarray, shape: tuple[int, ...], who: str) -> np.ndarray:
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape != tuple(shape[:2]) or not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"{who} returned a mask {mask.shape} outside [0, 1] or not {tuple(shape[:2])}")
    return mask


def attribute_seed(cfg: Config, subject_id: str, attribute: str) -> int:
    """One seed for every level of an attribute and its morphs: levels then differ only by the edit
    (a seeded texture stays put), and an exact morph meets its endpoints."""
    return stage_seed(cfg.synth.seed, subject_id, "attribute", attribute)


def edit_subject(subject_id: str, portrait: np.ndarray, landmarks: np.ndarray, editor: Editor,
                 cfg: Config) -> list[Edit]:
    edits = [Edit("", 0, portrait, None)]
    for attribute, k, spec in edit_levels(cfg)[1:]:
        who = f"{type(editor).__name__} ({attribute} edit {k})"
        image, mask = editor.edit(portrait, landmarks, attribute, spec, attribute_seed(cfg, subject_id, attribute))
        edits.append(Edit(attribute, k, check_image(image, portrait.shape, who),
                          check_mask(mask, portrait.shape, who)))
    specs = {a.name: [None, *a.edits] for a in cfg.synth.attributes}
    for levels in {tuple(levels.items()): levels for _, levels in combined_levels(cfg)}.values():
        image, union = portrait, np.zeros(portrait.shape[:2], np.float32)
        for attribute, k in levels.items():
            who = f"{type(editor).__name__} ({attribute} edit {k} composed with {levels})"
            image, mask = editor.edit(image, landmarks, attribute, specs[attribute][k],
                                      attribute_seed(cfg, subject_id, attribute))
            image = check_image(image, portrait.shape, who)
            union = np.maximum(union, check_mask(mask, portrait.shape, who))
        (first, k_first), *others = levels.items()
        edits.append(Edit(first, k_first, image, union, dict(others)))
    return edits


def edit_levels_of(edit: Edit) -> dict[str, int]:
    """Every attribute an edit sets, at its level ({} for the source)."""
    return {**({edit.attribute: edit.edit_index} if edit.attribute else {}), **(edit.also_edits or {})}
