"""Find subjects in an input folder and decode their portraits safely.

Layout: every image file at the top level is one subject; every sub-folder is one subject with
several images (ingest keeps the best face). Anything else at the top level (text files, special
files, links leaving the folder, duplicates) becomes a quarantined ``subjects`` row with a reason,
so every input is accounted for.

Subject ids are ``<slug>-<sha8>``: an ASCII slug of the name ([a-z0-9-], at most 40 characters)
and the first 8 hex digits of the content's sha256. No input name can reach the file system
through an id, so outputs named by id stay inside the output folder.

Decoding trusts nothing: the pixel count is checked before decoding (decompression bombs), large
JPEGs are decoded at reduced scale, truncated/empty/unknown files raise ``ImageRejected`` with a
reason, EXIF orientation is applied, and every mode (CMYK, grayscale, 16-bit, palette, alpha) ends
as RGB uint8 with alpha composited on white.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
MIN_INPUT_SIDE = 32  # below this no detector finds a face; say so instead of "no face found"
MAX_FILE_BYTES = 256 * 2**20  # no portrait is this large; refuse before hashing or decoding
SLUG_MAX = 40


class InputError(ValueError):
    """The input folder itself is unusable (missing, not a folder, nothing in it)."""


class ImageRejected(ValueError):
    """A file that cannot be used as a portrait; the message is the quarantine reason."""


@dataclass(frozen=True)
class Candidate:
    """A subject to ingest: one image file, or a folder's image files (sorted by name)."""

    subject_id: str
    source_path: str
    content_sha256: str
    images: tuple[str, ...]
    image_sha256: tuple[str, ...]
    notes: tuple[str, ...] = ()  # folder entries that were not considered, and why


@dataclass
class Discovery:
    candidates: list[Candidate] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)  # subjects rows (status quarantined)


# --------------------------------------------------------------------------- ids


