"""ArcFace identity embeddings from an insightface ONNX model, on the standard 5-point crop.

``ArcFaceEmbedder(path)`` loads any insightface recognition ONNX (a real ``w600k_r50.onnx`` or the
tiny one from ``perse_ray.models.tiny``) through ``insightface.model_zoo.get_model``. The crop is
the standard ArcFace 112x112 similarity alignment of 5 points, derived from the iBUG-68 landmarks
so every face backend (dlib or insightface) embeds the same way. ``id_score`` is the cosine
similarity clipped to [0, 1]: ArcFace cosines of different people sit near 0, of one person
around 0.4-0.8, so thresholds keep their usual meaning (the gpu preset uses 0.35).
"""

from __future__ import annotations

import numpy as np

from perse_ray.models import ModelNotFoundError, resolve_model_ref


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """ArcFace's 5 points (image-left eye, image-right eye, nose tip, mouth corners) from 68 (or 5)."""
    lm = np.asarray(landmarks, dtype=np.float32)
    if lm.shape == (5, 2):
        return lm
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks must be [68, 2] or [5, 2], got {lm.shape}")
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]).astype(np.float32)


def onnx_providers() -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def load_insightface_onnx(ref: str, taskname: str):
    """``model_zoo.get_model`` on a resolved path, checked to be the expected kind of model."""
    from insightface import model_zoo

    path = resolve_model_ref(ref)
    if not path.endswith(".onnx"):
        raise ModelNotFoundError(f"model {ref!r}: expected an .onnx file, got {path}")
    model = model_zoo.get_model(path, providers=onnx_providers())
    if model is None or model.taskname != taskname:
        got = "an unrecognized model" if model is None else model.taskname
        raise ModelNotFoundError(f"model {ref!r} is {got}, not a {taskname} model")
    return model


class ArcFaceEmbedder:
    """Embeds a face given its landmarks; one ONNX session per instance.

    ``model``: the already-loaded ArcFaceONNX for ``path`` (a model pack loader routes each file
    once); otherwise ``path`` is loaded here.
    """

    def __init__(self, path: str, model=None):
        self.model = model if model is not None else load_insightface_onnx(path, "recognition")
        self.name = f"arcface:{path}"

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """L2-normalized float32 embedding of the face at ``landmarks`` in RGB uint8 ``image``."""
        from insightface.utils import face_align

        bgr = np.ascontiguousarray(image[..., ::-1])  # insightface models take OpenCV's BGR
        crop = face_align.norm_crop(bgr, five_points(landmarks), image_size=self.model.input_size[0])
        feat = self.model.get_feat(crop).reshape(-1).astype(np.float32)
        return feat / max(float(np.linalg.norm(feat)), 1e-12)

    @staticmethod
    def id_score(a: np.ndarray, b: np.ndarray) -> float:
        a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
        cos = float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
        return min(max(cos, 0.0), 1.0)
