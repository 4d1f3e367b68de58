"""Identity filter: score every frame against the source identity, drop the ones that drifted.

Every frame keeps its ``id_score``. A frame is dropped (``kept`` false, ``drop_reason`` set) when
the score is below ``faces.id_threshold`` or when no identity can be measured. Frontal detectors
miss faces at large yaw or in small frames, so when the detector finds nothing the frame's known
landmarks (where the animator put the face) locate the crop instead; ``source`` tells which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perse_ray.faces import FaceModel, embed_frame


@dataclass
class Verdict:
    id_score: float | None
    kept: bool
    drop_reason: str | None
    source: str  # "detector" | "landmarks" | "none"


def identity_verdict(face_model: FaceModel, image: np.ndarray, landmarks: np.ndarray,
                     identity: np.ndarray, threshold: float) -> Verdict:
    embedding, source = embed_frame(face_model, image, landmarks)
    if embedding is None:
        return Verdict(None, False, "no face found", source)
    score = float(face_model.id_score(identity, embedding))
    if score < threshold:
        how = "detected face" if source == "detector" else "face at the known landmarks (none detected)"
        return Verdict(score, False, f"identity {score:.3f} below {threshold} ({how})", source)
    return Verdict(score, True, None, source)
