"""Ingest: decode a subject's image(s), keep the dominant face, align it, embed its identity.

``ingest_subject`` turns a discovered ``Candidate`` into one ``subjects`` row: ``ok`` with the
aligned portrait (PNG), its landmarks in aligned pixels and the identity embedding, or
``quarantined`` with the reason (undecodable, no face, several faces without a dominant one,
face too small). For a folder subject every image is tried and the largest dominant face wins;
``reason`` says which image was chosen and why the others were not. The identity is embedded
from the aligned portrait, at the resolution of every frame, so the id filter compares like with
like.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perse_ray.config import Config, FacesConfig
from perse_ray.faces import Face, FaceModel, align, face_from_landmarks, outside_fraction
from perse_ray.portraits import Candidate, ImageRejected, encode_png, load_image

# Past this share of the aligned frame outside the image the portrait is a tight face crop: the
# head's outline, hair and far side lie on the plain backdrop ``align`` fills there.
TIGHT_CROP = 0.25


def stage_seed(base: int, subject_id: str, *parts: object) -> int:
    """A seed per (subject, stage, ...) that does not depend on scheduling or Python's hash salt."""
    key = ":".join(str(p) for p in (base, subject_id, *parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def choose_face(faces: list[Face], image_shape: tuple[int, ...], cfg: FacesConfig
                ) -> tuple[Face | None, str]:
    """The dominant face and a description, or None and the quarantine reason."""
    if not faces:
        return None, "no face found"
    faces = sorted(faces, key=lambda f: f.area, reverse=True)
    best = faces[0]
    if len(faces) > 1 and best.area < cfg.dominance_ratio * faces[1].area:
        ratio = best.area / max(faces[1].area, 1e-9)
        return None, (f"{len(faces)} faces without a dominant one (largest is {ratio:.2f}x the next "
                      f"by area, needs {cfg.dominance_ratio}x)")
    side = math.sqrt(best.area)
    fraction = side / min(image_shape[:2])
    if fraction < cfg.min_face_fraction:
        return None, (f"face too small ({side:.0f} px, {fraction:.3f} of the short side; "
                      f"needs {cfg.min_face_fraction})")
    others = f", {len(faces) - 1} smaller face(s) ignored" if len(faces) > 1 else ""
    return best, f"face {side:.0f} px{others}"


@dataclass
class _Choice:
    path: str
    image: np.ndarray
    face: Face
    scale: float
    note: str


def ingest_subject(candidate: Candidate, face_model: FaceModel, cfg: Config) -> dict:
    """One ``subjects`` row for ``candidate`` (see the module docstring)."""
    row = {"subject_id": candidate.subject_id, "source_path": candidate.source_path,
           "content_sha256": candidate.content_sha256}
    best: _Choice | None = None
    verdicts = []
    for path, sha in zip(candidate.images, candidate.image_sha256):
        name = Path(path).name
        try:
            image, scale = load_image(path, sha, cfg.synth.max_image_pixels, cfg.synth.max_input_side)
        except ImageRejected as e:
            verdicts.append((name, str(e)))
            continue
        face, note = choose_face(face_model.detect(image), image.shape, cfg.faces)
        if face is None:
            verdicts.append((name, note))
            continue
        verdicts.append((name, note))
        # Compare faces in source pixels: downscaled inputs must not lose to smaller originals.
        if best is None or face.area / scale**2 > best.face.area / best.scale**2:
            best = _Choice(path, image, face, scale, note)
    if best is None:
        reason = verdicts[0][1] if len(verdicts) == 1 else \
            "no usable image: " + "; ".join(f"{n}: {v}" for n, v in verdicts)
        return {**row, "status": "quarantined", "reason": _with_notes(reason, candidate.notes)}

    size = cfg.synth.resolution
    portrait, landmarks, m = align(best.image, best.face, size)
    identity = face_model.embed(portrait, face_from_landmarks(landmarks))
    if len(candidate.images) == 1:
        reason = f"dominant {best.note}"
    else:
        others = "; ".join(f"{n}: {v}" for n, v in verdicts if n != Path(best.path).name)
        reason = f"chose {Path(best.path).name} (largest dominant {best.note}) of " \
                 f"{len(candidate.images)} images; {others}"
    if best.scale != 1.0:
        reason += f"; input downscaled by {best.scale:.3f} before detection"
    outside = outside_fraction(m, best.image.shape, size)
    if outside > TIGHT_CROP:
        reason += (f"; tight crop: {outside:.0%} of the aligned frame lies outside the image and is a plain "
                   f"backdrop (no hair, ears or head outline to turn with the face): a photo with the whole "
                   f"head and some background does better")
    x0, y0, x1, y1 = (float(v) / best.scale for v in best.face.box)
    return {**row, "status": "ok", "reason": _with_notes(reason, candidate.notes),
            "face_box": [x0, y0, x1, y1], "landmarks": landmarks.astype(np.float32).tolist(),
            "identity": np.asarray(identity, np.float32).ravel().tolist(),
            "portrait_png": encode_png(portrait)}


def _with_notes(reason: str, notes: tuple[str, ...]) -> str:
    return reason + (f" (also in the folder: {'; '.join(notes)})" if notes else "")
