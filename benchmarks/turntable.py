#!/usr/bin/env python
"""Head turns of the classical animator on real portraits: a turntable strip, sharpness and identity.

    python benchmarks/turntable.py [--json] [--quick] [--input FOLDER] [--output out/bench/turntable]
                                   [--preset cpu] [--max-yaw 45] [--steps 7]

For each portrait with a face: detect and align (dlib), animate the source at yaws evenly spaced
over [-max_yaw, +max_yaw] (pitch 0, no expression), and write ``OUTPUT/turntable.png`` (one row per
portrait, one column per yaw). Prints JSON lines (a table without --json) per portrait and |yaw|:
- ``id_distance``: dlib embedding distance to the aligned source (the identity filter's figure);
- ``sharpness_near`` / ``sharpness_far``: mean gradient magnitude of the frame's cheek on the side
  the turn reveals (near: the image side the camera moves to) and on the side it turns away, over
  the same cheek's in the front view (1 = as sharp as the portrait; a stretched cheek is smoother,
  a compressed one sharper).
Then the same yaws against a true turn (``perse_ray/bench/turn_truth.py``): the mesh ground-truth
head's front render is animated and compared with that head rendered at each yaw, per |yaw|:
- ``truth_psnr_animated`` / ``truth_psnr_unmoved``: the animator's frame, and the unmoved front
  render (the do-nothing baseline), against the true turn, PSNR over the head;
- ``truth_identity_true_turn`` / ``truth_identity_animated``: the face model's id_score (the
  evaluation's ``identity_yaw_*`` scale) of the true turn and of the animator's frame against the
  front render. The true turn's figure is what a perfect synthesis would score at that yaw: what
  it loses with |yaw| belongs to the face model (a wrong frame can score above it).
The picture ``OUTPUT/turn_truth.png`` has the true turns over the animator's frames.
``--quick``: the first two portraits, 5 yaws. No Ray needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
ROOT = Path(__file__).resolve().parent.parent
AS_JSON = [True]


def emit(figure: str, value: float, unit: str, config: dict, **labels) -> None:
    record = {"figure": figure, "value": round(float(value), 4), "unit": unit, "config": {**config, **labels}}
    if AS_JSON[0]:
        print(json.dumps(record), flush=True)
    else:
        where = " ".join(f"{k}={v}" for k, v in labels.items())
        print(f"{figure:<22} {record['value']:>8} {unit:<30} {where}", flush=True)


def cheek_masks(landmarks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image-left and image-right cheeks: between the jaw line (0-4, 12-16), the eye's lower lid
    and the nose/mouth side."""
    import cv2

    lm = np.asarray(landmarks, np.float64)
    left = np.concatenate([lm[[1, 2, 3, 4]], lm[[48, 31]], lm[[39, 40, 41, 36]]])
    right = np.concatenate([lm[[15, 14, 13, 12]], lm[[54, 35]], lm[[42, 47, 46, 45]]])
    out = []
    for poly in (left, right):
        m = np.zeros((size, size), np.uint8)
        cv2.fillPoly(m, [np.round(poly * 16).astype(np.int32)], 1, shift=4)
        out.append(m.astype(bool))
    return out[0], out[1]


