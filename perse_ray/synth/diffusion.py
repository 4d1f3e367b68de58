"""Diffusion backends (the ``gpu`` preset; the ``tiny`` preset runs them on random weights).

- ``InstructPix2PixEditor``: ``StableDiffusionInstructPix2PixPipeline`` with the edit's prompt.
  The mask is where the result differs from the source (thresholded, smoothed), and the result is
  composited into the source through it, so pixels outside the edited region stay the source's.
- ``ControlNetAnimator``: the face's landmarks moved for the motion frame, drawn as a control
  image, drive ``StableDiffusionControlNetImg2ImgPipeline`` (``animate_model`` +
  ``controlnet_model``) starting from the edit. Every pixel is generated (valid mask all ones);
  the edit mask follows the face by the similarity transform from old to moved landmarks. The
  control drawing is iBUG-68 contours: a ControlNet trained on another annotation (the default
  MediaPipe-face one) needs its own drawing for best results.
- ``DiffusionMorpher``: DDIM inversion of both endpoint frames (VAE latent → noise over
  ``num_inference_steps`` with each edit's prompt), slerp of the inverted latents and lerp of the
  prompt embeddings at alpha, then DDIM denoising and decoding. No classifier-free guidance:
  inversion is only faithful without it. Inversions are cached per endpoint image, so a frame
  shared by several pairs and alphas is inverted once. Cost per morph: about 3 x steps UNet calls
  without the cache, steps with it.

Every model loads through ``load_pretrained`` (model id or local path; ``${VARS}`` and ``~``
expanded; a missing model is an error naming it), in float16 on CUDA, float32 on CPU.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import cv2
import numpy as np
import torch
from PIL import Image

from perse_ray.camera import Camera
from perse_ray.config import Config, EditSpec
from perse_ray.geometry import move_landmarks
from perse_ray.models import ModelNotFoundError, resolve_model_ref, torch_device_dtype
from perse_ray.synth.motion import MotionFrame

MASK_THRESHOLD = 0.08  # mean |difference| (fraction of full scale) that counts as edited
ANIMATE_STRENGTH = 0.75  # img2img: how far from the edit the frame may go (pose changes need room)
INVERSION_CACHE = 32  # endpoint inversions kept per morpher (a bundle has one per edit level)


def load_pretrained(cls, ref: str, **kwargs):
    """The one loader: ``cls.from_pretrained`` on a resolved model id or local path, in the
    device's dtype; a model that cannot be loaded is an error naming it."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    path = resolve_model_ref(ref)
    _, dtype = torch_device_dtype()
    diffusers_logging.disable_progress_bar()  # loading bars would flood the actors' logs
    transformers_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load {cls.__name__} from {ref!r} ({path}): {e}") from e


def load_pipeline(cls, ref: str, **components):
    """A diffusers pipeline on the best device; no safety checker (portraits are the input),
    no progress bars."""
    pipe = load_pretrained(cls, ref, safety_checker=None, requires_safety_checker=False, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch_device_dtype()[0])


def _generator(seed: int) -> torch.Generator:
    # A CPU generator gives the same noise on every device.
    return torch.Generator("cpu").manual_seed(int(seed))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)


def _prompt(attribute: str, spec: EditSpec) -> str:
    if not spec.prompt.strip():
        raise ValueError(f"{attribute} edit {spec.label!r} has no prompt (diffusion edits need one)")
    return spec.prompt


