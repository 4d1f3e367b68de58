// The web bundle (perse_ray/avatar/bundle.py): parse and validate, then decode latents on the CPU.
// Pure ES module with no DOM use, so Node runs the same code in the tests.

export const MAGIC = "PRWB";
export const BUNDLE_VERSION = 4; // 2: branch_regions; 3: anchored and residual branches; 4: attribute_composition
export const MAX_BUNDLE_BYTES = 64 * 1024 * 1024;
const MAX_HEADER_BYTES = 1024 * 1024;
const MAX_RESIDUALS = 64; // as perse_ray/avatar/layout.py
const OUTPUTS = [["mean", 3], ["quat", 4], ["scale", 3], ["opacity", 1], ["color", 3]];

export class BundleError extends Error {
  constructor(message) { super(message); this.name = "BundleError"; }
}

function expectedShapes(h) {
  const n = h.num_gaussians, d = h.decoder;
  const nb = d.branch_dims.length, zmax = Math.max(...d.branch_dims), hid = d.hidden_dim;
  const g = d.feature_dim + 3 + 6 * d.pos_freqs;
  const shapes = { means: [n, 3], quats: [n, 4], log_scales: [n, 3], opacity_logits: [n], color_logits: [n, 3],
    features: [n, d.feature_dim], w_gauss: [nb, g, hid], w_z: [nb, zmax, hid], b_in: [nb, hid],
    w_out: [nb, hid, 14], b_out: [nb, 14], branch_regions: [nb, n] };
  for (const a of h.layout.attributes) shapes[`codes.${a.name}`] = [a.edit_labels.length, a.code_dim];
  for (let i = 0; i < d.hidden_layers - 1; i++) {
    shapes[`w_hidden.${i}`] = [nb, hid, hid];
    shapes[`b_hidden.${i}`] = [nb, hid];
  }
  return shapes;
}

/**
 * The decoder's branches, as LatentLayout.branches orders them: the expression, each attribute,
 * then each attribute's residual branches (added after training). {input, anchored}; an anchored
 * branch outputs f(z) - f(0), exactly zero where its input is all zeros.
 */
export function layoutBranches(lay) {
  const out = [{ input: "expression", anchored: false }];
  for (const a of lay.attributes) out.push({ input: a.name, anchored: Boolean(a.anchored) });
  for (const a of lay.attributes) for (let r = 0; r < (a.residuals || 0); r++) out.push({ input: a.name, anchored: true });
  return out;
}

function checkHeader(h) {
  const fail = (m) => { throw new BundleError(`header: ${m}`); };
  if (!h || typeof h !== "object" || h.format !== "perse-ray-web-bundle") fail("not a perse-ray web bundle");
  if (h.format_version !== BUNDLE_VERSION) fail(`format_version ${h.format_version} is not supported (expected ${BUNDLE_VERSION})`);
  const d = h.decoder, lay = h.layout, cam = h.camera;
  if (!d || !lay || !cam || !Array.isArray(lay.attributes) || !Array.isArray(lay.expressions)) fail("missing layout, camera or decoder");
  const ints = [h.num_gaussians, d.feature_dim, d.pos_freqs, d.hidden_dim, d.hidden_layers, ...(d.branch_dims || [])];
  if (!ints.every((v) => Number.isInteger(v) && v >= 0) || h.num_gaussians < 1 || d.hidden_layers < 1) fail("counts must be positive integers");
  if (d.activation !== "silu") fail(`unknown activation ${d.activation}`);
  if (!["sum", "union", "owned"].includes(d.attribute_composition)) {
    fail(`unknown attribute_composition ${d.attribute_composition}`);
  }
  for (const a of lay.attributes) {
    const r = a.residuals ?? 0;
    if (!Number.isInteger(r) || r < 0 || r > MAX_RESIDUALS) fail(`attribute ${a.name}: residuals ${r} not in 0..${MAX_RESIDUALS}`);
  }
  const branches = layoutBranches(lay);
  const dims = branches.map((b) => (b.input === "expression" ? Math.max(lay.expressions.length, 1)
    : lay.attributes.find((a) => a.name === b.input).code_dim));
  if (JSON.stringify(dims) !== JSON.stringify(d.branch_dims)) fail(`branch_dims ${d.branch_dims} do not match the layout`);
  if (!Array.isArray(d.outputs) || JSON.stringify(d.outputs.map((o) => [o[0], o[1]])) !== JSON.stringify(OUTPUTS)) fail("unexpected decoder outputs");
  for (const v of [cam.fov_deg, cam.distance, d.position_scale, d.color_dominance, ...d.outputs.map((o) => o[2])]) {
    if (typeof v !== "number" || !Number.isFinite(v)) fail("camera and decoder constants must be finite numbers");
  }
}

