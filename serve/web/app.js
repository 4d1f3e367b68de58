// perse-ray viewer. Two renderers behind one set of controls:
//   client  the avatar's web bundle is decoded here (bundle.js) and splatted with Spark (splat_view.js);
//           sliders re-decode only their branch, orbit and zoom decode nothing, no request per change;
//   server  every change is POST /v1/avatars/{id}/render (the reference; works without WebGL2).
// State lives in the query string (render=server|client picks the mode). Every request goes
// through api(), which sends the credential the page was opened with.
import { BundleError, Decoder, MAX_BUNDLE_BYTES, composeLatent, parseBundle, plyBytes } from "./bundle.js";

const RENDER_SIZE = 384;
const STRIP_SIZE = 96;
const STRIP_STEPS = 5;
const DEBOUNCE_MS = 60;
const CAMERA = { yaw: { min: -90, max: 90, step: 1 }, pitch: { min: -60, max: 60, step: 1 } };
const ZOOM = { min: 0.5, max: 2 };

const $ = (id) => document.getElementById(id);
const state = { avatars: [], avatar: null, attributes: {}, expression: {}, yaw: 0, pitch: 0, zoom: 1, mode: "server" };
const client = { key: null, bundle: null, decoder: null, view: null, error: null, loading: null, frameReq: 0,
  decodeMs: [], bundleBytes: 0, bundleMs: 0, shown: null };
let lastGoodUrl = null;
let requestSeq = 0; // newest request wins: older replies are dropped
let inflight = null;
let debounceTimer = null;

// ---------------------------------------------------------------- requests

// The credential the page was opened with: ?token=… or #token=… (a signed viewer link).
const CREDENTIAL = (() => {
  const q = new URLSearchParams(location.search).get("token");
  const h = new URLSearchParams(location.hash.slice(1)).get("token");
  return q || h || null;
})();

/** Every request of the page goes through here. */
function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (CREDENTIAL) headers.set("Authorization", `Bearer ${CREDENTIAL}`);
  return fetch(path, { ...init, headers });
}

function post(path, payload, signal) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: payload, signal });
}

function setStatus(text) { $("status").textContent = text; }

// kind "note" (a fallback or an unknown avatar) stays up after a good render; errors are cleared by one.
function showBanner(text, kind = "") {
  const b = $("banner");
  b.textContent = text;
  b.hidden = !text;
  b.dataset.kind = text ? kind : "";
}

function clearErrorBanner() {
  if ($("banner").dataset.kind !== "note") showBanner("");
}

async function errorMessage(resp) {
  // FastAPI replies {"detail": "..."} or, for validation errors, {"detail": [{loc, msg}, ...]}.
  try {
    const body = await resp.json();
    const d = body.detail ?? body.error ?? body;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
    return typeof d === "string" ? d : JSON.stringify(d);
  } catch {
    return `${resp.status} ${resp.statusText}`;
  }
}

// ---------------------------------------------------------------- URL state

function readUrl() {
  const q = new URLSearchParams(location.search);
  const out = { avatar: q.get("avatar"), attributes: {}, expression: {}, yaw: null, pitch: null, zoom: null,
    mode: q.get("render") };
  for (const [k, v] of q) {
    if (k.startsWith("a.")) out.attributes[k.slice(2)] = Number(v);
    else if (k.startsWith("e.")) out.expression[k.slice(2)] = Number(v);
  }
  for (const k of ["yaw", "pitch", "zoom"]) if (q.has(k)) out[k] = Number(q.get(k));
  return out;
}

function writeUrl() {
  const old = new URLSearchParams(location.search);
  const q = new URLSearchParams();
  if (old.has("token")) q.set("token", old.get("token"));
  if (state.avatar) q.set("avatar", state.avatar.id);
  q.set("render", state.mode);
  for (const [k, v] of Object.entries(state.attributes)) q.set(`a.${k}`, String(v));
  for (const [k, v] of Object.entries(state.expression)) q.set(`e.${k}`, String(v));
  q.set("yaw", String(state.yaw));
  q.set("pitch", String(state.pitch));
  if (state.zoom !== 1) q.set("zoom", String(state.zoom));
  history.replaceState(null, "", `${location.pathname}?${q}${location.hash}`);
}

// ---------------------------------------------------------------- controls