def edit_mask(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Smoothed region where ``after`` differs from ``before``: float32 [H, W] in [0, 1]."""
    side = before.shape[0]
    sigma = max(side / 128.0, 0.5)
    diff = np.abs(after.astype(np.float32) - before.astype(np.float32)).mean(axis=2) / 255.0
    diff = cv2.GaussianBlur(diff, (0, 0), sigma)  # one noisy pixel is not an edit
    region = (diff > MASK_THRESHOLD).astype(np.float32)
    return np.clip(cv2.GaussianBlur(region, (0, 0), 2 * sigma), 0.0, 1.0)


def composite(base: np.ndarray, top: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    return np.clip(np.rint(top * m + base * (1.0 - m)), 0, 255).astype(np.uint8)


class InstructPix2PixEditor:
    def __init__(self, cfg: Config):
        from diffusers import StableDiffusionInstructPix2PixPipeline

        self.cfg = cfg.synth
        self.pipe = load_pipeline(StableDiffusionInstructPix2PixPipeline, cfg.synth.edit_model)

    @torch.inference_mode()
    def edit(self, image, landmarks, attribute, spec, seed):
        if spec is None:
            return image, np.zeros(image.shape[:2], np.float32)
        out = self.pipe(_prompt(attribute, spec), image=Image.fromarray(image),
                        num_inference_steps=self.cfg.num_inference_steps,
                        guidance_scale=self.cfg.guidance_scale,
                        image_guidance_scale=self.cfg.image_guidance_scale,
                        generator=_generator(seed), output_type="np").images[0]
        edited = _to_uint8(out)
        mask = edit_mask(image, edited)
        return composite(image, edited, mask), mask


# iBUG-68 contours: (first, last, closed) and a colour each, so the control image tells parts apart.
_CONTOURS = [((0, 16, False), (255, 255, 255)), ((17, 21, False), (255, 128, 0)),
             ((22, 26, False), (255, 128, 0)), ((27, 30, False), (0, 255, 255)),
             ((31, 35, False), (0, 255, 255)), ((36, 41, True), (0, 255, 0)),
             ((42, 47, True), (0, 255, 0)), ((48, 59, True), (255, 0, 255)),
             ((60, 67, True), (255, 0, 128))]


def draw_landmarks(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Control image: the 68 landmarks as coloured contours on black, uint8 [size, size, 3]."""
    canvas = np.zeros((size, size, 3), np.uint8)
    thickness = max(1, size // 128)
    for (a, b, closed), colour in _CONTOURS:
        pts = np.rint(landmarks[a:b + 1]).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [pts], closed, colour, thickness, lineType=cv2.LINE_AA)
    return canvas


class ControlNetAnimator:
    def __init__(self, cfg: Config):
        from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline

        self.cfg = cfg.synth
        self.camera = Camera(cfg.render.fov_deg, cfg.render.distance)  # the frames' cameras
        self.pipe = load_pipeline(StableDiffusionControlNetImg2ImgPipeline, cfg.synth.animate_model,
                                  controlnet=load_pretrained(ControlNetModel, cfg.synth.controlnet_model))

    @torch.inference_mode()
    def animate(self, image, landmarks, frame: MotionFrame, seed, mask=None):
        size = image.shape[0]
        moved = np.asarray(move_landmarks(landmarks, frame, size, self.camera), np.float32)
        control = draw_landmarks(moved, size)
        out = self.pipe("a portrait photo of a person", image=Image.fromarray(image),
                        control_image=Image.fromarray(control),
                        strength=ANIMATE_STRENGTH,
                        # img2img runs int(steps * strength) of its schedule: ask for enough that
                        # num_inference_steps denoising steps actually run (at least one).
                        num_inference_steps=math.ceil(self.cfg.num_inference_steps / ANIMATE_STRENGTH),
                        guidance_scale=self.cfg.guidance_scale, generator=_generator(seed),
                        output_type="np").images[0]
        valid = np.ones(image.shape[:2], np.float32)
        warped = None
        if mask is not None:
            m, _ = cv2.estimateAffinePartial2D(landmarks, moved)
            if m is None:
                raise ValueError(f"frame {frame.index}: no similarity maps the landmarks to their moved place")
            warped = np.clip(cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_LINEAR), 0.0, 1.0)
        return _to_uint8(out), moved, valid, warped


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation of two latents (flattened); linear when they are nearly parallel."""
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if omega.abs() < 1e-4:
        out = (1 - alpha) * fa + alpha * fb
    else:
        out = (torch.sin((1 - alpha) * omega) * fa + torch.sin(alpha * omega) * fb) / torch.sin(omega)
    return out.reshape(a.shape).to(a.dtype)


class DiffusionMorpher:
    def __init__(self, cfg: Config):
        from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline

        self.cfg = cfg.synth
        self.pipe = load_pipeline(StableDiffusionPipeline, cfg.synth.animate_model)
        self.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.inverse = DDIMInverseScheduler.from_config(self.pipe.scheduler.config)
        self._cache: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _embed(self, prompt: str) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(prompt, self.pipe.device, 1, False)
        return embeds

    def _invert(self, image: np.ndarray, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise latent, prompt embedding) of ``image``; cached by image content and prompt."""
        key = (hashlib.sha1(image.tobytes()).hexdigest(), prompt)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pipe = self.pipe
        x = torch.tensor(image, device=pipe.device, dtype=pipe.vae.dtype).permute(2, 0, 1)[None] / 127.5 - 1
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        cond = self._embed(prompt)
        self.inverse.set_timesteps(self.cfg.num_inference_steps, device=pipe.device)
        for t in self.inverse.timesteps:
            z = self.inverse.step(pipe.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
        self._cache[key] = (z, cond)
        if len(self._cache) > INVERSION_CACHE:
            self._cache.popitem(last=False)
        return z, cond

    @torch.inference_mode()
    def morph(self, source, landmarks, attribute, spec_from, spec_to, alpha, frame, frame_from,
              frame_to, seed):
        pipe = self.pipe
        z0, c0 = self._invert(frame_from, spec_from.prompt if spec_from else "")
        z1, c1 = self._invert(frame_to, spec_to.prompt if spec_to else "")
        z = slerp(z0, z1, alpha)
        cond = torch.lerp(c0, c1, alpha)
        self.scheduler.set_timesteps(self.cfg.num_inference_steps, device=pipe.device)
        for t in self.scheduler.timesteps:
            z = self.scheduler.step(pipe.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
        decoded = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample[0]
        image = _to_uint8((decoded.permute(1, 2, 0).float().cpu().numpy() + 1.0) / 2.0)
        # Outside the region where the endpoints differ both agree: keep their pixels exactly.
        mask = edit_mask(frame_from, frame_to)
        return composite(frame_from, image, mask), mask