/** Parse an ArrayBuffer into {header, arrays} (Float32Array views); BundleError names the problem. */
export function parseBundle(buffer, { maxBytes = MAX_BUNDLE_BYTES } = {}) {
  const size = buffer.byteLength;
  if (size > maxBytes) throw new BundleError(`bundle of ${size} bytes exceeds the cap of ${maxBytes} bytes`);
  if (size < 12) throw new BundleError(`truncated: ${size} bytes, shorter than the 12-byte prefix`);
  const view = new DataView(buffer);
  const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
  if (magic !== MAGIC) throw new BundleError(`not a web bundle (magic ${JSON.stringify(magic)})`);
  const version = view.getUint32(4, true);
  if (version !== BUNDLE_VERSION) throw new BundleError(`format version ${version} is not supported (expected ${BUNDLE_VERSION})`);
  const headLen = view.getUint32(8, true);
  if (headLen > MAX_HEADER_BYTES || 12 + headLen > size) throw new BundleError(`truncated or corrupt: header length ${headLen}, file of ${size} bytes`);
  let header;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(new Uint8Array(buffer, 12, headLen)));
  } catch (e) {
    throw new BundleError(`header: not valid JSON (${e.message})`);
  }
  checkHeader(header);
  const expected = expectedShapes(header);
  const dataAt = (12 + headLen + 3) & ~3;
  let end = 0;
  const arrays = {};
  if (!Array.isArray(header.sections)) throw new BundleError("header: no section table");
  const declared = dataAt + header.sections.reduce((t, s) => t + (Number(s && s.nbytes) || 0), 0);
  if (declared > maxBytes) throw new BundleError(`bundle declares ${declared} bytes, over the cap of ${maxBytes} bytes`);
  for (const s of header.sections) {
    const { name, dtype, shape, offset, nbytes } = s || {};
    if (!Object.hasOwn(expected, name) && name !== "backdrop") throw new BundleError(`section ${name}: unknown`);
    if (Object.hasOwn(arrays, name)) throw new BundleError(`section ${name}: repeated`);
    if (dtype !== "float32") throw new BundleError(`section ${name}: dtype ${dtype}, expected float32`);
    const want = name === "backdrop" ? null : expected[name];
    const ok = Array.isArray(shape) && (want ? JSON.stringify(shape) === JSON.stringify(want)
      : shape.length === 3 && shape[0] === 3 && shape[1] === shape[2] && shape[1] >= 1 && shape[1] <= 1024);
    if (!ok) throw new BundleError(`section ${name}: shape ${JSON.stringify(shape)}, expected ${want ? JSON.stringify(want) : "[3, R, R]"}`);
    const count = shape.reduce((a, b) => a * b, 1);
    if (offset !== end || nbytes !== 4 * count) throw new BundleError(`section ${name}: offset/nbytes do not follow the table`);
    end += nbytes;
    if (dataAt + end > size) throw new BundleError(`truncated: section ${name} ends at byte ${dataAt + end}, file has ${size}`);
    const arr = new Float32Array(buffer, dataAt + offset, count);
    for (let i = 0; i < count; i++) {
      if (!Number.isFinite(arr[i])) throw new BundleError(`section ${name} holds NaN or inf`);
    }
    arrays[name] = arr;
  }
  const missing = Object.keys(expected).filter((k) => !arrays[k]);
  if (missing.length) throw new BundleError(`sections missing: ${missing.join(", ")}`);
  if (dataAt + end !== size) throw new BundleError(`${size - dataAt - end} bytes after the last section (file of ${size}, expected ${dataAt + end})`);
  return { header, arrays, byteLength: size };
}

