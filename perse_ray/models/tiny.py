"""Tiny random-weight models written through the real save formats, for tests and the ``tiny`` preset.

No model hub is reachable in CI, so the ``gpu`` loaders are exercised on these instead:
``from_pretrained`` on diffusers folders, ``insightface.model_zoo.get_model`` on an ONNX file.
They produce noise, never a quality claim. Layout under the target folder::

    instruct-pix2pix/   StableDiffusionInstructPix2PixPipeline (UNet with 8 input channels)
    sd/                 StableDiffusionPipeline (the ControlNet img2img base and the morph's VAE/UNet)
    controlnet/         ControlNetModel
    arcface.onnx        1x3x112x112 -> 512 (insightface routes it to ArcFaceONNX)
    insightface-pack/   det.onnx (SCRFD-shaped: 9 outputs), 1k3d68.onnx (192x192 -> 3309),
                        arcface.onnx: what ``faces.backend: insightface`` loads from a pack folder
    tiny-models.json    written last: the set is complete when it names this version and seed

Writes are seeded (same seed → same weights), idempotent (a complete set is left alone) and
atomic (built in a temporary folder, renamed into place, the manifest last), under a file lock so
concurrent callers do not interleave.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

ENV_VAR = "PERSE_RAY_TINY_MODELS"
DEFAULT_DIR = "~/.cache/perse_ray/tiny-models"
MANIFEST = "tiny-models.json"
VERSION = 2  # bumped whenever the models change: older sets are rewritten
ENTRIES = ("instruct-pix2pix", "sd", "controlnet", "arcface.onnx", "insightface-pack")

_TEXT_DIM = 32  # CLIP hidden size = UNet cross-attention size
_SAMPLE = 64  # image side the tiny pipelines are built for (latent 8x8: the VAE downsamples 8x like SD)


def is_complete(directory: str | os.PathLike, seed: int = 0) -> bool:
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("version") == VERSION and manifest.get("seed") == seed
            and all((directory / e).exists() for e in ENTRIES))


def write_tiny_models(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny model set into ``directory`` unless a complete one with this seed is there."""
    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(directory, seed):
            return directory
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
        try:
            _build(tmp, seed)
            (directory / MANIFEST).unlink(missing_ok=True)  # incomplete from here until rewritten
            for entry in ENTRIES:
                target = directory / entry
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                os.rename(tmp / entry, target)
            manifest_tmp = tmp / MANIFEST
            manifest_tmp.write_text(json.dumps({"version": VERSION, "seed": seed, "entries": ENTRIES}))
            os.replace(manifest_tmp, directory / MANIFEST)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def ensure_tiny_models(seed: int = 0) -> Path:
    """Write (if needed) to ``$PERSE_RAY_TINY_MODELS`` or the default cache and export the variable,
    so the ``tiny`` preset's ``${PERSE_RAY_TINY_MODELS}/...`` paths resolve in this process and in
    processes started after it."""
    directory = write_tiny_models(os.environ.get(ENV_VAR) or os.path.expanduser(DEFAULT_DIR), seed)
    os.environ[ENV_VAR] = str(directory)
    return directory


# --------------------------------------------------------------------------- builders


def _build(out: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    tokenizer = _tokenizer(out / "_tokenizer")
    vae, text_encoder = _vae(), _text_encoder()
    ip2p_unet, sd_unet = _unet(in_channels=8), _unet(in_channels=4)
    scheduler = _scheduler()
    _save_ip2p(out / "instruct-pix2pix", vae, text_encoder, tokenizer, ip2p_unet, scheduler)
    _save_sd(out / "sd", vae, text_encoder, tokenizer, sd_unet, scheduler)
    _controlnet(sd_unet).save_pretrained(out / "controlnet")
    _export_arcface(out / "arcface.onnx")
    pack = out / "insightface-pack"
    pack.mkdir()
    _export_scrfd(pack / "det.onnx")
    _export_landmark68(pack / "1k3d68.onnx")
    shutil.copyfile(out / "arcface.onnx", pack / "arcface.onnx")
    shutil.rmtree(out / "_tokenizer")


def _tokenizer(folder: Path):
    """A byte-level CLIP BPE vocabulary: every byte symbol (alone and word-final), no merges.

    Every string tokenizes (one token per byte), which is all a random-weight text encoder needs.
    """
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab_size = 2 * 256 + 2
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=_TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=_TEXT_DIM,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks: the same 8x downsampling as SD, so ControlNet's conditioning embedding fits.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=_SAMPLE,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4)


def _unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=_SAMPLE // 8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=_TEXT_DIM,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # SD 1.5's values


def _controlnet(unet):
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))


def _save_ip2p(folder, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)


def _save_sd(folder, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)


def _export_arcface(path: Path) -> None:
    """A 112x112 → 512 conv net; one output and a square input ≥ 112 make insightface load it as
    ArcFaceONNX (which normalizes input with mean/std 127.5)."""
    from torch import nn

    net = nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(),
        nn.Conv2d(8, 16, 4, stride=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 512),
    ).eval()
    _onnx_export(net, (1, 3, 112, 112), path, input_names=["data"], output_names=["fc1"],
                 dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}})


def _export_scrfd(path: Path) -> None:
    """SCRFD's output contract at a fixed 160x160 input: for strides 8/16/32 with 2 anchors per
    cell, scores [N, 1], box distances [N, 4] and 5-point distances [N, 10] (9 outputs in that
    order), which insightface routes to its SCRFD class."""
    import torch
    from torch import nn

    class TinySCRFD(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 8, stride=8)
            self.down = nn.ModuleList([nn.Identity(), nn.Conv2d(8, 8, 2, stride=2),
                                       nn.Conv2d(8, 8, 4, stride=4)])
            self.heads = nn.ModuleList([nn.Conv2d(8, 2 * (1 + 4 + 10), 1) for _ in range(3)])

        def forward(self, x):
            feat = torch.relu(self.stem(x))
            scores, boxes, kps = [], [], []
            for down, head in zip(self.down, self.heads):
                out = head(down(feat)).permute(0, 2, 3, 1).reshape(-1, 15)  # (cell, anchor) rows
                scores.append(torch.sigmoid(out[:, :1]))
                boxes.append(nn.functional.softplus(out[:, 1:5]) + 1.0)
                kps.append(out[:, 5:])
            return (*scores, *boxes, *kps)

    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    _onnx_export(TinySCRFD().eval(), (1, 3, 160, 160), path, input_names=["input.1"], output_names=names)


def _export_landmark68(path: Path) -> None:
    """1k3d68's contract: 192x192 input, 3309 outputs (1103 3-D points in [-1, 1], the last 68
    are the iBUG-68 landmarks)."""
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 4, 16, stride=16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, 3309), nn.Tanh()).eval()
    _onnx_export(net, (1, 3, 192, 192), path, input_names=["data"], output_names=["fc1"])


def _onnx_export(net, shape: tuple[int, ...], path: Path, **kwargs) -> None:
    """The TorchScript exporter (``dynamo=False``): the dynamo one needs onnxscript, not installed.
    Its deprecation warning is expected and silenced."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.zeros(*shape),), str(path), opset_version=17, dynamo=False, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m perse_ray.models.tiny [DIR]``: write the set (default: $PERSE_RAY_TINY_MODELS or
    the cache) and print the line that points the ``tiny`` preset at it."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args:
        os.environ[ENV_VAR] = str(Path(args[0]).expanduser().resolve())
    print(f"export {ENV_VAR}={ensure_tiny_models()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