function slider(container, name, { min, max, step, value, ticks, onInput }) {
  const row = document.createElement("div");
  row.className = "slider";
  const label = document.createElement("label");
  label.textContent = name;
  const input = document.createElement("input");
  Object.assign(input, { type: "range", min, max, step, value });
  input.dataset.name = name;
  input.id = `slider-${container.id}-${name}`;
  label.htmlFor = input.id;
  const out = document.createElement("output");
  out.textContent = Number(value).toFixed(2);
  input.addEventListener("input", () => {
    out.textContent = Number(input.value).toFixed(2);
    onInput(Number(input.value));
  });
  row.append(label, input, out);
  if (ticks) {
    const t = document.createElement("div");
    t.className = "ticks";
    for (const tick of ticks) {
      const s = document.createElement("span");
      s.textContent = tick;
      t.append(s);
    }
    row.append(document.createElement("span"), t);
  }
  container.append(row);
  return input;
}

function buildControls(avatar, fromUrl) {
  const attrs = $("attributes");
  const exprs = $("expressions");
  const cam = $("camera");
  attrs.replaceChildren();
  exprs.replaceChildren();
  cam.replaceChildren();
  state.attributes = {};
  state.expression = {};
  const names = Object.keys(avatar.attributes || {});
  $("no-attributes").hidden = names.length > 0;
  for (const name of names) {
    const labels = avatar.attributes[name];
    const value = fromUrl.attributes[name] ?? 0;
    state.attributes[name] = value;
    slider(attrs, name, { min: 0, max: labels.length - 1, step: 0.05, value, ticks: labels,
      onInput: (v) => { state.attributes[name] = v; changed(); } });
  }
  for (const name of avatar.expressions || []) {
    const value = fromUrl.expression[name] ?? 0;
    state.expression[name] = value;
    slider(exprs, name, { min: 0, max: 1, step: 0.05, value,
      onInput: (v) => { state.expression[name] = v; changed(); } });
  }
  state.yaw = fromUrl.yaw ?? 0;
  state.pitch = fromUrl.pitch ?? 0;
  state.zoom = Math.min(ZOOM.max, Math.max(ZOOM.min, fromUrl.zoom ?? 1));
  for (const axis of ["yaw", "pitch"]) {
    slider(cam, axis, { ...CAMERA[axis], value: state[axis],
      onInput: (v) => { state[axis] = v; changed(); } });
  }
  const strip = $("strip-attribute");
  strip.replaceChildren(...names.map((n) => new Option(n, n)));
  $("strip-go").disabled = names.length === 0;
}

function syncCameraSliders() {
  for (const axis of ["yaw", "pitch"]) {
    const input = document.querySelector(`#camera input[data-name="${axis}"]`);
    if (input) {
      input.value = state[axis];
      input.nextElementSibling.textContent = Number(state[axis]).toFixed(2);
    }
  }
}

/** The same checks the server makes (LatentLayout.check_values), so both modes refuse alike. */
function checkValues(avatar) {
  for (const [name, s] of Object.entries(state.attributes)) {
    const top = avatar.attributes[name].length - 1;
    if (!(s >= 0 && s <= top)) return `attributes.${name}: slider ${s} outside [0, ${top}]`;
  }
  for (const [name, v] of Object.entries(state.expression)) {
    if (!(v >= -1 && v <= 2)) return `expression.${name}: value ${v} outside [-1, 2]`;
  }
  return null;
}

function changed() {
  writeUrl();
  if (state.mode === "client") scheduleClientFrame();
  else scheduleRender();
}

// ---------------------------------------------------------------- server rendering

function body(size, overrides = {}) {
  return JSON.stringify({
    attributes: { ...state.attributes, ...(overrides.attributes || {}) },
    expression: state.expression,
    camera: { yaw: state.yaw, pitch: state.pitch },
    width: size,
    height: size,
  });
}

function scheduleRender() {
  clearTimeout(debounceTimer);
  debounceTimer = setTimeout(render, DEBOUNCE_MS);
}

async function render() {
  if (!state.avatar || state.mode !== "server") return;
  const seq = ++requestSeq;
  if (inflight) inflight.abort();
  inflight = new AbortController();
  $("spinner").hidden = false;
  const t0 = performance.now();
  try {
    const resp = await post(`/v1/avatars/${encodeURIComponent(state.avatar.id)}/render`, body(RENDER_SIZE),
      inflight.signal);
    if (seq !== requestSeq) return;
    if (!resp.ok) {
      showBanner(`Render failed: ${await errorMessage(resp)}`);
      return; // keep the last good image
    }
    const blob = await resp.blob();
    if (seq !== requestSeq) return;
    const url = URL.createObjectURL(blob);
    $("view").src = url;
    if (lastGoodUrl) URL.revokeObjectURL(lastGoodUrl);
    lastGoodUrl = url;
    const ms = performance.now() - t0;
    $("latency").textContent = `${ms.toFixed(0)} ms (server)`;
    $("view").dataset.latencyMs = ms.toFixed(1);
    $("view").dataset.seq = String(seq);
    clearErrorBanner();
  } catch (err) {
    if (err.name === "AbortError") return;
    showBanner(`Server unreachable: ${err.message}`);
  } finally {
    if (seq === requestSeq) $("spinner").hidden = true;
  }
}