def slugify(name: str) -> str:
    """ASCII [a-z0-9-] slug of ``name``; accents folded, everything else a dash; never empty."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:SLUG_MAX].strip("-")
    return slug or "subject"


def subject_id(name: str, sha256_hex: str) -> str:
    return f"{slugify(name)}-{sha256_hex[:8]}"




# --------------------------------------------------------------------------- discovery


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_entry(path: Path, root: Path) -> tuple[str | None, str | None]:
    """(content sha256, None) for a readable regular file, else (None, why it cannot be read)."""
    if path.is_symlink() and root not in Path(os.path.realpath(path)).parents:
        return None, "symbolic link pointing outside the input folder"
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # FIFOs and devices would block or never end
            return None, "not a regular file"
        if st.st_size > MAX_FILE_BYTES:
            return None, f"file too large ({st.st_size} bytes > {MAX_FILE_BYTES})"
        return _sha256_file(path), None
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"


def _quarantine_row(sid: str, source: Path, sha: str | None, reason: str) -> dict:
    return {"subject_id": sid, "source_path": str(source), "content_sha256": sha,
            "status": "quarantined", "reason": reason}


def discover_subjects(input_dir: str | os.PathLike) -> Discovery:
    """Subjects under ``input_dir``; raises ``InputError`` when the folder is missing or empty."""
    root = Path(input_dir).expanduser()
    if not root.exists():
        raise InputError(f"input folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"input {root} is not a folder")
    root = root.resolve()
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    if not entries:
        raise InputError(f"input folder {root} is empty")

    found = Discovery()
    used_ids: set[str] = set()
    first_by_sha: dict[str, str] = {}

    def unique(sid: str) -> str:  # different names can share a slug (case, accents)
        base, n = sid, 2
        while sid in used_ids:
            sid, n = f"{base}-{n}", n + 1
        used_ids.add(sid)
        return sid

    for path in entries:
        if path.is_dir() and not path.is_symlink():
            _discover_folder(path, root, found, unique, first_by_sha)
            continue
        sid, sha, problem = _file_entry(path, root)
        sid = unique(sid)
        if problem:
            found.quarantined.append(_quarantine_row(sid, path, sha, problem))
        elif sha in first_by_sha:
            found.quarantined.append(_quarantine_row(sid, path, sha, f"duplicate of {first_by_sha[sha]}"))
        else:
            first_by_sha[sha] = sid
            found.candidates.append(Candidate(sid, str(path), sha, (str(path),), (sha,)))
    return found


def candidate_for_file(path: str | os.PathLike) -> Candidate:
    """One image file as the subject a build would make of it alone in its input folder (same id and
    checks); raises ``InputError`` with the reason a build would quarantine it for."""
    path = Path(path).expanduser()
    sid, sha, problem = _file_entry(path, path.resolve().parent)
    if problem:
        raise InputError(f"{path.name}: {problem}")
    return Candidate(sid, str(path), sha, (str(path),), (sha,))


def _file_entry(path: Path, root: Path) -> tuple[str, str | None, str | None]:
    """(subject id, content sha256 or None, why it is not a subject or None) for a file entry."""
    is_image = path.suffix.lower() in IMAGE_EXTENSIONS
    stem = path.stem if is_image else path.name
    sha, problem = _read_entry(path, root)
    if problem:
        return slugify(stem), None, problem
    if not is_image:
        return subject_id(stem, sha), sha, f"skipped: not an image file (extension {path.suffix or 'none'!r})"
    return subject_id(stem, sha), sha, None


def _discover_folder(folder: Path, root: Path, found: Discovery, unique, first_by_sha) -> None:
    images, shas, notes = [], [], []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.is_dir() and not path.is_symlink():
            notes.append(f"{path.name}: nested folder ignored")
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            notes.append(f"{path.name}: not an image file")
            continue
        sha, problem = _read_entry(path, root)
        if problem:
            notes.append(f"{path.name}: {problem}")
            continue
        images.append(str(path))
        shas.append(sha)
    if not images:
        reason = "folder has no image files" + (f" ({'; '.join(notes)})" if notes else "")
        found.quarantined.append(_quarantine_row(unique(slugify(folder.name)), folder, None, reason))
        return
    sha = hashlib.sha256("".join(sorted(shas)).encode()).hexdigest()
    sid = unique(subject_id(folder.name, sha))
    if sha in first_by_sha:
        found.quarantined.append(_quarantine_row(sid, folder, sha, f"duplicate of {first_by_sha[sha]}"))
        return
    first_by_sha[sha] = sid
    found.candidates.append(Candidate(sid, str(folder), sha, tuple(images), tuple(shas), tuple(notes)))


# --------------------------------------------------------------------------- decoding


def read_checked(path: str, expected_sha256: str) -> bytes:
    """File bytes, refused if the file changed since discovery (its id would be wrong)."""
    p = Path(path)
    if p.stat().st_size > MAX_FILE_BYTES:
        raise ImageRejected(f"file too large ({p.stat().st_size} bytes)")
    data = p.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ImageRejected("file changed since it was discovered")
    return data


def decode_image(data: bytes, max_pixels: int, max_side: int) -> tuple[np.ndarray, float]:
    """(RGB uint8 [H, W, 3], scale from the EXIF-oriented original to it) from encoded bytes;
    raises ``ImageRejected`` with the reason."""
    if not data:
        raise ImageRejected("empty file")
    with warnings.catch_warnings():
        # Pillow warns (and above 2x raises) past its own bomb cap: both are rejections here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise ImageRejected(f"image too large: {width}x{height} pixels exceeds the "
                                    f"{max_pixels}-pixel cap (decompression bomb guard)")
            if min(width, height) < 1:
                raise ImageRejected("image has no pixels")
            # EXIF orientations 5-8 rotate by 90 degrees: the upright width is the stored height.
            upright_width = height if im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8) \
                else width
            if im.format == "JPEG" and max(width, height) > max_side:
                im.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4, 1/8 scale: far cheaper
            im.load()
            im = ImageOps.exif_transpose(im)
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected(f"image too large (decompression bomb guard): {e}") from e
        except UnidentifiedImageError as e:
            raise ImageRejected("not a decodable image") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageRejected(f"truncated or corrupt image: {e}") from e
    rgb = to_rgb(im)
    if min(rgb.shape[:2]) < MIN_INPUT_SIDE:
        raise ImageRejected(f"image too small: {rgb.shape[1]}x{rgb.shape[0]} pixels "
                            f"(needs at least {MIN_INPUT_SIDE} on each side)")
    if max(rgb.shape[:2]) > max_side:
        scale = max_side / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
    return np.ascontiguousarray(rgb), rgb.shape[1] / upright_width


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode → RGB uint8; alpha (and palette transparency) composited on white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        # 16-bit samples (Pillow keeps 16-bit PNG/TIFF grayscale as I;16 or I): keep the top byte.
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        raise ImageRejected("unsupported pixel mode F (floating-point samples)")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(path: str, expected_sha256: str, max_pixels: int, max_side: int
               ) -> tuple[np.ndarray, float]:
    return decode_image(read_checked(path, expected_sha256), max_pixels, max_side)


# --------------------------------------------------------------------------- PNG


def encode_png(image: np.ndarray) -> bytes:
    """uint8 RGB [H, W, 3] or float mask [H, W] in [0, 1] (stored as 8-bit gray) → PNG bytes."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.clip(np.rint(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # speed over size: frames are many
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes this pipeline wrote → uint8 RGB [H, W, 3]."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"expected PNG bytes, got {im.format}")
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_mask_png(data: bytes) -> np.ndarray:
    """Mask PNG (8-bit gray) → float32 [H, W] in [0, 1]."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
