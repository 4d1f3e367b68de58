"""Many distinct portraits from the few real faces the project has, for scale runs.

    paths = write_scale_portraits("out/portraits-400", 400, load_face_model(cfg.faces), cfg.faces)

The base faces are real photographs: the example portraits (minus the cat), insightface's sample
portrait and every face in its sample group photo. Each output is one base face, cropped with a
random margin and offset, maybe mirrored, rotated a few degrees, shifted in colour and brightness,
with its border tinted (a background shift), then saved as PNG. Different bytes make a different
subject for ingest (it deduplicates by content hash), and each variant is kept only if the
project's own face choice (``synth.ingest.choose_face``) accepts it, so ingest finds a face in
every one. Deterministic for a seed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from perse_ray.config import FacesConfig
from perse_ray.synth.ingest import choose_face

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "portraits"
SIDE = 160  # pixels of every output: detection stays quick, and the face stays large enough


def _insightface_images() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "images"
    return folder if folder.is_dir() else None


def base_faces(face_model, cfg: FacesConfig) -> list[tuple[str, np.ndarray, tuple[float, float, float, float]]]:
    """(name, RGB image, face box) of every real face available: one per portrait, each in a group photo."""
    sources = [p for p in sorted(EXAMPLES.iterdir()) if p.suffix in (".png", ".jpg") and "cat" not in p.name]
    extra = _insightface_images()
    if extra is not None:
        sources += [extra / "Tom_Hanks_54745.png", extra / "t1.jpg"]
    faces = []
    for path in sources:
        if not path.is_file():
            continue
        image = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        found = face_model.detect(image)
        if path.name == "t1.jpg":  # a group photo: every face it holds is a base face
            found = [f for f in found if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= 24]
        else:
            best, _ = choose_face(found, image.shape, cfg)
            found = [best] if best is not None else []
        faces += [(f"{path.stem}-{i}", image, tuple(map(float, f.box))) for i, f in enumerate(found)]
    if not faces:
        raise RuntimeError("no base face found for scale portraits")
    return faces


def vary(image: np.ndarray, box: tuple[float, float, float, float], rng: np.random.Generator) -> np.ndarray:
    """One variant of the face in ``box``: crop, mirror, rotation, colour and background shifts."""
    x0, y0, x1, y1 = box
    size = max(x1 - x0, y1 - y0)
    half = size * rng.uniform(1.0, 1.5)  # the face fills 33-50 % of the crop's side
    cx = (x0 + x1) / 2 + rng.uniform(-0.12, 0.12) * size
    cy = (y0 + y1) / 2 + rng.uniform(-0.12, 0.12) * size
    im = Image.fromarray(image).crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half)))
    im = im.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR, fillcolor=tuple(
        int(c) for c in rng.integers(0, 256, 3)))
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    im = im.resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(im, dtype=np.float32)
    pixels = pixels * rng.uniform(0.85, 1.15, 3) + rng.uniform(-12, 12)  # white balance, brightness
    yy, xx = np.mgrid[:SIDE, :SIDE]
    border = np.clip((np.hypot(yy - SIDE / 2, xx - SIDE / 2) - 0.42 * SIDE) / (0.1 * SIDE), 0, 1)[..., None]
    pixels = pixels * (1 - 0.5 * border) + 0.5 * border * rng.uniform(0, 255, 3)  # the background's tint
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_scale_portraits(folder: str | Path, n: int, face_model, cfg: FacesConfig, seed: int = 0,
                          max_tries: int = 4) -> list[Path]:
    """Write ``n`` distinct portraits (``scale-00000.png``…) into ``folder``; their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = base_faces(face_model, cfg)
    written: list[Path] = []
    for i in range(n):
        name, image, box = bases[i % len(bases)]
        for _ in range(max_tries):
            variant = vary(image, box, rng)
            face, _ = choose_face(face_model.detect(variant), variant.shape, cfg)
            if face is not None:
                break
        else:
            raise RuntimeError(f"no detectable variant of base face {name} in {max_tries} tries")
        buf = io.BytesIO()
        Image.fromarray(variant).save(buf, format="PNG")
        path = folder / f"scale-{i:05d}.png"
        path.write_bytes(buf.getvalue())
        written.append(path)
    return written
