"""Edits after training (jobs/edit_avatar.py, perse_ray.train.extend, perse_ray.avatar.extend).

One real cpu-smoke subject (the astronaut, dlib, the classical stages) is synthesized and trained
without Ray into a registry laid out as a build leaves it; then a new level and a new attribute
are added through the CLI. What is checked: the new part renders differently, every render that
does not use it is bit-identical (exact tensor equality), the web bundle decodes the grown
avatar as the model does, and bad input changes nothing in the registry.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from perse_ray.avatar.bundle import decode_bundle, decode_gaussians, latent
from perse_ray.avatar.extend import decode_mismatches, random_latents
from perse_ray.config import load_config
from perse_ray.registry import Registry

REPO = Path(__file__).resolve().parent.parent
PORTRAITS = REPO / "examples" / "portraits"
pytestmark = pytest.mark.slow


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "edit_avatar.py"), "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _registry_state(root: Path) -> tuple:
    """Everything an edit may write: the index and every file under the registry."""
    return ((root / "index.jsonl").read_bytes() if (root / "index.jsonl").is_file() else b"",
            sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".edit.lease" not in p.name))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """<out>/avatars (v0001 of the astronaut) and <out>/synth/frames/subject_id=…/_subject.parquet."""
    from perse_ray.faces import load_face_model
    from perse_ray.pipeline import synthesize_subject
    from perse_ray.portraits import discover_subjects
    from perse_ray.schema import table_from_rows
    from perse_ray.synth.ingest import ingest_subject
    from perse_ray.synth.write import SUBJECT_FILE, atomic_write_table
    from perse_ray.train.loop import train_avatar

    out = tmp_path_factory.mktemp("edit-build")
    folder = out / "input"
    folder.mkdir()
    shutil.copy(PORTRAITS / "astronaut.png", folder)
    cfg = load_config("cpu-smoke", ["train.steps=150"])  # enough for branches that have learned their edits
    candidate = discover_subjects(folder).candidates[0]
    subject = ingest_subject(candidate, load_face_model(cfg.faces), cfg)
    assert subject["status"] == "ok", subject["reason"]
    part = out / "synth" / "frames" / f"subject_id={subject['subject_id']}"
    part.mkdir(parents=True)
    atomic_write_table(part / SUBJECT_FILE, table_from_rows([subject], "subjects"))
    frames = synthesize_subject(cfg, subject)
    result = train_avatar(frames, cfg, progress=False, subject_id=subject["subject_id"])
    Registry(out / "avatars").put(subject["subject_id"], result.avatar)
    return out, subject["subject_id"]


def _assert_same_renders(old, new, seed: int, fixed: dict[str, float], count: int = 8):
    """At ``count`` random latents with ``fixed`` slider values, old and new decode and render to
    exactly the same tensors (attributes the old avatar lacks are left at their source)."""
    assert decode_mismatches(old, new, fixed, count, seed) == []
    known = {a.name for a in old.layout.attributes}
    for attributes, expression in random_latents(new.layout, fixed, count, seed):
        z_old = old.latent({k: v for k, v in attributes.items() if k in known}, expression)
        poses = [(-30.0, 5.0), (20.0, -5.0)]
        assert torch.equal(old.render(z_old, poses, 32, 32),
                           new.render(new.latent(attributes, expression), poses, 32, 32)), attributes


def test_a_new_level_renders_apart_and_leaves_every_other_render_bit_identical(build):
    out, sid = build
    registry = Registry(out / "avatars")
    base = registry.load(sid, "v0001")
    run = _run("--registry", str(out / "avatars"), "--subject", f"{sid}@v0001", "--attribute", "glasses",
               "--params", "rim=0.7,tint=0.1,frame_lightness=0.8", "--label", "clear", "--steps", "80")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    version = run.stdout.strip().splitlines()[-1].split("@")[1].split()[0]
    grown = registry.load(sid, version)
    assert grown.layout.attribute("glasses").edit_labels == ["source", "sunglasses", "clear"]
    record = grown.meta["edits"][-1]
    assert record["kind"] == "level" and record["attribute"] == "glasses" and record["base_version"] == "v0001"
    assert record["edits"][0]["params"] == {"rim": 0.7, "tint": 0.1, "frame_lightness": 0.8} and record["steps"] == 80
    assert grown.meta["config_hash"] == base.meta["config_hash"]  # a re-run of the build finds it
    _assert_same_renders(base, grown, 0, {"glasses": 0.0})
    # the fit learned the new level's frames, a look apart, past the old levels on the slider
    # (a lens tint on a 150-step, 32-px avatar: a small region, so a small gain over the whole image)
    scores = record["scores"]
    assert scores["fit_psnr_new"] > scores["fit_psnr_new_before"] + 0.02, scores
    poses = [(0.0, 0.0)]
    at = {s: grown.render(grown.latent({"glasses": s}), poses, 32, 32) for s in (1.0, 2.0)}
    assert (at[2.0] - at[1.0]).abs().max() > 0.01
    index = [json.loads(line) for line in (out / "avatars" / "index.jsonl").read_text().splitlines()]
    assert [(e["subject_id"], e["version"]) for e in index].count((sid, version)) == 1


def test_a_new_attribute_at_zero_is_bit_identical_at_any_latent_and_the_bundle_decodes_it(build):
    out, sid = build
    registry = Registry(out / "avatars")
    base = registry.load(sid, "v0001")
    run = _run("--registry", str(out / "avatars"), "--subject", f"{sid}@v0001", "--new-attribute", "skin",
               "--edits", "tan:tone=-0.6,warmth=0.5;pale:tone=0.7", "--steps", "80")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    version = run.stdout.strip().splitlines()[-1].split("@")[1].split()[0]
    grown = registry.load(sid, version)
    skin = grown.layout.attribute("skin")
    assert skin.edit_labels == ["source", "tan", "pale"] and skin.anchored
    assert [a.name for a in grown.layout.attributes] == [a.name for a in base.layout.attributes] + ["skin"]
    _assert_same_renders(base, grown, 1, {"skin": 0.0})
    scores = grown.meta["edits"][-1]["scores"]
    assert scores["fit_psnr_new"] > scores["fit_psnr_new_before"] + 0.2, scores
    poses = [(0.0, 0.0)]
    source, tan = (grown.render(grown.latent({"skin": s}), poses, 32, 32) for s in (0.0, 1.0))
    assert (tan - source).abs().max() > 0.01
    # the browser's reference decoder follows the anchored branch, at, off and between its levels
    bundle = decode_bundle(grown.web_bundle())
    for values in ({"skin": 0.0, "hair": 0.4}, {"skin": 1.5, "glasses": 1.0}, {"skin": 0.3}):
        z = latent(bundle, values)
        ours = decode_gaussians(bundle, z)
        with torch.no_grad():
            ref = grown.model.gaussians(torch.from_numpy(z)[None])
        for key, value in ours.items():
            assert np.abs(value - ref[key][0].numpy()).max() < 1e-5, (key, values)


@pytest.mark.parametrize("case", ["unknown subject", "unknown attribute", "clashing name", "no edits",
                                  "reference without a face", "reference not an image",
                                  "prompt for the classical editor", "bad params"])
def test_bad_input_is_refused_with_a_reason_and_changes_nothing(build, case):
    out, sid = build
    root = out / "avatars"
    args = {
        "unknown subject": (["--subject", "nobody-00000000", "--attribute", "hair", "--params", "hue=0.1,amount=1"],
                            "no avatar"),
        "unknown attribute": (["--subject", sid, "--attribute", "moustache", "--params", "hue=0.1"],
                              "unknown attribute 'moustache'"),
        "clashing name": (["--subject", sid, "--new-attribute", "hair", "--edits", "x:tone=1"],
                          "already has an attribute 'hair'"),
        "no edits": (["--subject", sid, "--new-attribute", "skin"], "needs --edits"),
        "reference without a face": (["--subject", sid, "--attribute", "hair", "--from-portrait",
                                      str(PORTRAITS / "no_face_cat.jpg")], "cannot be used"),
        "reference not an image": (["--subject", sid, "--attribute", "hair", "--from-portrait", str(REPO / "README.md")],
                                   "README.md: skipped: not an image file"),
        "prompt for the classical editor": (["--subject", sid, "--attribute", "hair", "--prompt", "make it silver"],
                                            "reads --params"),
        "bad params": (["--subject", sid, "--attribute", "hair", "--params", "hue=blue"], "KEY=NUMBER"),
    }[case]
    before = _registry_state(root)
    run = _run("--registry", str(root), *args[0])
    assert run.returncode == 2, run.stdout[-1500:] + run.stderr[-1500:]
    assert args[1] in run.stderr, run.stderr[-1500:]
    assert _registry_state(root) == before


def test_a_killed_edit_leaves_nothing_and_the_next_one_runs(build):
    out, sid = build
    root = out / "avatars"
    before = _registry_state(root)
    cmd = [sys.executable, str(REPO / "jobs" / "edit_avatar.py"), "--registry", str(root), "--subject", sid,
           "--attribute", "glasses", "--params", "rim=0.5,tint=0.2", "--label", "light", "--steps", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    seen = ""
    deadline = time.monotonic() + 240
    while "fitting" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "fitting" in seen, seen[-2000:]
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _registry_state(root) == before  # no version, no temp folder, no index line
    run = _run("--registry", str(root), "--subject", sid, "--attribute", "glasses", "--params", "rim=0.5,tint=0.2",
               "--label", "light", "--steps", "10", "--lease-timeout", "60")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    versions = [e.version for e in Registry(root).list() if e.subject_id == sid]
    assert len(versions) == len(set(versions)) and len(versions) == len(
        [p for p in (root / sid).iterdir() if p.name.startswith("v")])


@pytest.mark.parametrize("composition", ["sum", "union", "owned"])
def test_growth_in_any_order_keeps_every_render_that_does_not_use_the_new_parts(composition):
    """Level, attribute, then another level of the same attribute: branches are matched by what they
    see, not by position, and each grown part is exactly zero at its source code, whichever way the
    attributes' opacities compose."""
    from perse_ray.avatar.extend import grow_attribute, grow_level
    from perse_ray.avatar.io import Avatar
    from perse_ray.avatar.layout import LatentLayout
    from perse_ray.avatar.model import AvatarModel

    cfg = load_config("cpu-smoke", ["avatar.num_gaussians=200", f"avatar.attribute_composition={composition}"])
    layout = LatentLayout.from_config(cfg.synth, cfg.avatar.code_dim, anchored=composition == "owned")
    model = AvatarModel(layout, cfg.avatar, seed=3)
    g = torch.Generator().manual_seed(4)

    def scramble(m, trainable=None):  # random weights where a fit could move them
        with torch.no_grad():
            named = dict(m.named_parameters())
            for name, p in named.items():
                if name.startswith(("decoder.", "codes.")):
                    noise = 0.3 * torch.randn(p.shape, generator=g)
                    p.add_(noise if trainable is None else torch.where(trainable.masks.get(name, torch.zeros_like(
                        p, dtype=torch.bool)), noise, 0.0))
        return m

    base = scramble(model)
    with torch.no_grad():
        base.set_branch_regions(torch.rand(base.branch_regions.shape, generator=g) < 0.7)
    camera = {"fov_deg": 30.0, "distance": 0.65}
    steps = [("level", "hair", "teal"), ("attribute", "skin", ["tan"]), ("level", "hair", "silver")]
    current = base
    for kind, name, labels in steps:
        grown, trainable = (grow_level(current, name, labels) if kind == "level"
                            else grow_attribute(current, name, labels))
        scramble(grown, trainable)
        _assert_same_renders(Avatar(current, {"camera": camera}), Avatar(grown, {"camera": camera}),
                             len(name), {name: 0.0}, count=4)
        current = grown
    hair = current.layout.attribute("hair")
    assert hair.edit_labels == ["source", "auburn", "teal", "silver"] and hair.residuals == 2
    # and the very first avatar, wherever every added slider is at its source
    _assert_same_renders(Avatar(base, {"camera": camera}), Avatar(current, {"camera": camera}),
                         9, {"hair": 0.0, "skin": 0.0}, count=4)


