#!/usr/bin/env python
"""What the ``cpu`` preset's 2D backends make of real portraits: contact sheets and identity.

    python benchmarks/cpu_backends_report.py [--json] [--quick] [--input FOLDER]
                                             [--output out/bench/cpu_backends] [--preset cpu]

For each portrait: detect and align (dlib), edit every attribute level and the exact morphs
between adjacent levels, animate each with the motion script, and score every frame's identity
against the aligned source (detector landmarks, else the animator's known landmarks). Writes
``OUTPUT/<name>_contact.png`` (rows: source, edits, morphs; columns: script frames; a red frame marks a
frame the identity filter would drop, a yellow corner one scored at the known landmarks) and
prints JSON lines (figure, value, unit, config; with --json, a table otherwise): the fraction of
frames kept per attribute, the mean identity distance per yaw bucket, the landmark-fallback share
and per-call CPU times (process time: a busy shared machine does not inflate them). The subject,
attribute and yaw bucket of a figure are in its config.
``--input`` defaults to examples/portraits; when the folder does not exist the package copies of
the astronaut and Grace Hopper portraits are used. ``--quick``: the first two portraits and a 4-frame motion script (the
preset's sizes otherwise), about half a minute. No Ray needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = ROOT / "examples" / "portraits"
DEFAULT_OUTPUT = ROOT / "out" / "bench" / "cpu_backends"
QUICK_PORTRAITS = 2
QUICK_FRAMES = 4
AS_JSON = [True]  # set by main: JSON lines or a table


def emit(figure: str, value: float, unit: str, config: dict, **labels) -> None:
    record = {"figure": figure, "value": round(float(value), 4), "unit": unit, "config": {**config, **labels}}
    if AS_JSON[0]:
        print(json.dumps(record), flush=True)
    else:
        where = " ".join(f"{k}={v}" for k, v in labels.items())
        print(f"{figure:<28} {record['value']:>10} {unit:<26} {where}", flush=True)


def default_portraits() -> list[tuple[str, np.ndarray]]:
    import matplotlib
    from PIL import Image
    from skimage import data

    grace = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [("astronaut", data.astronaut()), ("grace_hopper", np.asarray(Image.open(grace).convert("RGB")))]


def folder_portraits(folder: Path) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as im:
                out.append((path.stem, np.asarray(im.convert("RGB"))))
    return out


def rows_for(cfg) -> list[tuple[str, str, object, object, float]]:
    """(row label, attribute, spec_from, spec_to, alpha): the source, every edit level, and the
    morphs between adjacent levels (edit 0 = the source) at the configured alphas."""
    rows = [("source", "source", None, None, 0.0)]
    for attr in cfg.synth.attributes:
        levels = [None] + list(attr.edits)
        for i, spec in enumerate(attr.edits, start=1):
            rows.append((f"{attr.name}:{spec.label}", attr.name, None, spec, 1.0))
            for alpha in cfg.synth.morph_alphas:
                a = levels[i - 1].label if levels[i - 1] else "source"
                rows.append((f"{attr.name}:{a}>{spec.label}@{alpha:g}", attr.name, levels[i - 1], spec, alpha))
    return rows


def label_tile(text: str, height: int, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(text.replace(">", ">\n").replace("@", "\n@").split("\n")):
        draw.text((4, 4 + 12 * i), line, fill=(0, 0, 0))
    return np.asarray(tile)


def mark(frame: np.ndarray, dropped: bool, fallback: bool) -> np.ndarray:
    out = frame.copy()
    if dropped:
        out[:2], out[-2:], out[:, :2], out[:, -2:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    if fallback:
        out[2:8, 2:8] = (255, 220, 0)
    return out


def report_subject(name: str, image: np.ndarray, cfg, face_model, output: Path, info: dict) -> None:
    from PIL import Image

    from perse_ray.faces import align, embed_frame
    from perse_ray.synth.classical import ClassicalAnimator, ClassicalEditor, ExactMorpher
    from perse_ray.geometry import move_landmarks
    from perse_ray.synth.motion import motion_script

    faces = face_model.detect(image)
    emit("faces_detected", len(faces), "count", info, subject=name)
    if not faces:
        return
    size = cfg.synth.resolution
    portrait, landmarks, _ = align(image, faces[0], size)
    identity, how = embed_frame(face_model, portrait, landmarks)
    editor, animator, morpher = ClassicalEditor(cfg), ClassicalAnimator(cfg), ExactMorpher(cfg)
    script = motion_script(cfg.synth.motion)
    threshold = cfg.faces.id_threshold
    range_ = cfg.synth.motion.yaw_range
    edges = np.array([-1.0, -0.5, -1 / 6, 1 / 6, 0.5, 1.0]) * range_
    kept: dict[str, list[bool]] = {}
    by_bucket: dict[int, list[float]] = {}
    fallbacks, times = [], {"edit": [], "animate": [], "morph": [], "identity": []}
    seed = cfg.synth.seed  # one seed for every level and morph of an attribute: morphs meet their ends
    sheet = []
    for label, attribute, spec_from, spec_to, alpha in rows_for(cfg):
        t = time.process_time()
        edited, mask = portrait, None
        if attribute != "source" and alpha == 1.0:
            edited, mask = editor.edit(portrait, landmarks, attribute, spec_to, seed)
            times["edit"].append(time.process_time() - t)
        row = [label_tile(label, size, 2 * size)]
        for frame in script:
            t = time.process_time()
            if alpha == 1.0 or attribute == "source":
                out, frame_lm, _, _ = animator.animate(edited, landmarks, frame, seed, mask)
                times["animate"].append(time.process_time() - t)
            else:
                out, _ = morpher.morph(portrait, landmarks, attribute, spec_from, spec_to, alpha, frame,
                                       None, None, seed)
                times["morph"].append(time.process_time() - t)
                frame_lm = move_landmarks(landmarks, frame, size, animator.camera)
            t = time.process_time()
            emb, source = embed_frame(face_model, out, frame_lm)
            times["identity"].append(time.process_time() - t)
            score = face_model.id_score(identity, emb) if emb is not None else 0.0
            ok = emb is not None and score >= threshold
            kept.setdefault(attribute, []).append(ok)
            fallbacks.append(source == "landmarks")
            if emb is not None:
                bucket = int(np.clip(np.searchsorted(edges, frame.yaw, side="right") - 1, 0, len(edges) - 2))
                by_bucket.setdefault(bucket, []).append(float(np.linalg.norm(identity - emb)))
            row.append(mark(out, not ok, source == "landmarks"))
        sheet.append(np.concatenate(row, axis=1))
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{name}_contact.png"
    Image.fromarray(np.concatenate(sheet, axis=0)).save(path)
    emit("source_identity_from", 1.0 if how == "detector" else 0.0, "detector=1", info, subject=name)
    for attribute, flags in kept.items():
        emit("kept_fraction", np.mean(flags), "ratio", info, subject=name, attribute=attribute)
    for b in sorted(by_bucket):
        emit("id_distance_mean", np.mean(by_bucket[b]), "embedding L2", info, subject=name,
             yaw_bucket=f"[{edges[b]:.0f},{edges[b + 1]:.0f})")
    emit("landmark_fallback_fraction", np.mean(fallbacks), "ratio", info, subject=name)
    for key, values in times.items():
        if values:
            emit(f"{key}_ms", 1000 * np.median(values), "ms CPU (median per call)", info, subject=name,
                 calls=len(values))
    print(f"# {name}: {path}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--json", action="store_true", help="print JSON lines (figure, value, unit, config)")
    parser.add_argument("--quick", action="store_true",
                        help=f"the first {QUICK_PORTRAITS} portraits, a {QUICK_FRAMES}-frame motion script")
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT,
                        help="folder of portraits (default: examples/portraits)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="folder for the contact sheets (default: out/bench/cpu_backends)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    AS_JSON[0] = args.json

    from perse_ray.config import load_config
    from perse_ray.faces import load_face_model

    overrides = ([f"synth.motion.num_frames={QUICK_FRAMES}"] if args.quick else []) + args.set
    cfg = load_config(args.preset, overrides)
    portraits = (folder_portraits(args.input) if args.input is not None and args.input.is_dir()
                 else default_portraits())
    if args.quick:
        portraits = portraits[:QUICK_PORTRAITS]
    face_model = load_face_model(cfg.faces)
    info = {"preset": args.preset, "overrides": overrides, "quick": args.quick, "resolution": cfg.synth.resolution,
            "frames": cfg.synth.motion.num_frames, "id_threshold": cfg.faces.id_threshold,
            "faces": face_model.name}
    print(f"# contact sheets in {args.output}", file=sys.stderr, flush=True)
    for name, image in portraits:
        report_subject(name, image, cfg, face_model, args.output, info)


if __name__ == "__main__":
    main()