/** The latent for slider values (edit index space) and expression values, as Avatar.latent composes it. */
export function composeLatent(bundle, attributes = {}, expression = {}) {
  const lay = bundle.header.layout;
  const z = [];
  for (const name of lay.expressions) z.push(Math.fround(expression[name] ?? 0));
  for (const a of lay.attributes) {
    const table = bundle.arrays[`codes.${a.name}`], k = a.edit_labels.length, d = a.code_dim;
    const s = Math.fround(attributes[a.name] ?? 0);
    const lo = Math.min(Math.floor(s), k - 1), hi = Math.min(lo + 1, k - 1);
    const alpha = Math.fround(s - lo), beta = Math.fround(1 - alpha);
    for (let j = 0; j < d; j++) {
      z.push(Math.fround(Math.fround(table[lo * d + j] * beta) + Math.fround(table[hi * d + j] * alpha)));
    }
  }
  return Float32Array.from(z);
}

/** Where each branch's input sits in z: [start, length] (a layout without expressions feeds a zero). */
export function branchSlices(bundle) {
  const lay = bundle.header.layout;
  const where = { expression: [0, lay.expressions.length] };
  let at = lay.expressions.length;
  for (const a of lay.attributes) { where[a.name] = [at, a.code_dim]; at += a.code_dim; }
  return layoutBranches(lay).map((b) => where[b.input]);
}

const silu = (x) => x / (1 + Math.exp(-x));
const TINY = 1.1754943508222875e-38; // float32's smallest normal: below it a Gaussian has no material
const logSigmoid = (x) => (x >= 0 ? -Math.log1p(Math.exp(-x)) : x - Math.log1p(Math.exp(x)));

/**
 * The decoder: a sum of per-branch MLPs over the fixed canonical Gaussians. Each branch's output
 * [N, 14] is cached with the code it was computed for, so a slider change re-runs its branch only.
 */
export class Decoder {
  constructor(bundle) {
    const h = bundle.header, d = h.decoder, a = bundle.arrays;
    this.bundle = bundle;
    this.n = h.num_gaussians;
    this.hidden = d.hidden_dim;
    this.layers = d.hidden_layers;
    this.nb = d.branch_dims.length;
    this.zmax = Math.max(...d.branch_dims);
    this.slices = branchSlices(bundle);
    this.units = Object.fromEntries(d.outputs.map(([k, , u]) => [k, u]));
    const n = this.n, H = this.hidden, F = d.feature_dim, P = d.pos_freqs, G = F + 3 + 6 * P;
    // Per-Gaussian input (feature + position encoding) projected by every branch once: [nb][N*H].
    const gin = new Float32Array(G);
    const scale = Math.fround(d.position_scale);
    this.gproj = Array.from({ length: this.nb }, () => new Float32Array(n * H));
    const acc = new Float64Array(H);
    for (let i = 0; i < n; i++) {
      for (let f = 0; f < F; f++) gin[f] = a.features[i * F + f];
      for (let c = 0; c < 3; c++) {
        const x = Math.fround(a.means[i * 3 + c] / scale);
        gin[F + c] = x;
        for (let k = 0; k < P; k++) {
          const ang = Math.fround(x * Math.fround(Math.fround(2 ** k) * Math.fround(Math.PI)));
          gin[F + 3 + c * P + k] = Math.sin(ang);
          gin[F + 3 + 3 * P + c * P + k] = Math.cos(ang);
        }
      }
      for (let b = 0; b < this.nb; b++) {
        acc.fill(0);
        const w = a.w_gauss, base = b * G * H;
        for (let g = 0; g < G; g++) {
          const x = gin[g], row = base + g * H;
          if (x === 0) continue;
          for (let j = 0; j < H; j++) acc[j] += x * w[row + j];
        }
        this.gproj[b].set(acc, i * H);
      }
    }
    // An anchored branch (a part added after training, or every attribute's under the "owned"
    // composition) outputs f(z) - f(0), and exactly zero at z = 0.
    this.anchored = layoutBranches(h.layout).map((b) => b.anchored);
    // compose's parts: each branch's attribute (-1: the expression), its residual branches with it
    const inputs = layoutBranches(h.layout).map((b) => b.input);
    this.parts = [...new Set(inputs)].slice(1);
    this.partOf = inputs.map((name) => this.parts.indexOf(name));
    // f(0) of every anchored branch, at load: a slider change then costs one evaluation, the first too
    this.anchors = this.anchored.map((anchored, b) => (anchored
      ? this.evaluate(b, new Float32Array(this.slices[b][1]), new Float32Array(this.n * 14)) : null));
    this.outputs = new Array(this.nb).fill(null);
    this.keys = new Array(this.nb).fill(null);
    this.decodes = 0; // branch evaluations so far (a test counts them)
    const N = this.n;
    this.gaussians = { means: new Float32Array(N * 3), quats: new Float32Array(N * 4), scales: new Float32Array(N * 3),
      opacities: new Float32Array(N), colors: new Float32Array(N * 3) };
  }