def test_hair_from_another_persons_portrait_moves_the_avatars_hair_colour_towards_it(build):
    """Grace Hopper's hair colour onto the astronaut: the measure is the mean Lab colour in the hair
    mask (``regions.hair_probability`` of the subject's aligned portrait), on frontal renders."""
    from PIL import Image

    from perse_ray.faces import load_face_model
    from perse_ray.portraits import decode_png, discover_subjects
    from perse_ray.synth.classical.measure import hair_lab, lab_distance, mean_lab
    from perse_ray.synth.classical.regions import hair_probability
    from perse_ray.synth.ingest import ingest_subject

    out, sid = build
    registry = Registry(out / "avatars")
    run = _run("--registry", str(out / "avatars"), "--subject", f"{sid}@v0001", "--attribute", "hair",
               "--from-portrait", str(PORTRAITS / "grace_hopper.jpg"), "--steps", "150")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    version = run.stdout.strip().splitlines()[-1].split("@")[1].split()[0]
    grown = registry.load(sid, version)
    record = grown.meta["edits"][-1]
    assert record["origin"]["portrait"] == "grace_hopper.jpg" and set(record["origin"]["measured_params"]) == {
        "hue", "amount", "lightness"}
    assert grown.layout.attribute("hair").edit_labels[-1] == "grace_hopper"

    cfg = load_config("cpu-smoke")
    folder = out / "reference"
    folder.mkdir(exist_ok=True)
    shutil.copy(PORTRAITS / "grace_hopper.jpg", folder)
    reference = ingest_subject(discover_subjects(folder).candidates[0], load_face_model(cfg.faces), cfg)
    target = hair_lab(decode_png(reference["portrait_png"]), np.asarray(reference["landmarks"], np.float32))
    subject = _subject_row(out, sid)
    portrait = decode_png(subject["portrait_png"])
    mask = hair_probability(portrait, np.asarray(subject["landmarks"], np.float32))
    size = cfg.render.width
    small = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((size, size), Image.BOX)) / 255.0

    def rendered_hair(level: float) -> np.ndarray:
        rgb = grown.render(grown.latent({"hair": level}), [(0.0, 0.0)], size, size)[0, 0]
        return mean_lab(np.round(rgb.numpy() * 255).astype(np.uint8), small)

    new_level = len(grown.layout.attribute("hair").edit_labels) - 1
    before, after = lab_distance(rendered_hair(0.0), target), lab_distance(rendered_hair(float(new_level)), target)
    assert after < before - 1.0, (before, after)


