"""dlib faces: HOG or CNN (MMOD) detection, 68-point landmarks, 128-d ResNet identity descriptor.

Model files come from the ``face_recognition_models`` package. Its ``models/`` folder is located
without importing the package, whose ``__init__`` needs ``pkg_resources`` (gone in setuptools 81).

Identity score: ``id_score = clip(1 - d / 1.2, 0, 1)`` of the Euclidean descriptor distance d.
dlib's same-person threshold d = 0.6 maps to 0.5 (``FacesConfig.id_threshold``); one person's
photos typically sit 0.2-0.45 apart (score 0.6-0.85), different people 0.7-0.9 (score 0.25-0.4).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from perse_ray.config import FacesConfig
from perse_ray.faces import Face
from perse_ray.models import ModelNotFoundError

SAME_PERSON_DISTANCE = 0.6  # dlib's documented threshold for its ResNet descriptor
MODEL_FILES = {
    "landmarks": "shape_predictor_68_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn": "mmod_human_face_detector.dat",
}


def id_score_from_distance(d: float) -> float:
    """Descriptor distance -> [0, 1]; d = 0.6 (dlib's same-person threshold) -> 0.5."""
    return float(np.clip(1.0 - d / (2 * SAME_PERSON_DISTANCE), 0.0, 1.0))


def default_models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("dlib model files: the face_recognition_models package is not "
                                 "installed (pip install face-recognition-models==0.3.0)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def model_path(models_dir: Path, key: str) -> str:
    path = Path(models_dir) / MODEL_FILES[key]
    if not path.is_file():
        raise ModelNotFoundError(f"dlib {key} model {MODEL_FILES[key]} not found in {models_dir} "
                                 "(it ships with face-recognition-models==0.3.0)")
    return str(path)


class DlibFaces:
    """One instance loads its models once; ``detect`` returns the faces scoring at least
    ``cfg.min_score``, largest first."""

    def __init__(self, cfg: FacesConfig, models_dir: str | Path | None = None):
        import dlib

        if cfg.detector not in ("hog", "cnn"):
            raise ValueError(f"unknown dlib detector {cfg.detector!r}; choices: cnn, hog")
        root = Path(models_dir) if models_dir is not None else default_models_dir()
        self._dlib = dlib
        self.upsample = int(cfg.upsample)
        self.min_score = float(cfg.min_score)
        self.detector_kind = cfg.detector
        # Check every file before loading any, so a broken install names what is missing at once.
        paths = {key: model_path(root, key) for key in ("landmarks", "descriptor")
                 + (("cnn",) if cfg.detector == "cnn" else ())}
        if cfg.detector == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(paths["cnn"])
        else:
            self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(paths["landmarks"])
        self._encoder = dlib.face_recognition_model_v1(paths["descriptor"])
        self.name = f"dlib-{cfg.detector}"

    def _rectangles(self, image: np.ndarray) -> list[tuple[object, float]]:
        if self.detector_kind == "cnn":
            found = [(d.rect, float(d.confidence)) for d in self._detector(image, self.upsample)]
        else:
            rects, scores, _ = self._detector.run(image, self.upsample, self.min_score)
            found = list(zip(rects, (float(s) for s in scores)))
        return [(rect, score) for rect, score in found if score >= self.min_score]

    def detect(self, image: np.ndarray) -> list[Face]:
        image = _rgb_u8(image)
        faces = []
        for rect, score in self._rectangles(image):
            shape = self._predictor(image, rect)
            lm = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
            faces.append(Face(box, score, lm))
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """128-d descriptor of the face through its 68 landmarks (dlib's own alignment chip)."""
        dlib = self._dlib
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        rect = dlib.rectangle(x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))
        points = [dlib.point(int(round(float(x))), int(round(float(y)))) for x, y in face.landmarks]
        shape = dlib.full_object_detection(rect, points)
        return np.asarray(self._encoder.compute_face_descriptor(_rgb_u8(image), shape), dtype=np.float32)

    def embed_from_landmarks(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """Descriptor for a face the detector misses (e.g. large yaw) but whose landmarks are known."""
        from perse_ray.faces import face_from_landmarks

        return self.embed(image, face_from_landmarks(landmarks))

    @staticmethod
    def id_score(a: np.ndarray, b: np.ndarray) -> float:
        d = float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32)))
        return id_score_from_distance(d)


def _rgb_u8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)
