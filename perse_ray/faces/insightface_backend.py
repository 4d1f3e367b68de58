"""insightface face backend: SCRFD detection + 1k3d68 landmarks + ArcFace identity.

``faces.model`` is a model pack: a local folder of ONNX files, or a pack name (``buffalo_l``)
looked up in insightface's own model folder ``~/.insightface/models/<name>``. Nothing is
downloaded: a missing pack is an error naming where it was looked for. Each file is loaded with
``insightface.model_zoo.get_model`` (no ``FaceAnalysis``), which routes it by its ONNX shapes.
With ``faces.identity_model`` set, ``load_face_model`` puts that ArcFace on top and the pack's own
recognition model is not needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from perse_ray.config import FacesConfig
from perse_ray.faces import Face
from perse_ray.faces.arcface import ArcFaceEmbedder, onnx_providers
from perse_ray.models import ModelNotFoundError, expand_model_ref, is_local_ref

DET_SIZE = (640, 640)  # SCRFD input for models with a dynamic input size
DET_THRESHOLD = 0.5


def pack_dir(ref: str) -> Path:
    name = expand_model_ref(ref)
    folder = Path(name) if is_local_ref(name) else Path("~/.insightface/models").expanduser() / name
    if not folder.is_dir():
        raise ModelNotFoundError(f"insightface model pack {ref!r} not found at {folder} (copy the pack "
                                 f"there, or set faces.model to a local folder of ONNX files)")
    return folder


class InsightFaceModel:
    def __init__(self, cfg: FacesConfig):
        from insightface import model_zoo

        folder = pack_dir(cfg.model)
        models = {}
        for path in sorted(folder.glob("*.onnx")):
            model = model_zoo.get_model(str(path), providers=onnx_providers())
            if model is not None:
                models.setdefault(model.taskname, (str(path), model))
        needed = ["detection", "landmark_3d_68"] + ([] if cfg.identity_model else ["recognition"])
        missing = [t for t in needed if t not in models]
        if missing:
            raise ModelNotFoundError(f"insightface pack {folder} has no {', '.join(missing)} model "
                                     f"(found: {', '.join(sorted(models)) or 'none'})")
        self.detector = models["detection"][1]
        self.detector.prepare(-1 if "CUDAExecutionProvider" not in onnx_providers() else 0,
                              input_size=DET_SIZE, det_thresh=DET_THRESHOLD)
        self.landmarker = models["landmark_3d_68"][1]
        self.embedder = ArcFaceEmbedder(*models["recognition"]) if "recognition" in models else None
        self.name = f"insightface:{folder.name}"

    def detect(self, image: np.ndarray) -> list[Face]:
        from insightface.app.common import Face as InsightFace

        bgr = np.ascontiguousarray(image[..., ::-1])
        boxes, _ = self.detector.detect(bgr, input_size=DET_SIZE)
        faces = []
        for box in boxes:
            found = InsightFace(bbox=box[:4], det_score=float(box[4]))
            landmarks = self.landmarker.get(bgr, found)[:, :2].astype(np.float32)
            faces.append(Face(tuple(float(v) for v in box[:4]), float(box[4]), landmarks))
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        if self.embedder is None:
            raise ModelNotFoundError("this insightface pack has no recognition model; set faces.identity_model")
        return self.embedder.embed(image, face.landmarks)

    def id_score(self, a: np.ndarray, b: np.ndarray) -> float:
        return ArcFaceEmbedder.id_score(a, b)