// ---------------------------------------------------------------- client rendering

async function loadClient(avatar) {
  const key = `${avatar.id}@${avatar.version}`;
  if (client.key === key && (client.decoder || client.loading)) return client.loading;
  disposeClient();
  client.key = key;
  client.loading = (async () => {
    const { SplatView, hasWebGL2 } = await import("./splat_view.js");
    if (!hasWebGL2()) throw new Error("this browser gives no WebGL2 context");
    const t0 = performance.now();
    // A pinned version is immutable: the browser caches it (no request at all on reload).
    const resp = await api(`/v1/avatars/${encodeURIComponent(avatar.id)}@${encodeURIComponent(avatar.version)}/bundle`);
    if (!resp.ok) throw new Error(`bundle: ${await errorMessage(resp)}`);
    const declared = Number(resp.headers.get("content-length") || 0);
    if (declared > MAX_BUNDLE_BYTES) throw new BundleError(`bundle of ${declared} bytes exceeds the cap of ${MAX_BUNDLE_BYTES} bytes`);
    const buffer = await resp.arrayBuffer();
    const bundle = parseBundle(buffer);
    const decoder = new Decoder(bundle);
    if (client.key !== key) return;
    client.bundleMs = performance.now() - t0;
    client.bundleBytes = buffer.byteLength;
    client.bundle = bundle;
    client.decoder = decoder;
    client.view = new SplatView($("gl"), bundle.header.num_gaussians,
      { fovDeg: bundle.header.camera.fov_deg, size: RENDER_SIZE });
    drawBackdrop(bundle);
    client.error = null;
  })();
  try {
    await client.loading;
  } catch (err) {
    if (client.key === key) {
      client.error = err.message;
      disposeClient(true);
    }
    throw err;
  } finally {
    client.loading = null;
  }
}

function disposeClient(keepKey = false) {
  if (client.view) client.view.dispose();
  Object.assign(client, { bundle: null, decoder: null, view: null, shown: null });
  if (!keepKey) client.key = null;
}

