// Client-side drawing: decoded Gaussians -> Spark's PackedSplats -> a three.js scene, with the
// server's camera conventions (perse_ray/camera.py: OpenCV axes, orbit around the head centre).
import * as THREE from "three";
import { PackedSplats, SparkRenderer, SplatMesh, utils } from "@sparkjsdev/spark";

/** Whether this browser gives a WebGL2 context (Spark needs one). */
export function hasWebGL2() {
  try {
    return !!document.createElement("canvas").getContext("webgl2");
  } catch {
    return false;
  }
}

/** Camera centre and axes of orbit_viewmat(yaw, pitch, distance), in world (OpenCV) coordinates. */
export function orbit(yawDeg, pitchDeg, distance) {
  const yaw = (yawDeg * Math.PI) / 180, pitch = (pitchDeg * Math.PI) / 180;
  const centre = [distance * Math.sin(yaw) * Math.cos(pitch), -distance * Math.sin(pitch), -distance * Math.cos(yaw) * Math.cos(pitch)];
  const forward = [-Math.sin(yaw) * Math.cos(pitch), Math.sin(pitch), Math.cos(yaw) * Math.cos(pitch)];
  const over = Math.abs(((pitchDeg + 180) % 360 + 360) % 360 - 180) > 90;
  const right = [Math.cos(yaw) * (over ? -1 : 1), 0, Math.sin(yaw) * (over ? -1 : 1)];
  const down = [forward[1] * right[2] - forward[2] * right[1], forward[2] * right[0] - forward[0] * right[2],
    forward[0] * right[1] - forward[1] * right[0]];
  return { centre, forward, right, down };
}

export class SplatView {
  constructor(canvas, numSplats, { fovDeg, size }) {
    this.canvas = canvas;
    this.n = numSplats;
    this.renderer = new THREE.WebGLRenderer({ canvas, antialias: false, alpha: true, premultipliedAlpha: true,
      preserveDrawingBuffer: true });
    this.renderer.setPixelRatio(1);
    this.renderer.setSize(size, size, false);
    this.renderer.setClearColor(0x000000, 0);
    this.scene = new THREE.Scene();
    this.camera = new THREE.PerspectiveCamera(fovDeg, 1, 0.01, 100);
    this.spark = new SparkRenderer({ renderer: this.renderer });
    this.scene.add(this.spark);
    this.packed = new PackedSplats({ maxSplats: numSplats });
    this.array = this.packed.ensureSplats(numSplats);
    this.packed.numSplats = numSplats;
    // SplatMesh installs its splatEncoding on the PackedSplats: keep one object and change it in place.
    this.encoding = { rgbMin: 0, rgbMax: 1, lnScaleMin: -12, lnScaleMax: 9 };
    this.mesh = new SplatMesh({ packedSplats: this.packed, splatEncoding: this.encoding });
    this.scene.add(this.mesh);
    this.frames = 0;
    this.pendingUntil = 0;
    this.loop = this.loop.bind(this);
  }

  /** Pack decoded Gaussians {means, quats (wxyz), scales, opacities, colors} for the GPU. */
  update(g) {
    const n = this.n, arr = this.array;
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < 3 * n; i++) {
      const l = Math.log(g.scales[i]);
      if (l < lo) lo = l;
      if (l > hi) hi = l;
    }
    // The 8-bit log-scale code spans this frame's own range, not Spark's default [-12, 9].
    const encoding = Object.assign(this.encoding, { lnScaleMin: lo - 0.01, lnScaleMax: Math.max(hi + 0.01, lo + 0.1) });
    this.packed.splatEncoding = encoding;
    for (let i = 0; i < n; i++) {
      const q = g.quats, o = i * 4;
      const norm = Math.max(Math.hypot(q[o], q[o + 1], q[o + 2], q[o + 3]), 1e-12);
      utils.setPackedSplat(arr, i, g.means[3 * i], g.means[3 * i + 1], g.means[3 * i + 2],
        g.scales[3 * i], g.scales[3 * i + 1], g.scales[3 * i + 2],
        q[o + 1] / norm, q[o + 2] / norm, q[o + 3] / norm, q[o] / norm, g.opacities[i],
        g.colors[3 * i], g.colors[3 * i + 1], g.colors[3 * i + 2], encoding);
    }
    this.packed.needsUpdate = true;
    this.mesh.updateVersion();
    this.invalidate();
  }

  setCamera(yawDeg, pitchDeg, distance) {
    const { centre, right, down, forward } = orbit(yawDeg, pitchDeg, distance);
    // three.js cameras look down their -z with +y up: columns right, -down, -forward.
    const m = new THREE.Matrix4().set(
      right[0], -down[0], -forward[0], centre[0],
      right[1], -down[1], -forward[1], centre[1],
      right[2], -down[2], -forward[2], centre[2],
      0, 0, 0, 1);
    m.decompose(this.camera.position, this.camera.quaternion, this.camera.scale);
    this.camera.updateMatrixWorld(true);
    this.invalidate();
  }

  /** Draw for a while after a change: Spark sorts in a worker, so a few frames settle the order. */
  invalidate(ms = 1500) {
    const idle = performance.now() >= this.pendingUntil;
    this.pendingUntil = Math.max(this.pendingUntil, performance.now() + ms);
    if (idle) requestAnimationFrame(this.loop);
  }

  loop() {
    this.renderer.render(this.scene, this.camera);
    this.frames += 1;
    if (performance.now() < this.pendingUntil) requestAnimationFrame(this.loop);
  }

  dispose() {
    this.pendingUntil = 0;
    this.mesh.dispose?.();
    this.renderer.dispose();
  }
}
