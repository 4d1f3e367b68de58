"""The shared motion script: K frames of (yaw, pitch, named expression values).

Every edit of every subject is animated with the same script, so frame k of every video shares
pose and expression; the avatar relies on that to tell attributes from motion.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from perse_ray.config import MotionConfig


@dataclass(frozen=True)
class MotionFrame:
    index: int
    yaw: float  # degrees
    pitch: float  # degrees
    expression: dict[str, float] = field(default_factory=dict)  # name -> value in [0, 1]


def motion_script(cfg: MotionConfig) -> list[MotionFrame]:
    """Frame 0 is the neutral front view; the rest cover the yaw/pitch range and each expression.

    Poses come from a seeded low-discrepancy sweep (so few frames still span the range) and every
    expression is driven on a share of the frames at varied strengths, alone or mixed, so the
    avatar sees each knob both isolated and combined with pose.
    """
    if cfg.num_frames < 1:
        raise ValueError(f"motion.num_frames must be >= 1, got {cfg.num_frames}")
    rng = np.random.default_rng(cfg.seed)
    frames = [MotionFrame(0, 0.0, 0.0, {name: 0.0 for name in cfg.expressions})]
    n = cfg.num_frames - 1
    golden = (np.sqrt(5) - 1) / 2
    for i in range(1, cfg.num_frames):
        u = (i * golden + rng.uniform(-0.05, 0.05)) % 1.0
        v = ((i * golden * golden) + rng.uniform(-0.05, 0.05)) % 1.0
        yaw = float((2 * u - 1) * cfg.yaw_range)
        pitch = float((2 * v - 1) * cfg.pitch_range)
        expression = {name: 0.0 for name in cfg.expressions}
        if cfg.expressions:
            lead = cfg.expressions[(i - 1) % len(cfg.expressions)]
            expression[lead] = float(rng.uniform(0.3, 1.0))
            if n > 2 * len(cfg.expressions) and i % 3 == 0:  # some frames mix a second knob
                other = cfg.expressions[int(rng.integers(len(cfg.expressions)))]
                expression[other] = max(expression[other], float(rng.uniform(0.2, 0.7)))
        frames.append(MotionFrame(i, round(yaw, 3), round(pitch, 3),
                                  {k: round(v_, 4) for k, v_ in expression.items()}))
    return frames


def script_to_json(frames: list[MotionFrame]) -> str:
    return json.dumps({"version": 1, "frames": [asdict(f) for f in frames]}, indent=1)


def script_from_json(text: str) -> list[MotionFrame]:
    data = json.loads(text)
    if data.get("version") != 1:
        raise ValueError(f"unsupported motion script version {data.get('version')!r}")
    return [MotionFrame(int(f["index"]), float(f["yaw"]), float(f["pitch"]),
                        {str(k): float(v) for k, v in f["expression"].items()}) for f in data["frames"]]
