"""train_avatar on CUDA (gsplat) against the same training on the CPU kernel.

Needs CUDA (and gsplat's CUDA kernels, which it compiles on first use); skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch

from perse_ray.avatar.losses import psnr
from perse_ray.bench.ground_truth import frames_from_head
from perse_ray.bench.procedural import ProceduralHead
from perse_ray.config import load_config
from perse_ray.train.loop import latest_checkpoint, train_avatar

from test_avatar import SHRUNK  # the avatar tests' shrunk sizes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]



@pytest.fixture(scope="module")
def rows():
    return frames_from_head(ProceduralHead(seed=0), load_config("cpu-smoke", SHRUNK))


def _train(rows, device, steps, **kw):
    cfg = load_config("cpu-smoke", SHRUNK + [f"train.steps={steps}", f"train.device={device}",
                                             "train.checkpoint_every=10"])
    return train_avatar(rows, cfg, progress=False, **kw)


def test_cuda_training_learns_like_cpu_training(rows):
    untrained = _train(rows, "cuda", 0)
    on_gpu = _train(rows, "cuda", 150)
    on_cpu = _train(rows, "cpu", 150)
    assert on_gpu.avatar.model.means.device.type == "cpu"  # the result is portable
    gain = on_gpu.metrics["heldout_psnr"] - untrained.metrics["heldout_psnr"]
    assert gain > 4.0, gain
    # same seed, same batches, same relocation draws: only the rasterizers' float rounding differs
    assert abs(on_gpu.metrics["heldout_psnr"] - on_cpu.metrics["heldout_psnr"]) < 1.0, (on_gpu.metrics, on_cpu.metrics)


def test_cuda_checkpoint_resumes(tmp_path, rows):
    class Killed(Exception):
        pass

    def kill_at_10(path, step):
        if step == 10:
            raise Killed

    with pytest.raises(Killed):
        _train(rows, "cuda", 20, checkpoint_dir=tmp_path, on_checkpoint=kill_at_10)
    assert latest_checkpoint(tmp_path).name == "ckpt-00000010"
    resumed = _train(rows, "cuda", 20, checkpoint_dir=tmp_path)
    full = _train(rows, "cuda", 20)
    assert [h["step"] for h in resumed.history] == [10, 20]
    a, b = full.avatar, resumed.avatar
    z = a.latent()[None]
    img_a = a.render(z, [(10.0, 0.0)], 32, 32, background=[1.0, 1.0, 1.0])
    img_b = b.render(z, [(10.0, 0.0)], 32, 32, background=[1.0, 1.0, 1.0])
    assert float(psnr(img_a, img_b)) > 40  # gsplat's atomic adds make runs differ in the last bits only