  /** Re-run branch b for its input zb (length = its slice) unless that output is cached; true if it ran. */
  setBranch(b, zb) {
    const key = Array.from(zb, (v) => Math.fround(v)).join(",");
    if (this.keys[b] === key) return false;
    const out = this.outputs[b] || new Float32Array(this.n * 14);
    if (!this.anchored[b]) {
      this.evaluate(b, zb, out);
    } else if (Array.from(zb).every((v) => v === 0)) {
      out.fill(0);
    } else {
      this.evaluate(b, zb, out);
      const anchor = this.anchors[b];
      for (let i = 0; i < out.length; i++) out[i] = Math.fround(out[i] - anchor[i]);
    }
    this.outputs[b] = out;
    this.keys[b] = key;
    this.decodes += 1;
    return true;
  }

  /** Branch b's MLP at input zb for every Gaussian, written into out [N*14] (zero outside its region). */
  evaluate(b, zb, out) {
    const a = this.bundle.arrays, H = this.hidden, n = this.n, OUT = 14;
    const z = zb.length ? Float32Array.from(zb) : new Float32Array(1);
    const c = new Float64Array(H);
    for (let j = 0; j < H; j++) c[j] = a.b_in[b * H + j];
    for (let k = 0; k < z.length; k++) {
      const row = (b * this.zmax + k) * H;
      for (let j = 0; j < H; j++) c[j] += z[k] * a.w_z[row + j];
    }
    const cf = Float32Array.from(c);
    const hiddenW = [], hiddenB = [];
    for (let l = 0; l < this.layers - 1; l++) {
      hiddenW.push(a[`w_hidden.${l}`].subarray(b * H * H, (b + 1) * H * H));
      hiddenB.push(a[`b_hidden.${l}`].subarray(b * H, (b + 1) * H));
    }
    const wOut = a.w_out.subarray(b * H * OUT, (b + 1) * H * OUT), bOut = a.b_out.subarray(b * OUT, (b + 1) * OUT);
    const gp = this.gproj[b], region = a.branch_regions.subarray(b * n, (b + 1) * n);
    let h = new Float32Array(H), h2 = new Float32Array(H);
    const acc = new Float64Array(Math.max(H, OUT));
    for (let i = 0; i < n; i++) {
      if (region[i] === 0) { out.fill(0, i * OUT, (i + 1) * OUT); continue; } // outside the branch's region
      const off = i * H;
      for (let j = 0; j < H; j++) h[j] = silu(gp[off + j] + cf[j]);
      for (let l = 0; l < hiddenW.length; l++) {
        const W = hiddenW[l], B = hiddenB[l];
        for (let j = 0; j < H; j++) acc[j] = B[j];
        for (let k = 0; k < H; k++) {
          const x = h[k], row = k * H;
          for (let j = 0; j < H; j++) acc[j] += x * W[row + j];
        }
        for (let j = 0; j < H; j++) h2[j] = silu(acc[j]);
        [h, h2] = [h2, h];
      }
      for (let o = 0; o < OUT; o++) acc[o] = bOut[o];
      for (let k = 0; k < H; k++) {
        const x = h[k], row = k * OUT;
        for (let o = 0; o < OUT; o++) acc[o] += x * wOut[row + o];
      }
      for (let o = 0; o < OUT; o++) out[i * OUT + o] = acc[o];
    }
    return out;
  }