function drawBackdrop(bundle) {
  // The learned camera-fixed backdrop, bilinearly stretched under the splats as the server does.
  const c = $("backdrop"), arr = bundle.arrays.backdrop;
  const ctx = c.getContext("2d");
  if (!arr) {
    const [r, g, b] = bundle.header.background.map((v) => Math.round(255 * v));
    c.width = c.height = 1;
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(0, 0, 1, 1);
    return;
  }
  const res = Math.round(Math.sqrt(arr.length / 3));
  c.width = c.height = res;
  const img = ctx.createImageData(res, res);
  for (let i = 0; i < res * res; i++) {
    for (let ch = 0; ch < 3; ch++) img.data[4 * i + ch] = Math.round(255 / (1 + Math.exp(-arr[ch * res * res + i])));
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

function scheduleClientFrame() {
  if (!client.frameReq) client.frameReq = requestAnimationFrame(clientFrame);
}

function clientFrame() {
  client.frameReq = 0;
  if (state.mode !== "client" || !client.decoder || !state.avatar) return;
  const problem = checkValues(state.avatar);
  if (problem) { showBanner(`Render failed: ${problem}`); return; }
  const t0 = performance.now();
  const z = composeLatent(client.bundle, state.attributes, state.expression);
  const ran = client.decoder.setLatent(z);
  if (ran || !client.shown) {
    const g = client.decoder.compose();
    const ms = performance.now() - t0;
    if (client.shown) client.decodeMs.push(ms); // the first full decode is load time, not a slider change
    client.view.update(g);
    client.shown = { attributes: { ...state.attributes }, expression: { ...state.expression } };
    $("latency").textContent = `decode ${ms.toFixed(1)} ms (browser, ${ran} branch${ran === 1 ? "" : "es"})`;
  }
  client.view.setCamera(state.yaw, state.pitch, client.bundle.header.camera.distance / state.zoom);
  clearErrorBanner();
}

// ---------------------------------------------------------------- mode switch

async function setMode(mode, { quiet = false } = {}) {
  state.mode = mode;
  $("client-mode").checked = mode === "client";
  $("view").hidden = mode !== "server";
  $("client-stage").hidden = mode !== "client";
  document.body.dataset.mode = mode;
  writeUrl();
  if (mode === "server") {
    scheduleRender();
    return;
  }
  try {
    setStatus(`${state.avatar.id} (${state.avatar.version}) — loading bundle…`);
    await loadClient(state.avatar);
    setStatus(`${state.avatar.id} (${state.avatar.version})`);
    scheduleClientFrame();
  } catch (err) {
    setStatus(`${state.avatar.id} (${state.avatar.version})`);
    // Fall back to the server: the page stays usable.
    await setMode("server");
    showBanner(`Browser rendering unavailable (${err.message}); rendering on the server.`, "note");
    if (!quiet) console.warn(err);
  }
}

// ---------------------------------------------------------------- downloads and strip

async function download(kind) {
  if (!state.avatar) return;
  const id = state.avatar.id;
  if (state.mode === "client" && client.decoder) {
    if (kind === "ply") {
      // Exactly what is on screen: the Gaussians this page decoded.
      const url = URL.createObjectURL(new Blob([plyBytes(client.decoder.gaussians)], { type: "application/octet-stream" }));
      save(url, `${id}.ply`);
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } else {
      const c = document.createElement("canvas");
      c.width = c.height = RENDER_SIZE;
      const ctx = c.getContext("2d");
      ctx.drawImage($("backdrop"), 0, 0, RENDER_SIZE, RENDER_SIZE);
      ctx.drawImage($("gl"), 0, 0, RENDER_SIZE, RENDER_SIZE);
      save(c.toDataURL("image/png"), `${id}.png`);
    }
    return;
  }
  if (kind === "png") {
    if (!lastGoodUrl) return;
    save(lastGoodUrl, `${id}.png`);
    return;
  }
  try {
    const resp = await post(`/v1/avatars/${encodeURIComponent(id)}/ply`, body(RENDER_SIZE));
    if (!resp.ok) { showBanner(`Export failed: ${await errorMessage(resp)}`); return; }
    const url = URL.createObjectURL(await resp.blob());
    save(url, `${id}.ply`);
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    showBanner(`Server unreachable: ${err.message}`);
  }
}

function save(url, name) {
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.click();
}

async function renderStrip() {
  const name = $("strip-attribute").value;
  if (!state.avatar || !name) return;
  const last = state.avatar.attributes[name].length - 1;
  const strip = $("strip");
  strip.replaceChildren();
  const values = Array.from({ length: STRIP_STEPS }, (_, i) => (last * i) / (STRIP_STEPS - 1));
  for (const v of values) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = `${name} ${v.toFixed(2)}`;
    const cap = document.createElement("figcaption");
    cap.textContent = `${name} = ${v.toFixed(2)}`;
    fig.append(img, cap);
    strip.append(fig);
    try {
      const resp = await post(`/v1/avatars/${encodeURIComponent(state.avatar.id)}/render`,
        body(STRIP_SIZE, { attributes: { [name]: v } }));
      if (!resp.ok) { cap.textContent = await errorMessage(resp); continue; }
      img.src = URL.createObjectURL(await resp.blob());
    } catch (err) {
      showBanner(`Server unreachable: ${err.message}`);
      return;
    }
  }
}

// ---------------------------------------------------------------- drag to turn, wheel to zoom

function enableDrag() {
  const frame = $("frame");
  let start = null;
  frame.addEventListener("pointerdown", (e) => {
    start = { x: e.clientX, y: e.clientY, yaw: state.yaw, pitch: state.pitch };
    frame.setPointerCapture(e.pointerId);
    frame.classList.add("dragging");
  });
  frame.addEventListener("pointermove", (e) => {
    if (!start) return;
    const clamp = (v, { min, max }) => Math.max(min, Math.min(max, v));
    const round = state.mode === "client" ? (v) => v : Math.round; // the browser needs no coarse steps
    state.yaw = round(clamp(start.yaw + (e.clientX - start.x) * 0.25, CAMERA.yaw));
    state.pitch = round(clamp(start.pitch + (e.clientY - start.y) * 0.25, CAMERA.pitch));
    syncCameraSliders();
    changed();
  });
  const end = () => { start = null; frame.classList.remove("dragging"); };
  frame.addEventListener("pointerup", end);
  frame.addEventListener("pointercancel", end);
  frame.addEventListener("wheel", (e) => {
    if (state.mode !== "client") return; // the server renders at the avatar's fixed distance
    e.preventDefault();
    state.zoom = Math.min(ZOOM.max, Math.max(ZOOM.min, state.zoom * Math.exp(-e.deltaY * 0.001)));
    changed();
  }, { passive: false });
}

// ---------------------------------------------------------------- start

async function selectAvatar(id, fromUrl) {
  state.avatar = state.avatars.find((a) => a.id === id) || null;
  if (!state.avatar) return;
  buildControls(state.avatar, fromUrl);
  setStatus(`${state.avatar.id} (${state.avatar.version})`);
  await setMode(state.mode);
  if (state.mode === "server") {
    const problem = checkValues(state.avatar);
    if (problem) showBanner(`Render failed: ${problem}`);
  }
}

// For tests and benchmarks: read back what the page decoded and how fast.
window.perseViewer = {
  state,
  get mode() { return state.mode; },
  get ready() { return state.mode === "client" ? !!(client.decoder && client.shown) : !!$("view").dataset.seq; },
  get clientError() { return client.error; },
  get frames() { return client.view ? client.view.frames : 0; },
  /** Browser mode: decoded, drawn, and no frame pending (Spark's sort has settled). */
  get settled() {
    return state.mode === "client" && !!(client.decoder && client.shown) && !client.frameReq
      && performance.now() >= client.view.pendingUntil;
  },
  get branchDecodes() { return client.decoder ? client.decoder.decodes : 0; },
  get decodeMs() { return client.decodeMs.slice(); },
  get bundle() { return { bytes: client.bundleBytes, ms: client.bundleMs, key: client.key }; },
  /** The Gaussians on screen, as plain arrays (with the state they were decoded for). */
  shown() {
    if (!client.decoder || !client.shown) return null;
    const g = client.decoder.gaussians;
    return { ...client.shown, ...Object.fromEntries(Object.entries(g).map(([k, v]) => [k, Array.from(v)])) };
  },
  setMode,
};

async function start() {
  enableDrag();
  $("download-png").addEventListener("click", () => download("png"));
  $("download-ply").addEventListener("click", () => download("ply"));
  $("strip-go").addEventListener("click", renderStrip);
  $("client-mode").addEventListener("change", (e) => setMode(e.target.checked ? "client" : "server"));
  const fromUrl = readUrl();
  state.mode = fromUrl.mode === "server" || fromUrl.mode === "client" ? fromUrl.mode : "client";
  let resp;
  try {
    resp = await api("/v1/avatars");
  } catch (err) {
    setStatus("offline");
    showBanner(`Server unreachable: ${err.message}`);
    return;
  }
  if (!resp.ok && fromUrl.avatar && (resp.status === 401 || resp.status === 403)) {
    // A viewer link may not list: it sees its one avatar through the manifest.
    const listing = resp;
    resp = await api(`/v1/avatars/${encodeURIComponent(fromUrl.avatar)}`).catch(() => listing);
    if (resp.ok) {
      const m = await resp.json();
      resp = { ok: true, json: async () => [{ id: m.id, version: m.version, expressions: m.layout.expressions,
        attributes: Object.fromEntries(m.layout.attributes.map((a) => [a.name, a.edit_labels])) }] };
    }
  }
  if (!resp.ok) {
    setStatus("error");
    showBanner(`Could not list avatars: ${await errorMessage(resp)}`);
    return;
  }
  state.avatars = await resp.json();
  const select = $("avatar");
  select.replaceChildren(...state.avatars.map((a) => new Option(`${a.id} (${a.version})`, a.id)));
  if (state.avatars.length === 0) {
    setStatus("no avatars in the registry");
    return;
  }
  const known = state.avatars.some((a) => a.id === fromUrl.avatar);
  const initial = known ? fromUrl.avatar : state.avatars[0].id;
  select.value = initial;
  // A newly picked avatar starts at its source latent, front view.
  select.addEventListener("change", () =>
    selectAvatar(select.value, { attributes: {}, expression: {}, yaw: null, pitch: null }));
  if (fromUrl.avatar && !known) {
    await selectAvatar(initial, { attributes: {}, expression: {}, yaw: null, pitch: null });
    showBanner(`No avatar ${JSON.stringify(fromUrl.avatar)} here; showing ${initial}.`, "note");
    return;
  }
  await selectAvatar(initial, fromUrl);
}

start();
