"use strict";
// The latent explorer of `python -m engine.serve` (vanilla JS, no build step, nothing remote).
//
// GET /v1/model gives the spec, the pixel range and which latent dims get sliders (highest KL
// first when the run has a KL-per-dim report). Every change of the latent POSTs it to
// /v1/decode as a float32 .npy (B = 1) -- int64 codes for a VQ-VAE -- and paints the .npy reply
// on the canvas. One decode is in flight at a time; changes made meanwhile are coalesced into
// one more decode. body[data-decodes] counts the images drawn (the browser test waits on it).

const SLIDER_LIMIT = 3; // sliders span [-3, 3]: 99.7% of the N(0, 1) prior
const NPY_MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // "\x93NUMPY"
const $ = (id) => document.getElementById(id);

const state = {
  info: null, // GET /v1/model
  z: null, // Float32Array (gaussian latents) or BigInt64Array (codes), flat
  label: 0, // class, for conditional models
  ends: null, // [a, b]: the interpolation endpoints
  inflight: false,
  again: false,
  decodes: 0,
};

// --- .npy ------------------------------------------------------------------------------------
function npyEncode(flat, shape, descr) {
  const tuple = shape.join(", ") + (shape.length === 1 ? "," : "");
  const dict = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${tuple}), }`;
  const pad = (64 - ((10 + dict.length + 1) % 64)) % 64; // data starts 64-byte aligned
  const header = dict + " ".repeat(pad) + "\n";
  const out = new Uint8Array(10 + header.length + flat.byteLength);
  out.set([...NPY_MAGIC, 1, 0]); // format version 1.0
  new DataView(out.buffer).setUint16(8, header.length, true);
  for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
  out.set(new Uint8Array(flat.buffer, flat.byteOffset, flat.byteLength), 10 + header.length);
  return out;
}

function npyDecode(buffer) {
  const bytes = new Uint8Array(buffer);
  if (!NPY_MAGIC.every((b, i) => bytes[i] === b)) throw new Error("the reply is not an .npy");
  const v1 = bytes[6] === 1;
  const view = new DataView(buffer);
  const length = v1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = v1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + length));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1]
    .split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  if (descr !== "<f4" || /'fortran_order':\s*True/.test(header)) {
    throw new Error(`expected C-ordered float32 images, got ${descr}`);
  }
  return { shape, data: new Float32Array(buffer.slice(start + length)) };
}

// --- latents ---------------------------------------------------------------------------------
function randn(n) {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) { // Box-Muller: two N(0, 1) draws per pair of uniforms
    const r = Math.sqrt(-2 * Math.log(1 - Math.random()));
    const angle = 2 * Math.PI * Math.random();
    out[i] = r * Math.cos(angle);
    if (i + 1 < n) out[i + 1] = r * Math.sin(angle);
  }
  return out;
}

function randomCodes(n, numCodes) {
  return BigInt64Array.from({ length: n }, () => BigInt(Math.floor(Math.random() * numCodes)));
}

function interpolate(a, b, t, spherical) {
  // slerp: sin((1-t) w) / sin w * a + sin(t w) / sin w * b, w the angle between a and b; it
  // keeps the norm near that of prior draws, where lerp's midpoint shrinks by ~1/sqrt(2).
  let wa = 1 - t;
  let wb = t;
  if (spherical) {
    let dot = 0, na = 0, nb = 0;
    for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
    const omega = Math.acos(Math.min(1, Math.max(-1, dot / Math.sqrt(na * nb))));
    if (omega > 1e-6) {
      wa = Math.sin((1 - t) * omega) / Math.sin(omega);
      wb = Math.sin(t * omega) / Math.sin(omega);
    }
  }
  return a.map((x, i) => wa * x + wb * b[i]);
}

// --- decoding and drawing --------------------------------------------------------------------
async function decode() {
  if (state.inflight) { state.again = true; return; }
  state.inflight = true;
  try {
    do { state.again = false; await decodeOnce(); } while (state.again);
  } finally {
    state.inflight = false;
  }
}

async function decodeOnce() {
  const m = state.info.model;
  const descr = m.latent_kind === "codes" ? "<i8" : "<f4";
  const body = npyEncode(state.z, [1, ...m.latent_shape], descr);
  const query = m.conditional ? `?labels=${state.label}` : "";
  const start = performance.now();
  try {
    const r = await fetch(`/v1/decode${query}`, {
      method: "POST", headers: { "Content-Type": "application/x-npy" }, body,
    });
    if (!r.ok) {
      const error = await r.json().catch(() => ({ error: r.statusText }));
      setStatus(`decode failed (${r.status}): ${error.error}`);
      return;
    }
    const { shape, data } = npyDecode(await r.arrayBuffer());
    draw(shape, data);
  } catch (e) {
    setStatus(`decode failed: ${e.message}`);
    return;
  }
  state.decodes += 1;
  document.body.dataset.decodes = String(state.decodes);
  setStatus(`decoded in ${(performance.now() - start).toFixed(1)} ms`);
}

function draw(shape, data) {
  const [, channels, h, w] = shape; // (1, C, H, W), C in {1, 3}
  const [lo, hi] = state.info.pixel_range;
  const canvas = $("image");
  canvas.width = w;
  canvas.height = h;
  canvas.style.height = `${(280 * h) / w}px`;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  const plane = h * w;
  const scale = 255 / (hi - lo);
  for (let p = 0; p < plane; p++) {
    for (let k = 0; k < 3; k++) {
      const v = data[(channels === 1 ? 0 : k) * plane + p];
      image.data[4 * p + k] = Math.round((v - lo) * scale); // clamped by the Uint8Clamped array
    }
    image.data[4 * p + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

function setStatus(text) { $("status").textContent = text; }

// --- controls --------------------------------------------------------------------------------
function flatIndexName(flat, shape) {
  const index = [];
  for (let d = shape.length - 1; d >= 0; d--) { index.unshift(flat % shape[d]); flat = Math.floor(flat / shape[d]); }
  return `z[${index.join(",")}]`;
}

function buildSliders() {
  const { explorer, model } = state.info;
  const box = $("sliders");
  box.textContent = "";
  explorer.dims.forEach((dim, j) => {
    const row = Object.assign(document.createElement("label"), { className: "slider" });
    const name = document.createElement("span");
    name.textContent = flatIndexName(dim, model.latent_shape)
      + (explorer.kl ? ` · KL ${explorer.kl[j].toFixed(2)}` : "");
    const input = Object.assign(document.createElement("input"), {
      type: "range", min: -SLIDER_LIMIT, max: SLIDER_LIMIT, step: 0.01, value: 0,
    });
    input.dataset.dim = dim;
    const out = document.createElement("output");
    input.addEventListener("input", () => {
      state.z[dim] = Number(input.value);
      out.textContent = Number(input.value).toFixed(2);
      decode();
    });
    row.append(name, input, out);
    box.append(row);
  });
  const shown = explorer.dims.length;
  $("dims-legend").textContent = explorer.source
    ? `Latent dimensions: ${shown} of ${explorer.latent_size}, highest KL first`
    : `Latent dimensions: the first ${shown} of ${explorer.latent_size}`;
}

function syncSliders() {
  for (const input of $("sliders").querySelectorAll("input")) {
    const v = state.z[Number(input.dataset.dim)];
    input.value = v;
    input.nextElementSibling.textContent = Number(input.value).toFixed(2);
  }
}

function setLatent(z) { state.z = z; syncSliders(); decode(); }

function buildClasses() {
  const box = $("classes");
  box.hidden = false;
  for (let c = 0; c < state.info.model.num_classes; c++) {
    const button = Object.assign(document.createElement("button"), { type: "button", textContent: String(c) });
    button.dataset.label = c;
    button.classList.toggle("active", c === state.label);
    button.addEventListener("click", () => {
      state.label = c;
      for (const b of box.children) b.classList.toggle("active", b === button);
      decode();
    });
    box.append(button);
  }
}

function interpolationStep() {
  const t = Number($("t").value);
  $("t-value").textContent = t.toFixed(2);
  const [a, b] = state.ends;
  setLatent(Float32Array.from(interpolate(a, b, t, $("slerp").checked)));
}

function wire() {
  const m = state.info.model;
  const size = state.info.explorer.latent_size;
  const codes = m.latent_kind === "codes";
  const draw = () => (codes ? randomCodes(size, m.num_codes) : randn(size));
  $("random").addEventListener("click", () => setLatent(draw()));
  $("zero").hidden = codes;
  $("zero").addEventListener("click", () => setLatent(new Float32Array(size)));
  $("interpolate").hidden = codes;
  $("dims").hidden = codes;
  $("endpoints").addEventListener("click", () => {
    state.ends = [randn(size), randn(size)];
    interpolationStep();
  });
  $("t").addEventListener("input", interpolationStep);
  $("slerp").addEventListener("change", interpolationStep);
  state.ends = [randn(size), randn(size)];
  if (m.conditional) buildClasses();
  buildSliders();
  setLatent(draw());
}

async function init() {
  for (;;) {
    const r = await fetch("/v1/model");
    if (r.ok) { state.info = await r.json(); break; }
    const error = await r.json().catch(() => ({ error: r.statusText }));
    setStatus(`waiting for the model: ${error.error}`);
    if (r.status !== 503) return;
    await new Promise((done) => setTimeout(done, 500));
  }
  const { model: m, runtime: rt, batching: b } = state.info;
  $("model").textContent = `${m.family} · latent ${JSON.stringify(m.latent_shape)} · `
    + `${rt.backend} on ${rt.device} · batches of up to ${b.max_batch} rows within ${b.max_delay_ms} ms`;
  const unusable = !m.image ? "this model's outputs are not images: use POST /v1/decode"
    : !state.info.explorer.latent_size ? "this model's latent has dynamic axes: the explorer"
      + " needs a fixed latent shape" : "";
  if (unusable) {
    setStatus(unusable);
    $("controls").hidden = true;
    return;
  }
  wire();
}

init();