  /** Feed latent z to every branch (cached ones are skipped); returns the number of branches that ran. */
  setLatent(z) {
    let ran = 0;
    this.slices.forEach(([start, len], b) => { if (this.setBranch(b, z.subarray(start, start + len))) ran += 1; });
    return ran;
  }

  /**
   * Sum the cached branch outputs and activate: {means, quats, scales, opacities, colors} (typed
   * arrays). With the "union" and "owned" compositions each attribute's opacity change (its
   * branches summed) composes as perse_ray/avatar/model.py union_opacity does; "owned" weights each
   * attribute's whole change (position, shape, colour) by the material it owns (model.py owned_weights).
   */
  compose() {
    const a = this.bundle.arrays, n = this.n, OUT = 14, u = this.units, g = this.gaussians;
    const outs = this.outputs;
    if (outs.some((o) => !o)) throw new Error("compose() before every branch was decoded");
    const dec = this.bundle.header.decoder;
    const owned = dec.attribute_composition === "owned", union = owned || dec.attribute_composition === "union";
    const dominance = union ? dec.color_dominance : 0;
    // part 0 is the expression, part p + 1 attribute p (its residual branches with it); sum: one part
    const P = this.parts.length, partOf = this.partOf.map((p) => (union ? p + 1 : 0));
    const pt = new Float64Array((P + 1) * OUT), d = new Float64Array(OUT);
    const weight = new Float64Array(P), add = new Float64Array(P);
    for (let i = 0; i < n; i++) {
      const off = i * OUT;
      pt.fill(0);
      for (let b = 0; b < outs.length; b++) {
        const o = outs[b], at = partOf[b] * OUT;
        for (let k = 0; k < OUT; k++) pt[at + k] += o[off + k];
      }
      // With at most one attribute changing this Gaussian, every composition is the sum: a union of
      // one is sigmoid(l + delta), its owned share is 1 and it is the largest colour change.
      let active = 0;
      if (union) {
        for (let p = 1; p <= P; p++) {
          for (let k = p * OUT; k < (p + 1) * OUT; k++) if (pt[k] !== 0) { active++; break; }
        }
      }
      if (active <= 1) {
        for (let k = 0; k < OUT; k++) {
          let sum = pt[k];
          if (active) for (let p = 1; p <= P; p++) sum += pt[p * OUT + k];
          d[k] = sum;
        }
        g.opacities[i] = 1 / (1 + Math.exp(-(a.opacity_logits[i] + u.opacity * d[10])));
        for (let c = 0; c < 3; c++) g.colors[i * 3 + c] = 1 / (1 + Math.exp(-(a.color_logits[i * 3 + c] + u.color * d[11 + c])));
        this.place(i, d);
        continue;
      }
      // union_opacity: a lowering change only keeps, a raising one only covers (a zero one adds nothing)
      const l = a.opacity_logits[i] + u.opacity * pt[10], lsl = logSigmoid(l), lsnl = logSigmoid(-l);
      let keep = 0, clear = 0;
      for (let p = 0; p < P; p++) {
        const delta = u.opacity * pt[(p + 1) * OUT + 10];
        add[p] = 0;
        if (delta < 0) keep += logSigmoid(l + delta) - lsl;
        else if (delta > 0) {
          const c = logSigmoid(-l - delta) - lsnl;
          clear += c;
          if (owned) add[p] = -Math.expm1(c);
        }
      }
      const source = Math.exp(lsl + keep);
      g.opacities[i] = 1 - (1 - source) * Math.exp(clear);
      // owned_weights: each attribute moves and recolours the source's material and what it adds itself
      let total = source;
      for (let p = 0; p < P; p++) total += add[p];
      for (let p = 0; p < P; p++) weight[p] = owned && total > TINY ? (source + add[p]) / total : 1;
      for (let k = 0; k < OUT; k++) {
        let sum = pt[k];
        for (let p = 0; p < P; p++) sum += weight[p] * pt[(p + 1) * OUT + k];
        d[k] = sum;
      }
      this.place(i, d);
      if (dominance === 0) {
        for (let c = 0; c < 3; c++) g.colors[i * 3 + c] = 1 / (1 + Math.exp(-(a.color_logits[i * 3 + c] + u.color * d[11 + c])));
        continue;
      }
      // dominant_change: each (owned) colour change weighted by how far it falls short of the largest
      let largest = -Infinity;
      for (let p = 0; p < P; p++) {
        let sq = 0;
        for (let c = 0; c < 3; c++) sq += (weight[p] * u.color * pt[(p + 1) * OUT + 11 + c]) ** 2;
        add[p] = Math.sqrt(sq + 1e-12); // the change's size (add is free again)
        largest = Math.max(largest, add[p]);
      }
      for (let c = 0; c < 3; c++) {
        let change = u.color * pt[11 + c];
        for (let p = 0; p < P; p++) change += weight[p] * Math.exp(dominance * (add[p] - largest)) * u.color * pt[(p + 1) * OUT + 11 + c];
        g.colors[i * 3 + c] = 1 / (1 + Math.exp(-(a.color_logits[i * 3 + c] + change)));
      }
    }
    return g;
  }

