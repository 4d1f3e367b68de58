"""Subject discovery and safe decoding on a hostile input folder."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from perse_ray.portraits import (MIN_INPUT_SIDE, ImageRejected, InputError, decode_image, decode_mask_png,
                                 candidate_for_file, decode_png, discover_subjects, encode_png, slugify,
                                 subject_id)

GRACE = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
CAP, SIDE = 40_000_000, 2048


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_slug_ids_are_safe_ascii():
    assert slugify("Grace Hopper (1984)") == "grace-hopper-1984"
    assert slugify("été") == "ete"
    assert slugify("..") == "subject" and slugify("肖像") == "subject"
    assert slugify("x" * 100) == "x" * 40
    sid = subject_id("../../etc/passwd", "ab" * 32)
    assert sid == "etc-passwd-abababab" and "/" not in sid and ".." not in sid


def test_decode_modes_become_rgb_uint8():
    rgb = np.asarray(Image.open(GRACE).convert("RGB"))
    # CMYK JPEG
    out, scale = decode_image(_jpeg(Image.fromarray(rgb).convert("CMYK"), quality=95), CAP, SIDE)
    assert out.dtype == np.uint8 and out.shape == rgb.shape and scale == 1.0
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 6
    # 16-bit grayscale: the top byte survives
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    out, _ = decode_image(buf.getvalue(), CAP, SIDE)
    assert out.shape == (64, 64, 3) and np.array_equal(out[..., 0], out[..., 2])
    np.testing.assert_allclose(out[..., 0], np.rint(ramp / 257.0), atol=1)
    # alpha composited on white
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 20:, 3] = 255
    out, _ = decode_image(_png(rgba, "RGBA"), CAP, SIDE)
    assert (out[:, :20] == 255).all() and (out[:, 20:] == [200, 0, 0]).all()
    # palette with a transparent index, and 1-bit grayscale
    pal = Image.fromarray(np.arange(40 * 40, dtype=np.uint8).reshape(40, 40) % 4, "L").convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    out, _ = decode_image(buf.getvalue(), CAP, SIDE)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    out, _ = decode_image(_png(np.eye(40, dtype=bool)), CAP, SIDE)
    assert out.shape == (40, 40, 3) and out[0, 0, 0] == 255 and out[0, 1, 0] == 0


def test_decode_applies_exif_orientation_and_downscales():
    im = Image.new("RGB", (80, 40), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out, scale = decode_image(_jpeg(im, exif=exif), CAP, SIDE)
    assert out.shape == (80, 40, 3) and scale == 1.0
    big = Image.new("RGB", (4000, 3000), (90, 120, 150))
    out, scale = decode_image(_jpeg(big), CAP, 1000)
    assert max(out.shape[:2]) == 1000 and out.shape[:2] == (750, 1000) and scale == pytest.approx(0.25)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, I am not a JPEG\n" * 10, "not a decodable image"),
    (_png(np.zeros((1, 1, 3), np.uint8)), "image too small"),
    (_png(np.zeros((MIN_INPUT_SIDE - 1, 64, 3), np.uint8)), "image too small"),
])
def test_decode_rejects_with_reason(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        decode_image(data, CAP, SIDE)


def test_decode_rejects_truncated_and_bombs():
    data = GRACE.read_bytes()
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], CAP, SIDE)
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_image(data, 100_000, SIDE)  # 600x512 is past this cap
    # Pillow's own guard (its global cap) is also turned into a rejection, not a crash.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 10_000
    try:
        with pytest.raises(ImageRejected, match="decompression bomb"):
            decode_image(data, CAP, SIDE)
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_png_round_trip():
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    assert np.array_equal(decode_png(encode_png(img)), img)
    mask = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    np.testing.assert_allclose(decode_mask_png(encode_png(mask)), mask, atol=1 / 255)
    with pytest.raises(ValueError, match="expected PNG"):
        decode_png(_jpeg(Image.fromarray(img)))


def build_hostile_folder(root: Path) -> Path:
    """The hostile inputs every discovery/ingest test uses (see test names for what each is)."""
    from skimage import data as skdata

    root.mkdir(parents=True)
    shutil.copy(GRACE, root / "grace_hopper.jpg")
    shutil.copy(GRACE, root / "copy of grace.jpg")  # duplicate content
    Image.fromarray(skdata.astronaut()).save(root / "astronaut.png")
    grace = np.asarray(Image.open(GRACE).convert("RGB"))
    Image.fromarray(np.hstack([grace, grace[:, ::-1]])).save(root / "two-faces.png")  # no dominant face
    full = GRACE.read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "notes.txt").write_text("subject list\n")
    Image.new("RGB", (1, 1)).save(root / "one-pixel.png")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(root / "noise.png")
    Image.open(GRACE).convert("CMYK").save(root / "cmyk.jpg", quality=90)
    Image.fromarray((rng.random((128, 128)) * 65535).astype(np.uint16)).save(root / "gray16.png")
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[20:70, 20:70] = (200, 50, 50, 255)
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    Image.new("RGB", (4000, 4000), (128, 100, 90)).save(root / "huge.png")
    (root / "..jpg").write_bytes(_png(np.full((64, 64, 3), 7, np.uint8)))
    (root / "été 肖像.png").write_bytes(_png(np.full((64, 64, 3), 9, np.uint8)))
    multi = root / "multi-shot"
    multi.mkdir()
    (multi / "a_noise.png").write_bytes((root / "noise.png").read_bytes())
    Image.open(GRACE).resize((256, 300)).save(multi / "b_small.jpg")
    shutil.copy(GRACE, multi / "c_large.jpg")
    (multi / "readme.md").write_text("x")
    (root / "empty-folder").mkdir()
    os.mkfifo(root / "pipe.jpg")  # a special file must not hang the reader
    (root / "escape.jpg").symlink_to("/etc/hostname")
    return root


def test_discovery_accounts_for_every_entry(tmp_path):
    root = build_hostile_folder(tmp_path / "in")
    found = discover_subjects(root)
    ids = [c.subject_id for c in found.candidates] + [r["subject_id"] for r in found.quarantined]
    assert len(ids) == len(set(ids)) == len(list(root.iterdir()))
    for sid in ids:
        assert set(sid) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") and len(sid) <= 60
    reasons = {Path(r["source_path"]).name: r["reason"] for r in found.quarantined}
    # Sorted by name, "copy of grace.jpg" comes first: the later grace_hopper.jpg is the duplicate.
    copy_id = next(c.subject_id for c in found.candidates if c.source_path.endswith("copy of grace.jpg"))
    assert reasons == {
        "grace_hopper.jpg": f"duplicate of {copy_id}",
        "notes.txt": "skipped: not an image file (extension '.txt')",
        "empty-folder": "folder has no image files",
        "pipe.jpg": "not a regular file",
        "escape.jpg": "symbolic link pointing outside the input folder",
    }
    multi = next(c for c in found.candidates if c.source_path.endswith("multi-shot"))
    assert [Path(p).name for p in multi.images] == ["a_noise.png", "b_small.jpg", "c_large.jpg"]
    assert multi.notes == ("readme.md: not an image file",)
    names = {Path(c.source_path).name: c.subject_id for c in found.candidates}
    assert names["..jpg"].startswith("subject-") and names["été 肖像.png"].startswith("ete-")
    assert names["copy of grace.jpg"].startswith("copy-of-grace-")


def test_one_file_is_the_subject_discovery_makes_of_it_and_refused_for_the_same_reasons(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(GRACE, root / "grace_hopper.jpg")
    assert candidate_for_file(root / "grace_hopper.jpg") == discover_subjects(root).candidates[0]
    (root / "notes.txt").write_text("x")
    os.mkfifo(root / "pipe.jpg")
    with pytest.raises(InputError, match="not an image file"):
        candidate_for_file(root / "notes.txt")
    with pytest.raises(InputError, match="not a regular file"):
        candidate_for_file(root / "pipe.jpg")
    with pytest.raises(InputError, match="unreadable"):
        candidate_for_file(root / "missing.jpg")


def test_missing_or_empty_input_is_an_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover_subjects(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is empty"):
        discover_subjects(tmp_path / "empty")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="not a folder"):
        discover_subjects(tmp_path / "file.jpg")
