"""Morph: interpolation references between adjacent edits of each attribute, frame by frame.

For attribute ``a`` with levels 0..K-1 (0 = the source) and every alpha in ``synth.morph_alphas``,
the pair (k, k+1) for k = 0..K-2 gets a reference at that alpha for the same motion frame. The
avatar's interpolation regularization trains against these; PERSE makes them online at every
step, here they are precomputed once. A morph frame is written with ``edit_index`` = from_edit
and ``interpolation`` = (from_edit, to_edit, alpha); its mask is the morpher's.
"""

from __future__ import annotations

import numpy as np

from perse_ray.config import Config, EditSpec
from perse_ray.synth.animate import Frame
from perse_ray.synth.backends import Morpher
from perse_ray.synth.edit import attribute_seed, check_image, check_mask
from perse_ray.synth.motion import MotionFrame


def morph_pairs(cfg: Config) -> list[tuple[str, int, int, EditSpec | None, EditSpec | None]]:
    """(attribute, from_edit, to_edit, spec_from, spec_to) for every adjacent pair, (0, 1) included."""
    pairs = []
    for attr in cfg.synth.attributes:
        specs: list[EditSpec | None] = [None, *attr.edits]
        pairs += [(attr.name, k, k + 1, specs[k], specs[k + 1]) for k in range(len(attr.edits))]
    return pairs


def morph_frame(subject_id: str, source: np.ndarray, landmarks: np.ndarray, animated: list[Frame],
                frame: MotionFrame, morpher: Morpher, cfg: Config) -> list[Frame]:
    """Morph frames at ``frame`` from the animated frames of every edit at the same frame."""
    by_level = {(f.attribute, f.edit_index): f for f in animated if f.also_edits is None}
    out = []
    for attribute, k0, k1, spec0, spec1 in morph_pairs(cfg):
        f0 = by_level[("", 0) if k0 == 0 else (attribute, k0)]
        f1 = by_level[(attribute, k1)]
        for alpha in cfg.synth.morph_alphas:
            who = f"{type(morpher).__name__} ({attribute} {k0}->{k1} at {alpha}, frame {frame.index})"
            image, mask = morpher.morph(source, landmarks, attribute, spec0, spec1, float(alpha), frame,
                                        f0.image, f1.image, attribute_seed(cfg, subject_id, attribute))
            out.append(Frame(attribute, k0, check_image(image, f0.image.shape, who), f0.landmarks,
                             check_mask(mask, f0.image.shape, who), (k0, k1, float(alpha))))
    return out