  /** Gaussian i's means, quats and scales from its summed deltas d (the first 10 channels). */
  place(i, d) {
    const a = this.bundle.arrays, u = this.units, g = this.gaussians;
    for (let c = 0; c < 3; c++) g.means[i * 3 + c] = a.means[i * 3 + c] + u.mean * d[c];
    for (let c = 0; c < 4; c++) g.quats[i * 4 + c] = a.quats[i * 4 + c] + u.quat * d[3 + c];
    for (let c = 0; c < 3; c++) g.scales[i * 3 + c] = Math.exp(a.log_scales[i * 3 + c] + u.scale * d[7 + c]);
  }
}

const SH_C0 = 0.28209479177387814;

/** A standard binary 3DGS .ply of decoded Gaussians (the same fields and activations as export_ply). */
export function plyBytes(g) {
  const n = g.opacities.length;
  const names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"];
  const head = `ply\nformat binary_little_endian 1.0\nelement vertex ${n}\n${names.map((p) => `property float ${p}\n`).join("")}end_header\n`;
  const headBytes = new TextEncoder().encode(head);
  const out = new Uint8Array(headBytes.length + n * names.length * 4);
  out.set(headBytes);
  const v = new DataView(out.buffer, headBytes.length);
  let at = 0;
  const put = (x) => { v.setFloat32(at, x, true); at += 4; };
  for (let i = 0; i < n; i++) {
    for (let c = 0; c < 3; c++) put(g.means[i * 3 + c]);
    put(0); put(0); put(0);
    for (let c = 0; c < 3; c++) put((g.colors[i * 3 + c] - 0.5) / SH_C0);
    const o = Math.min(Math.max(g.opacities[i], 1e-6), 1 - 1e-6);
    put(Math.log(o / (1 - o)));
    for (let c = 0; c < 3; c++) put(Math.log(g.scales[i * 3 + c]));
    const q = g.quats.subarray(i * 4, i * 4 + 4);
    const norm = Math.max(Math.hypot(q[0], q[1], q[2], q[3]), 1e-12);
    for (let c = 0; c < 4; c++) put(q[c] / norm);
  }
  return out;
}
