#!/usr/bin/env python
"""Edits after training, measured against exact renders of the procedural head.

    python benchmarks/edit_bench.py [--json] [--quick] [--preset cpu] [--set KEY=VALUE ...]
                                    [--level-steps N] [--attribute-steps N] [--picture out.png]

Trains a base avatar on the procedural head (perse_ray/bench/procedural.py) with the preset's
attributes, then adds, with the real ``perse_ray.train.extend.extend_avatar`` (frames from the head
through the same motion script and cameras):

- a **new level**: the head's spare hair level (``HAIR_COLORS[-1]``, a colour no trained level is
  near), against a **comparison avatar** trained in the same run with that level from the start;
- a **new attribute**: skin tone (``SKIN_TONES``), which the preset's layout lacks.

JSON lines (figure, value, unit, config): held-out-view PSNR of the new level (added and from the
start, and their gap); the old levels' held-out-view PSNR before and after; whether renders with
the attribute at its source are bit-identical (mismatching tensors over random latents, 0 = all
equal); the new attribute's held-out-view PSNR at its edits and at its midpoints (α = 0.5), its
bit-identity with the slider at 0; fit seconds over the base's training seconds. ``--picture``
writes a strip: ground truth / base / new level / new attribute at three held-out yaws.
``--quick`` shrinks everything (the ``cpu-smoke`` sizes, a few hundred steps): a check that it
runs, in about a minute; its scores say nothing about quality.

``--transfer`` measures instead the classical "from a portrait" level on real faces: the
astronaut's avatar (the preset's cpu stages on examples/portraits/astronaut.png, trained in this
process) gets the hair of Grace Hopper's portrait, as ``jobs/edit_avatar.py --from-portrait`` adds
it. Figures: the CIE76 distance of the mean Lab colour in the hair mask (``regions.hair_probability``
of the aligned portrait) to the reference's, for the 2D edit, the avatar's source level and its new
level (frontal renders at the synthesis resolution), and the dlib identity of those renders against
the subject's portrait, with the same-person threshold (``faces.id_threshold``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import emit  # noqa: E402

QUICK = ["synth.resolution=64", "synth.motion.num_frames=8", "synth.combined_frames=2", "render.width=32",
         "render.height=32", "avatar.num_gaussians=1500", "train.steps=300", "machine.log_every=100",
         "machine.checkpoint_every=100000"]
POSES = ((-33.0, 6.0), (4.0, -7.0), (36.0, 6.0))


def view_psnr(scorer, avatar, values: dict[str, float]) -> float:
    from perse_ray.bench.ground_truth import HELDOUT_PITCHES, HELDOUT_YAWS

    cases = [(values, {}, y, p) for y in HELDOUT_YAWS for p in HELDOUT_PITCHES]
    return scorer.compare(avatar, cases)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a check that it runs, no quality claim")
    p.add_argument("--level-steps", type=int, default=None, help="fit steps of the new level (default: steps/6)")
    p.add_argument("--attribute-steps", type=int, default=None, help="fit steps of the new attribute (default: steps/5)")
    p.add_argument("--transfer", action="store_true", help="hair from Grace Hopper's portrait on the astronaut's avatar")
    p.add_argument("--picture", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import copy

    import numpy as np

    from perse_ray.avatar.extend import decode_mismatches
    from perse_ray.bench.ground_truth import Scorer, frames_from_head, make_head
    from perse_ray.bench.procedural import SKIN_TONES
    from perse_ray.config import AttributeSpec, EditSpec, load_config
    from perse_ray.train.extend import Extension, extend_avatar
    from perse_ray.train.loop import train_avatar

    overrides = (QUICK if args.quick else []) + args.set
    cfg = load_config(args.preset, overrides)
    if args.transfer:
        return transfer(cfg, {"preset": args.preset, "overrides": overrides}, args)
    head = make_head("gaussian")
    hair = next(a for a in cfg.synth.attributes if a.name == "hair")
    spare = len(hair.edits) + 1  # the level index the spare key takes
    if spare >= head.num_levels("hair"):
        raise SystemExit(f"the preset trains {spare} hair levels: the head has no spare one left")
    info = {"preset": args.preset, "overrides": overrides, "resolution": f"{cfg.render.width}x{cfg.render.height}",
            "num_gaussians": cfg.avatar.num_gaussians, "steps": cfg.train.steps}
    progress = not args.no_progress
    frames_fn = lambda c, _subject: frames_from_head(head, c)  # noqa: E731 - the head stands in for synthesis

    def train(c, name):
        t = time.perf_counter()
        result = train_avatar(frames_from_head(head, c), c, progress=progress, subject_id=name)
        return result.avatar, time.perf_counter() - t

    base, base_seconds = train(cfg, "procedural-head")
    emit("base_train_seconds", base_seconds, "s", info, args.json)
    with_spare = copy.deepcopy(cfg)
    next(a for a in with_spare.synth.attributes if a.name == "hair").edits.append(EditSpec("teal"))
    comparison, comparison_seconds = train(with_spare, "procedural-head-from-start")
    emit("comparison_train_seconds", comparison_seconds, "s", info, args.json)

    level_steps = args.level_steps or max(1, cfg.train.steps // 6)
    t = time.perf_counter()
    grown = extend_avatar(base, {}, Extension("level", "hair", (EditSpec("teal"),), {"head_key": spare}),
                          steps=level_steps, progress=progress, frames_fn=frames_fn)
    level_seconds = time.perf_counter() - t
    scorer = Scorer(head, with_spare, cfg.machine.render_backend)
    cfg_level = {**info, "edit": "new level", "attribute": "hair", "level": spare, "fit_steps": level_steps}
    added, from_start = view_psnr(scorer, grown, {"hair": float(spare)}), view_psnr(scorer, comparison, {"hair": float(spare)})
    emit("new_level_psnr_heldout_views", added, "dB", cfg_level, args.json)
    emit("new_level_psnr_heldout_views_trained_from_start", from_start, "dB", cfg_level, args.json)
    emit("new_level_gap_to_trained_from_start", from_start - added, "dB", cfg_level, args.json)
    for k in range(1, spare):
        before, after = view_psnr(scorer, base, {"hair": float(k)}), view_psnr(scorer, grown, {"hair": float(k)})
        emit(f"old_level_{k}_psnr_heldout_views_before", before, "dB", cfg_level, args.json)
        emit(f"old_level_{k}_psnr_change", after - before, "dB", cfg_level, args.json)
    emit("new_level_other_renders_mismatching", len(decode_mismatches(base, grown, {"hair": 0.0})), "latents",
         cfg_level, args.json)
    fit = grown.meta["edits"][-1]["seconds_fit"]
    emit("new_level_fit_seconds", fit, "s", cfg_level, args.json)
    emit("new_level_fit_over_base_training", fit / base_seconds, "ratio", cfg_level, args.json)
    emit("new_level_seconds_total", level_seconds, "s", cfg_level, args.json)

    attribute_steps = args.attribute_steps or max(1, cfg.train.steps // 5)
    skin_edits = tuple(EditSpec(label) for label in ("tan", "pale")[: len(SKIN_TONES) - 1])
    t = time.perf_counter()
    skinned = extend_avatar(base, {}, Extension("attribute", "skin", skin_edits), steps=attribute_steps,
                            progress=progress, frames_fn=frames_fn)
    attribute_seconds = time.perf_counter() - t
    with_skin = copy.deepcopy(cfg)
    with_skin.synth.attributes.append(AttributeSpec("skin", list(skin_edits)))
    scorer = Scorer(head, with_skin, cfg.machine.render_backend)
    cfg_attr = {**info, "edit": "new attribute", "attribute": "skin", "fit_steps": attribute_steps}
    edits = [view_psnr(scorer, skinned, {"skin": float(k)}) for k in range(1, len(skin_edits) + 1)]
    mids = [view_psnr(scorer, skinned, {"skin": k + 0.5}) for k in range(len(skin_edits))]
    emit("new_attribute_psnr_heldout_views", float(np.mean(edits)), "dB", cfg_attr, args.json)
    emit("new_attribute_psnr_midpoints", float(np.mean(mids)), "dB", cfg_attr, args.json)
    emit("new_attribute_slider_0_mismatching", len(decode_mismatches(base, skinned, {"skin": 0.0})), "latents",
         cfg_attr, args.json)
    fit = skinned.meta["edits"][-1]["seconds_fit"]
    emit("new_attribute_fit_seconds", fit, "s", cfg_attr, args.json)
    emit("new_attribute_fit_over_base_training", fit / base_seconds, "ratio", cfg_attr, args.json)
    emit("new_attribute_seconds_total", attribute_seconds, "s", cfg_attr, args.json)

    if args.picture:
        write_picture(args.picture, scorer, head, base, grown, skinned, spare)
    return 0


def transfer(cfg, info: dict, args) -> int:
    import numpy as np

    from perse_ray.config import EditSpec
    from perse_ray.faces import embed_frame, load_face_model
    from perse_ray.pipeline import synthesize_subject
    from perse_ray.portraits import candidate_for_file, decode_png
    from perse_ray.synth.classical.edits import EDITS
    from perse_ray.synth.classical.measure import hair_lab, lab_distance, mean_lab, transfer_params
    from perse_ray.synth.classical.regions import hair_probability
    from perse_ray.synth.ingest import ingest_subject
    from perse_ray.train.extend import Extension, extend_avatar
    from perse_ray.train.loop import train_avatar

    portraits = Path(__file__).resolve().parent.parent / "examples" / "portraits"
    faces = load_face_model(cfg.faces)

    def ingest(name: str) -> dict:
        row = ingest_subject(candidate_for_file(portraits / name), faces, cfg)
        if row["status"] != "ok":
            raise SystemExit(f"{name}: {row['reason']}")
        return row

    subject, reference = ingest("astronaut.png"), ingest("grace_hopper.jpg")
    portrait, landmarks = decode_png(subject["portrait_png"]), np.asarray(subject["landmarks"], np.float32)
    t = time.perf_counter()
    base = train_avatar(synthesize_subject(cfg, subject), cfg, progress=not args.no_progress,
                        subject_id=subject["subject_id"]).avatar
    info = {**info, "subject": "astronaut", "reference": "grace_hopper", "resolution": cfg.synth.resolution,
            "base_train_seconds": round(time.perf_counter() - t, 1)}
    params = transfer_params("hair", portrait, landmarks, decode_png(reference["portrait_png"]),
                             np.asarray(reference["landmarks"], np.float32))
    steps = args.level_steps or max(1, cfg.train.steps // 6)
    grown = extend_avatar(base, subject, Extension("level", "hair", (EditSpec("grace-hopper", params=params),)),
                          steps=steps, progress=not args.no_progress)
    info["params"], info["fit_steps"] = params, steps
    target = hair_lab(decode_png(reference["portrait_png"]), np.asarray(reference["landmarks"], np.float32))
    mask = hair_probability(portrait, landmarks)
    size = cfg.synth.resolution
    identity = np.asarray(subject["identity"], np.float32)
    edited, _ = EDITS["hair"](portrait, landmarks, params, 0)
    emit("transfer_hair_lab_distance_portrait", lab_distance(mean_lab(portrait, mask), target), "CIE76", info, args.json)
    emit("transfer_hair_lab_distance_2d_edit", lab_distance(mean_lab(edited, mask), target), "CIE76", info, args.json)
    level = len(grown.layout.attribute("hair").edit_labels) - 1
    for name, value in (("source_level", 0.0), ("new_level", float(level))):
        rgb = grown.render(grown.latent({"hair": value}), [(0.0, 0.0)], size, size)[0, 0]
        image = np.round(rgb.numpy() * 255).astype(np.uint8)
        emit(f"transfer_hair_lab_distance_{name}", lab_distance(mean_lab(image, mask), target), "CIE76", info,
             args.json)
        embedding, how = embed_frame(faces, image, landmarks)
        score = None if embedding is None else float(faces.id_score(identity, embedding))
        emit(f"transfer_identity_{name}", score, "cosine", {**info, "found_by": how,
                                                             "same_person_threshold": cfg.faces.id_threshold}, args.json)
    return 0


def write_picture(path: Path, scorer, head, base, grown, skinned, spare: int) -> None:
    """Rows: ground truth, then the avatar, for base / new level / new attribute; three yaws each."""
    import numpy as np
    from PIL import Image

    tiles = []
    for avatar, values in ((base, {}), (grown, {"hair": float(spare)}), (skinned, {"skin": 1.0})):
        truth = [scorer.target(values, {}, y, p).numpy() for y, p in POSES]
        ours = [scorer.predict(avatar, values, {}, y, p).clamp(0, 1).numpy() for y, p in POSES]
        tiles.append(np.concatenate([np.concatenate(truth, 1), np.concatenate(ours, 1)], 0))
    strip = np.concatenate(tiles, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(strip * 255).astype(np.uint8)).save(path)


if __name__ == "__main__":
    sys.exit(main())