def gradient_magnitude(image: np.ndarray) -> np.ndarray:
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return np.hypot(gx, gy)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="the first two portraits, 5 yaws")
    p.add_argument("--input", type=Path, default=ROOT / "examples" / "portraits")
    p.add_argument("--output", type=Path, default=ROOT / "out" / "bench" / "turntable")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--max-yaw", type=float, default=45.0)
    p.add_argument("--steps", type=int, default=7)
    args = p.parse_args(argv)
    AS_JSON[0] = args.json
    if args.steps < 2 or not 0 < args.max_yaw <= 90:
        p.error("--steps must be >= 2 and --max-yaw in (0, 90]")
    from PIL import Image

    from perse_ray.config import load_config
    from perse_ray.faces import align, embed_frame, load_face_model
    from perse_ray.synth.classical import ClassicalAnimator
    from perse_ray.synth.motion import MotionFrame

    cfg = load_config(args.preset)
    size = cfg.synth.resolution
    faces = load_face_model(cfg.faces)
    animator = ClassicalAnimator(cfg)
    steps = 5 if args.quick else args.steps
    yaws = np.linspace(-args.max_yaw, args.max_yaw, steps)
    info = {"preset": args.preset, "resolution": size, "max_yaw": args.max_yaw, "steps": steps,
            "quick": args.quick, "faces": faces.name}
    paths = sorted(q for q in args.input.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
    rows, done = [], 0
    for path in paths:
        if args.quick and done == 2:
            break
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        found = faces.detect(image)
        if not found:
            continue
        done += 1
        portrait, lm, _ = align(image, found[0], size)
        source_emb, _ = embed_frame(faces, portrait, lm)
        front_grad = gradient_magnitude(portrait)
        front_cheeks = cheek_masks(lm, size)
        row, by_abs = [], {}
        for i, yaw in enumerate(yaws):
            frame = MotionFrame(i, float(yaw), 0.0, {})
            out, moved, _, _ = animator.animate(portrait, lm, frame, 0)
            row.append(out)
            emb, _ = embed_frame(faces, out, moved)
            grad = gradient_magnitude(out)
            cheeks = cheek_masks(moved, size)
            near = 1 if yaw > 0 else 0  # +yaw: the camera moves to the image right
            sharp = [grad[cheeks[s]].mean() / max(front_grad[front_cheeks[s]].mean(), 1e-6) for s in (near, 1 - near)]
            entry = by_abs.setdefault(round(abs(float(yaw)), 1), {"id": [], "near": [], "far": []})
            entry["id"].append(float(np.linalg.norm(source_emb - emb)) if emb is not None else np.nan)
            entry["near"].append(sharp[0])
            entry["far"].append(sharp[1])
        rows.append(np.concatenate(row, axis=1))
        for a, e in sorted(by_abs.items()):
            labels = {"subject": path.stem, "abs_yaw": a}
            emit("id_distance", np.nanmean(e["id"]), "embedding L2 (dlib)", info, **labels)
            emit("sharpness_near", np.mean(e["near"]), "ratio to front view", info, **labels)
            emit("sharpness_far", np.mean(e["far"]), "ratio to front view", info, **labels)
    if not rows:
        raise SystemExit(f"no portrait with a face in {args.input}")
    args.output.mkdir(parents=True, exist_ok=True)
    strip = args.output / "turntable.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(strip)
    print(f"# turntable strip: {strip} (yaws {', '.join(f'{y:g}' for y in yaws)})", file=sys.stderr)

    from perse_ray.bench.mesh_head import MeshHead
    from perse_ray.bench.turn_truth import score_turns
    from perse_ray.camera import Camera

    scores, picture = score_turns(MeshHead(), faces, yaws, size, Camera(cfg.render.fov_deg, cfg.render.distance))
    for a in sorted({round(abs(s.yaw), 1) for s in scores} - {0.0}):  # the front view is the portrait itself
        both = [s for s in scores if round(abs(s.yaw), 1) == a]
        labels = {"subject": "mesh-head", "abs_yaw": a, "detected": sum(s.detected for s in both)}
        for figure, key, unit in (("truth_psnr_animated", "psnr_animated", "dB vs the true turn"),
                                  ("truth_psnr_unmoved", "psnr_unmoved", "dB vs the true turn"),
                                  ("truth_identity_true_turn", "identity_truth", "id_score vs front"),
                                  ("truth_identity_animated", "identity_animated", "id_score vs front")):
            emit(figure, np.mean([getattr(s, key) for s in both]), unit, info, **labels)
    Image.fromarray(picture).save(args.output / "turn_truth.png")
    print(f"# true turns over the animator's: {args.output / 'turn_truth.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