def _subject_row(out: Path, sid: str) -> dict:
    import pyarrow.parquet as pq

    from perse_ray.schema import rows_from_table

    return rows_from_table(pq.read_table(out / "synth" / "frames" / f"subject_id={sid}" / "_subject.parquet"))[0]


def test_a_prompted_level_goes_through_the_diffusion_editor_loader(tiny_models, tmp_path):
    """The ``tiny`` preset (instruct_pix2pix, ControlNet and diffusion morphs through their real
    loaders, tiny random weights: no quality claim): a level given as a prompt is synthesized by
    those stages and registered, and renders with hair at 0 stay bit-identical."""
    from perse_ray.faces import load_face_model
    from perse_ray.pipeline import resolve_models, synthesize_subject
    from perse_ray.portraits import discover_subjects
    from perse_ray.schema import table_from_rows
    from perse_ray.synth.ingest import ingest_subject
    from perse_ray.synth.write import SUBJECT_FILE, atomic_write_table
    from perse_ray.train.loop import train_avatar

    cfg = resolve_models(load_config("tiny"))
    folder = tmp_path / "input"
    folder.mkdir()
    shutil.copy(PORTRAITS / "astronaut.png", folder)
    subject = ingest_subject(discover_subjects(folder).candidates[0], load_face_model(cfg.faces), cfg)
    sid = subject["subject_id"]
    part = tmp_path / "synth" / "frames" / f"subject_id={sid}"
    part.mkdir(parents=True)
    atomic_write_table(part / SUBJECT_FILE, table_from_rows([subject], "subjects"))
    registry = Registry(tmp_path / "avatars")
    registry.put(sid, train_avatar(synthesize_subject(cfg, subject), cfg, progress=False, subject_id=sid).avatar)
    run = _run("--registry", str(registry.root), "--subject", sid, "--attribute", "hair", "--prompt",
               "make the hair silver", "--label", "silver", "--steps", "10")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    grown = registry.load(sid, "v0002")
    assert grown.meta["edits"][-1]["edits"][0]["prompt"] == "make the hair silver"
    assert grown.layout.attribute("hair").edit_labels == ["source", "red", "silver"]
    _assert_same_renders(registry.load(sid, "v0001"), grown, 2, {"hair": 0.0}, count=3)
    refused = _run("--registry", str(registry.root), "--subject", sid, "--attribute", "hair", "--params", "hue=0.5")
    assert refused.returncode == 2 and "reads --prompt" in refused.stderr, refused.stderr[-1000:]


