// perse-ray viewer: sliders → POST /v1/avatars/{id}/render, state in the query string.
// Plain JS, no dependencies: it is served by the Serve ingress and must work offline.
"use strict";

const RENDER_SIZE = 384;
const STRIP_SIZE = 96;
const STRIP_STEPS = 5;
const DEBOUNCE_MS = 60;
const CAMERA = { yaw: { min: -45, max: 45, step: 1 }, pitch: { min: -25, max: 25, step: 1 } };

const $ = (id) => document.getElementById(id);
const state = { avatars: [], avatar: null, attributes: {}, expression: {}, yaw: 0, pitch: 0 };
let lastGoodUrl = null;
let requestSeq = 0; // newest request wins: older replies are dropped
let inflight = null;
let debounceTimer = null;

function setStatus(text) { $("status").textContent = text; }

function showBanner(text) {
  const b = $("banner");
  b.textContent = text;
  b.hidden = !text;
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
  const out = { avatar: q.get("avatar"), attributes: {}, expression: {}, yaw: null, pitch: null };
  for (const [k, v] of q) {
    if (k.startsWith("a.")) out.attributes[k.slice(2)] = Number(v);
    else if (k.startsWith("e.")) out.expression[k.slice(2)] = Number(v);
  }
  if (q.has("yaw")) out.yaw = Number(q.get("yaw"));
  if (q.has("pitch")) out.pitch = Number(q.get("pitch"));
  return out;
}

function writeUrl() {
  const q = new URLSearchParams();
  if (state.avatar) q.set("avatar", state.avatar.id);
  for (const [k, v] of Object.entries(state.attributes)) q.set(`a.${k}`, String(v));
  for (const [k, v] of Object.entries(state.expression)) q.set(`e.${k}`, String(v));
  q.set("yaw", String(state.yaw));
  q.set("pitch", String(state.pitch));
  history.replaceState(null, "", `${location.pathname}?${q}`);
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
      onInput: (v) => { state.attributes[name] = v; scheduleRender(); } });
  }
  for (const name of avatar.expressions || []) {
    const value = fromUrl.expression[name] ?? 0;
    state.expression[name] = value;
    slider(exprs, name, { min: 0, max: 1, step: 0.05, value,
      onInput: (v) => { state.expression[name] = v; scheduleRender(); } });
  }
  state.yaw = fromUrl.yaw ?? 0;
  state.pitch = fromUrl.pitch ?? 0;
  for (const axis of ["yaw", "pitch"]) {
    slider(cam, axis, { ...CAMERA[axis], value: state[axis],
      onInput: (v) => { state[axis] = v; scheduleRender(); } });
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

// ---------------------------------------------------------------- rendering

function body(size, overrides = {}) {
  return JSON.stringify({
    attributes: { ...state.attributes, ...(overrides.attributes || {}) },
    expression: state.expression,
    camera: { yaw: state.yaw, pitch: state.pitch },
    width: size,
    height: size,
  });
}

async function post(path, payload, signal) {
  return fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: payload, signal });
}

function scheduleRender() {
  writeUrl();
  clearTimeout(debounceTimer);
  debounceTimer = setTimeout(render, DEBOUNCE_MS);
}

async function render() {
  if (!state.avatar) return;
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
    $("latency").textContent = `${ms.toFixed(0)} ms`;
    $("view").dataset.latencyMs = ms.toFixed(1);
    $("view").dataset.seq = String(seq);
    showBanner("");
  } catch (err) {
    if (err.name === "AbortError") return;
    showBanner(`Server unreachable: ${err.message}`);
  } finally {
    if (seq === requestSeq) $("spinner").hidden = true;
  }
}

async function download(kind) {
  if (!state.avatar) return;
  const id = state.avatar.id;
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

// ---------------------------------------------------------------- drag to turn

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
    state.yaw = Math.round(clamp(start.yaw + (e.clientX - start.x) * 0.25, CAMERA.yaw));
    state.pitch = Math.round(clamp(start.pitch + (e.clientY - start.y) * 0.25, CAMERA.pitch));
    syncCameraSliders();
    scheduleRender();
  });
  const end = () => { start = null; frame.classList.remove("dragging"); };
  frame.addEventListener("pointerup", end);
  frame.addEventListener("pointercancel", end);
}

// ---------------------------------------------------------------- start

function selectAvatar(id, fromUrl) {
  state.avatar = state.avatars.find((a) => a.id === id) || null;
  if (!state.avatar) return;
  buildControls(state.avatar, fromUrl);
  setStatus(`${state.avatar.id} (${state.avatar.version})`);
  scheduleRender();
}

async function start() {
  enableDrag();
  $("download-png").addEventListener("click", () => download("png"));
  $("download-ply").addEventListener("click", () => download("ply"));
  $("strip-go").addEventListener("click", renderStrip);
  const fromUrl = readUrl();
  let resp;
  try {
    resp = await fetch("/v1/avatars");
  } catch (err) {
    setStatus("offline");
    showBanner(`Server unreachable: ${err.message}`);
    return;
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
  const initial = state.avatars.some((a) => a.id === fromUrl.avatar) ? fromUrl.avatar : state.avatars[0].id;
  select.value = initial;
  // A newly picked avatar starts at its source latent, front view.
  select.addEventListener("change", () =>
    selectAvatar(select.value, { attributes: {}, expression: {}, yaw: null, pitch: null }));
  selectAvatar(initial, fromUrl);
}

start();