def test_fit_progress_goes_to_stderr_and_leaves_stdout_to_the_caller(capsys):
    """Benchmarks print JSON lines on stdout: an edit's progress lines must not land among them."""
    from perse_ray.bench.ground_truth import frames_from_head
    from perse_ray.bench.procedural import ProceduralHead
    from perse_ray.config import EditSpec
    from perse_ray.train.extend import Extension, extend_avatar
    from perse_ray.train.loop import train_avatar

    cfg = load_config("cpu-smoke", ["synth.resolution=32", "render.width=16", "render.height=16",
                                    "synth.motion.num_frames=4", "avatar.num_gaussians=200", "train.steps=4",
                                    "machine.log_every=1"])
    head = ProceduralHead(seed=0)
    base = train_avatar(frames_from_head(head, cfg), cfg, progress=False).avatar
    capsys.readouterr()
    extend_avatar(base, {}, Extension("level", "hair", (EditSpec("teal"),), {"head_key": 3}), steps=2,
                  progress=True, frames_fn=lambda c, _s: frames_from_head(head, c))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "step 2/2" in captured.err


def test_the_fit_of_an_edit_after_training_keeps_the_training_attribute_prior():
    """An avatar trained with train.lambda_attr_delta fits its new level under the same prior: a strong
    prior leaves the new branch a smaller output than none."""
    import copy

    from perse_ray.bench.ground_truth import frames_from_head
    from perse_ray.bench.procedural import ProceduralHead
    from perse_ray.config import EditSpec
    from perse_ray.train.extend import Extension, extend_avatar
    from perse_ray.train.loop import train_avatar

    cfg = load_config("cpu-smoke", ["synth.resolution=32", "render.width=16", "render.height=16",
                                    "synth.motion.num_frames=4", "avatar.num_gaussians=200", "train.steps=4"])
    head = ProceduralHead(seed=0)
    base = train_avatar(frames_from_head(head, cfg), cfg, progress=False).avatar
    outputs = {}
    for weight in (0.0, 1.0):
        avatar = copy.deepcopy(base)
        avatar.meta["config"]["train"]["lambda_attr_delta"] = weight
        grown = extend_avatar(avatar, {}, Extension("level", "hair", (EditSpec("teal"),), {"head_key": 3}),
                              steps=40, progress=False, frames_fn=lambda c, _s: frames_from_head(head, c))
        with torch.no_grad():
            g = grown.model.gaussians(grown.latent({"hair": 2.0}, {})[None], attribute_l1=True)
        outputs[weight] = float(g["attribute_l1"])
    assert outputs[1.0] < 0.8 * outputs[0.0], outputs
