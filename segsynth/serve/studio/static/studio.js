// segsynth studio: Doodle (paint class ids, see the generator's picture), Style (a style image's
// z, or a random one), Live (a running stream's input | labels | synthesis, and its remap).
// Talks only to the service that served it (/v1/...); no external resources.
"use strict";

const $ = (selector) => document.querySelector(selector);
const UNKNOWN = 255;
const HISTORY = 50; // undo steps kept

const state = {
  info: null, W: 0, H: 0, ids: null, rgb: null, // the label map (ids) and the palette (256 x RGB)
  cls: 0, tool: "brush", size: 12, undo: [], redo: [], stroke: null,
  z: null, seed: 0, // the style: z from a style image, else a seed
  busy: false, dirty: false, timer: null, lastSent: 0, seq: 0, picture: null, pictureUrl: null,
  token: sessionStorage.getItem("segsynth-token") || "", live: null,
  generator: null, // another generator by name (null: the service's own)
};

// ---- talking to the service ---------------------------------------------------------------
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const reply = await fetch(path, { ...options, headers });
  if (reply.status === 401) {
    $("#token-form").hidden = false;
    throw new Error("this service needs an API token");
  }
  if (!reply.ok) {
    let message = `${reply.status} ${reply.statusText}`;
    try { message = (await reply.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return reply;
}

// a form for the studio's endpoints, naming the picked generator when it is not the service's own
function studioForm() {
  const form = new FormData();
  if (state.generator) form.append("generator", state.generator);
  return form;
}

function setStatus(text, error = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", error);
}

// ---- 8-bit grayscale PNGs of class ids -----------------------------------------------------
// Written here because canvas.toBlob() only makes RGBA PNGs, and the API takes ids as 8-bit gray.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 255] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function pngChunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

async function grayPng(pixels, width, height) {
  const raw = new Uint8Array((width + 1) * height); // each row: filter type 0, then the row
  for (let y = 0; y < height; y++) raw.set(pixels.subarray(y * width, (y + 1) * width), y * (width + 1) + 1);
  const zlib = new Blob([raw]).stream().pipeThrough(new CompressionStream("deflate")); // zlib, as PNG wants
  const idat = new Uint8Array(await new Response(zlib).arrayBuffer());
  const header = new Uint8Array(13);
  const view = new DataView(header.buffer);
  view.setUint32(0, width);
  view.setUint32(4, height);
  header[8] = 8; // bit depth; colour type 0 (gray), deflate, no filter choice, no interlace
  const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
  return new Blob([signature, pngChunk("IHDR", header), pngChunk("IDAT", idat), pngChunk("IEND", new Uint8Array(0))],
                  { type: "image/png" });
}

// An image (a label map: gray ids, or colours of the palette) -> ids at the canvas size.
async function idsFromImage(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(state.W, state.H);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false; // ids are never blended
  ctx.drawImage(bitmap, 0, 0, state.W, state.H);
  const px = ctx.getImageData(0, 0, state.W, state.H).data;
  const ids = new Uint8Array(state.W * state.H);
  let gray = true;
  for (let i = 0; i < px.length && gray; i += 4) gray = px[i] === px[i + 1] && px[i] === px[i + 2];
  // the palette's colours (label maps as datasets ship them), and the studio's doodle colours
  const byColour = new Map([...state.info.classes.map((c) => [c.doodle, c.id]),
    ...state.info.classes.map((c) => [c.color, c.id])]);
  const n = state.info.classes.length;
  for (let i = 0; i < ids.length; i++) {
    const [r, g, b] = [px[4 * i], px[4 * i + 1], px[4 * i + 2]];
    ids[i] = gray ? (r < n ? r : UNKNOWN) : byColour.get(hex(r, g, b)) ?? UNKNOWN;
  }
  return ids;
}

const hex = (r, g, b) => "#" + [r, g, b].map((v) => v.toString(16).padStart(2, "0")).join("");

// ---- the label map ---------------------------------------------------------------------------
function draw() {
  const image = new ImageData(state.W, state.H);
  for (let i = 0; i < state.ids.length; i++) {
    const id = state.ids[i];
    image.data.set(state.rgb.subarray(3 * id, 3 * id + 3), 4 * i);
    image.data[4 * i + 3] = 255;
  }
  $("#canvas").getContext("2d").putImageData(image, 0, 0);
}

function showLegend(list) {
  const legend = $("#legend");
  legend.replaceChildren(...list.map(({ name, color, fraction }) => {
    const item = document.createElement("li");
    item.innerHTML = `<span class="swatch" style="background:${color}"></span>`;
    item.append(`${name} ${fraction < 0.01 ? "<1" : Math.round(fraction * 100)}%`);
    return item;
  }));
}

function canvasLegend() {
  const counts = new Uint32Array(256);
  for (const id of state.ids) counts[id]++;
  const names = new Map(state.info.classes.map((c) => [c.id, c]));
  names.set(UNKNOWN, state.info.unknown);
  return [...counts.keys()].filter((id) => counts[id]).sort((a, b) => counts[b] - counts[a])
    .map((id) => { const c = names.get(id); return { ...c, color: c.doodle || c.color, fraction: counts[id] / state.ids.length }; });  // the canvas's colours
}

function remember() {
  state.undo.push(state.ids.slice());
  if (state.undo.length > HISTORY) state.undo.shift();
  state.redo = [];
}

function changed() {
  draw();
  showLegend(canvasLegend());
  schedule();
}

function restore(from, to) {
  if (!from.length) return;
  to.push(state.ids);
  state.ids = from.pop();
  changed();
}

function brush(x, y) {
  const r = state.size / 2;
  for (let j = Math.max(0, Math.floor(y - r)); j <= Math.min(state.H - 1, Math.ceil(y + r)); j++) {
    for (let i = Math.max(0, Math.floor(x - r)); i <= Math.min(state.W - 1, Math.ceil(x + r)); i++) {
      if ((i + 0.5 - x) ** 2 + (j + 0.5 - y) ** 2 <= r * r) state.ids[j * state.W + i] = state.cls;
    }
  }
}

function line(from, to) {
  const steps = Math.max(1, Math.ceil(Math.hypot(to.x - from.x, to.y - from.y)));
  for (let s = 0; s <= steps; s++) brush(from.x + (to.x - from.x) * s / steps, from.y + (to.y - from.y) * s / steps);
}

function fill(x, y) {
  const start = Math.floor(y) * state.W + Math.floor(x);
  const old = state.ids[start];
  if (old === state.cls) return;
  const stack = [start];
  while (stack.length) {
    const p = stack.pop();
    if (state.ids[p] !== old) continue;
    state.ids[p] = state.cls;
    const px = p % state.W;
    if (px > 0) stack.push(p - 1);
    if (px < state.W - 1) stack.push(p + 1);
    if (p >= state.W) stack.push(p - state.W);
    if (p < state.ids.length - state.W) stack.push(p + state.W);
  }
}

function pointAt(event) {
  const rect = $("#canvas").getBoundingClientRect();
  return { x: (event.clientX - rect.left) * state.W / rect.width, y: (event.clientY - rect.top) * state.H / rect.height };
}

// The canvas the studio opens on: a landscape - sky, a mountain ridge, grass, a row of trees and a
// lake - where the label set has those classes; else all ``fallback``.
function starter(fallback) {
  const ids = new Uint8Array(state.W * state.H).fill(fallback);
  const id = (name) => (state.info.classes.find((c) => c.name === name) || {}).id;
  const [sky, mountain, grass, tree, water] = ["sky", "mountain", "grass", "tree", "water"].map(id);
  if ([sky, mountain, grass, tree, water].includes(undefined)) return ids;
  const { W, H } = state;
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const u = x / W, v = y / H;
      const ridge = 0.33 + 0.12 * Math.abs(((u * 2.2) % 1) - 0.5) * 2 - 0.05 * Math.sin(u * 9);
      let c = v < ridge ? sky : v < 0.55 ? mountain : grass;
      const crown = Math.hypot((((u * 7) % 1) - 0.5) * 1.6, (v - 0.55) * 9);  // a row of tree crowns
      if (v > 0.46 && v < 0.62 && crown < 0.55 && (u < 0.45 || u > 0.7)) c = tree;
      if (Math.hypot((u - 0.6) / 0.28, (v - 0.8) / 0.1) < 1) c = water;  // a lake in the grass
      ids[y * W + x] = c;
    }
  }
  return ids;
}

function selectClass(id) {
  state.cls = id;
  const c = state.info.classes[id];
  $("#current-class").innerHTML = `<span class="swatch" style="background:${c.doodle || c.color}"></span>`;
  $("#current-class").append(c.name);
  for (const item of $("#palette").children) item.classList.toggle("selected", Number(item.dataset.id) === id);
}

function buildPalette() {
  const items = state.info.classes.map(({ id, name, color, doodle }) => {
    const item = document.createElement("li");
    item.dataset.id = id;
    item.dataset.key = name.toLowerCase().replace(/[^0-9a-z]+/g, "");
    item.title = `${name} (id ${id})`;
    item.innerHTML = `<span class="swatch" style="background:${doodle || color}"></span>`;
    item.append(name);
    item.addEventListener("click", () => selectClass(id));
    return item;
  });
  $("#palette").replaceChildren(...items);
}

// ---- the picture -------------------------------------------------------------------------------
// body[data-pending] is "true" from a change until its picture is shown (scripts and tests wait on it)
function setPending(pending) {
  document.body.dataset.pending = String(pending);
}

function repaint() {
  state.dirty = true;
  setPending(true);
  synthesize();
}

function schedule() {
  state.dirty = true;
  setPending(true);
  clearTimeout(state.timer);
  if (!state.busy && performance.now() - state.lastSent > 300) synthesize(); // while painting: now and then
  else state.timer = setTimeout(synthesize, 120); // and once the painting pauses
}

async function synthesize() {
  if (state.busy || !state.dirty) return;
  if (!state.info.generator) {
    state.dirty = false;
    setPending(false);
    return;
  }
  state.busy = true;
  state.dirty = false;
  state.lastSent = performance.now();
  try {
    const form = studioForm();
    form.append("labels", await grayPng(state.ids, state.W, state.H), "labels.png");
    if (state.z) form.append("z", JSON.stringify(state.z));
    else if (state.info.z_dim) form.append("seed", String(state.seed));
    const reply = await api("/v1/synthesize", { method: "POST", body: form });
    const blob = await reply.blob();
    await showPicture(blob);
    $("#timing").textContent = `round trip ${Math.round(performance.now() - state.lastSent)} ms`;
    setStatus("");
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    state.busy = false;
    if (state.dirty) schedule();
    else setPending(false);
  }
}

async function showPicture(blob) {
  const url = URL.createObjectURL(blob);
  for (const img of [$("#picture"), $("#style-picture")]) {
    img.src = url;
    await img.decode();
  }
  if (state.pictureUrl) URL.revokeObjectURL(state.pictureUrl);
  state.picture = blob;
  state.pictureUrl = url;
  document.body.dataset.pictureSeq = String(++state.seq); // for scripts and tests: a new picture is shown
}

function download(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function showZSource(text) {
  $("#z-source").textContent = text;
}

// ---- live ------------------------------------------------------------------------------------------
async function listStreams() {
  const { streams } = await (await api("/v1/streams")).json();
  const select = $("#streams");
  const chosen = select.value;
  const running = streams.filter((s) => s.state === "running");
  select.replaceChildren(...running.map((s) => new Option(`${s.id} (${s.config.source})`, s.id)));
  select.dataset.streams = JSON.stringify(running.map((s) => [s.id, s.config.remap || ""]));
  if (running.some((s) => s.id === chosen)) select.value = chosen;
  if (!running.length) $("#remap-status").textContent = "no running streams (POST /v1/streams starts one)";
  if (select.value !== (state.live && state.live.id)) watch(select.value);
}

function stopLive() {
  if (state.live) state.live.abort.abort();
  state.live = null;
}

const HEADER_END = [13, 10, 13, 10];

async function watch(id) {
  stopLive();
  if (!id) return;
  const remaps = new Map(JSON.parse($("#streams").dataset.streams || "[]"));
  $("#remap").value = remaps.get(id) || "";
  const live = { id, abort: new AbortController(), frames: 0 };
  state.live = live;
  try {
    const reply = await api(`/v1/streams/${encodeURIComponent(id)}/live.mjpg`, { signal: live.abort.signal });
    const reader = reply.body.getReader();
    let buf = new Uint8Array(0);
    for (;;) { // multipart/x-mixed-replace: a header with Content-Length, then that many bytes of JPEG
      const { value, done } = await reader.read();
      if (done) break;
      const joined = new Uint8Array(buf.length + value.length);
      joined.set(buf);
      joined.set(value, buf.length);
      buf = joined;
      for (;;) {
        const end = indexOf(buf, HEADER_END);
        if (end < 0) break;
        const length = /content-length:\s*(\d+)/i.exec(new TextDecoder().decode(buf.subarray(0, end)));
        const start = end + 4;
        if (length && buf.length < start + Number(length[1])) break;
        if (length) showLiveFrame(live, buf.slice(start, start + Number(length[1])));
        buf = buf.subarray(length ? start + Number(length[1]) : start);
      }
    }
    if (state.live === live) setStatus(`stream ${id} ended`);
  } catch (err) {
    if (err.name !== "AbortError") setStatus(err.message, true);
  }
}

function indexOf(bytes, pattern) {
  outer: for (let i = 0; i <= bytes.length - pattern.length; i++) {
    for (let k = 0; k < pattern.length; k++) if (bytes[i + k] !== pattern[k]) continue outer;
    return i;
  }
  return -1;
}

function showLiveFrame(live, jpeg) {
  if (state.live !== live) return;
  const img = $("#live-view");
  const old = img.src;
  img.src = URL.createObjectURL(new Blob([jpeg], { type: "image/jpeg" }));
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  img.dataset.frames = String(++live.frames);
}

// ---- views and controls ------------------------------------------------------------------------
function showView(name) {
  for (const button of document.querySelectorAll("nav button")) button.classList.toggle("active", button.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  if (name === "live") listStreams().catch((err) => setStatus(err.message, true));
  else stopLive();
}

function wire() {
  for (const button of document.querySelectorAll("nav button")) button.addEventListener("click", () => showView(button.dataset.view));
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("#token").value.trim();
    sessionStorage.setItem("segsynth-token", state.token);
    $("#token-form").hidden = true;
    start();
  });
  for (const radio of document.querySelectorAll("input[name=tool]")) radio.addEventListener("change", () => { state.tool = radio.value; });
  $("#brush-size").addEventListener("input", (event) => {
    state.size = Number(event.target.value);
    $("#brush-size-value").textContent = event.target.value;
  });
  $("#undo").addEventListener("click", () => restore(state.undo, state.redo));
  $("#redo").addEventListener("click", () => restore(state.redo, state.undo));
  $("#clear").addEventListener("click", () => { remember(); state.ids.fill(state.cls); changed(); });
  document.addEventListener("keydown", (event) => {
    if (!(event.ctrlKey || event.metaKey) || event.target.tagName === "INPUT") return;
    const key = event.key.toLowerCase();
    if (key === "z" || key === "y") {
      event.preventDefault();
      if (key === "z" && !event.shiftKey) restore(state.undo, state.redo);
      else restore(state.redo, state.undo);
    }
  });
  $("#palette-search").addEventListener("input", (event) => {
    const key = event.target.value.toLowerCase().replace(/[^0-9a-z]+/g, "");
    for (const item of $("#palette").children) item.hidden = !item.dataset.key.includes(key);
  });

  const canvas = $("#canvas");
  canvas.addEventListener("pointerdown", (event) => {
    const p = pointAt(event);
    remember();
    if (state.tool === "fill") {
      fill(p.x, p.y);
    } else {
      canvas.setPointerCapture(event.pointerId);
      state.stroke = p;
      brush(p.x, p.y);
    }
    changed();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!state.stroke) return;
    const p = pointAt(event);
    line(state.stroke, p);
    state.stroke = p;
    changed();
  });
  for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, () => { state.stroke = null; });

  $("#upload-labels").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    try {
      const ids = await idsFromImage(file);
      remember();
      state.ids = ids;
      changed();
      setStatus(`opened ${file.name}`);
    } catch (err) {
      setStatus(`${file.name}: not a label map (${err.message})`, true);
    }
    event.target.value = "";
  });
  $("#upload-photo").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    setStatus(`segmenting ${file.name} ...`);
    try {
      const form = studioForm();
      form.append("image", file);
      const result = await (await api("/v1/segment", { method: "POST", body: form })).json();
      const ids = await idsFromImage(await (await fetch(result.labels)).blob());
      remember();
      state.ids = ids;
      changed();
      setStatus(`segmented ${file.name}`);
    } catch (err) {
      setStatus(err.message, true);
    }
    event.target.value = "";
  });
  $("#download-picture").addEventListener("click", () => state.picture && download(state.picture, "segsynth-picture.png"));
  $("#download-labels").addEventListener("click", async () => download(await grayPng(state.ids, state.W, state.H), "segsynth-labels.png"));

  $("#upload-style").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    setStatus(`encoding ${file.name} ...`);
    try {
      const form = studioForm();
      form.append("image", file);
      state.z = (await (await api("/v1/style", { method: "POST", body: form })).json()).z;
      $("#style-image").src = URL.createObjectURL(file);
      showZSource(`z from the style image ${file.name}`);
      setStatus("");
      repaint();
    } catch (err) {
      setStatus(err.message, true);
    }
    event.target.value = "";
  });
  $("#generator").addEventListener("change", async (event) => {
    const name = event.target.value, previous = state.generator;
    state.generator = name === state.info.generators[0] ? null : name; // [0]: the service's own
    setStatus(`loading ${name} ...`); // cleared by its first picture
    document.body.dataset.ready = "false";
    await start();
    if (document.body.dataset.ready !== "true") { // refused (its error is shown): keep the one before
      state.generator = previous;
      event.target.value = previous || state.info.generators[0];
      document.body.dataset.ready = "true";
    }
  });
  $("#shuffle").addEventListener("click", () => {
    state.seed = Math.floor(Math.random() * 2 ** 32);
    $("#seed").value = state.seed;
    useSeed();
  });
  $("#seed").addEventListener("change", (event) => {
    state.seed = Math.max(0, Math.floor(Number(event.target.value) || 0));
    useSeed();
  });

  $("#streams").addEventListener("change", (event) => watch(event.target.value));
  $("#refresh-streams").addEventListener("click", () => listStreams().catch((err) => setStatus(err.message, true)));
  $("#remap-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const id = $("#streams").value;
    const status = $("#remap-status");
    if (!id) return;
    try {
      const reply = await api(`/v1/streams/${encodeURIComponent(id)}`, {
        method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ remap: $("#remap").value }),
      });
      const stream = await reply.json();
      status.textContent = `${id}: remap ${stream.config.remap || "none"}`;
      status.classList.remove("error");
    } catch (err) {
      status.textContent = err.message;
      status.classList.add("error");
    }
  });
}

function useSeed() {
  state.z = null;
  $("#style-image").removeAttribute("src");
  showZSource(`z drawn from seed ${state.seed}`);
  repaint();
}

async function start() {
  try {
    const query = state.generator ? `?generator=${encodeURIComponent(state.generator)}` : "";
    state.info = await (await api(`/v1/labels${query}`)).json();
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  const info = state.info;
  const options = info.generators.map((name) => new Option(name, name, false, name === info.generator_name));
  $("#generator").replaceChildren(...options);
  state.z = null; // a z belongs to the generator that made it
  [state.W, state.H] = info.size;
  state.rgb = new Uint8Array(256 * 3);
  for (const c of [...info.classes, info.unknown]) {  // the canvas shows the doodle colours
    state.rgb.set((c.doodle || c.color).match(/\w\w/g).map((h) => parseInt(h, 16)), 3 * c.id);
  }
  const canvas = $("#canvas");
  canvas.width = state.W;
  canvas.height = state.H;
  buildPalette();
  const first = info.classes.find((c) => c.name === "sky") || info.classes[0];
  state.ids = starter(first.id);
  selectClass(first.id);
  if (!info.generator) setStatus("no generator is loaded: the studio can paint and segment, not synthesize", true);
  $("#upload-style").disabled = !info.style;
  if (!info.style) {
    showZSource(info.z_dim ? "this generator has no style encoder: shuffle draws a random z"
      : "this generator has no style input (it is not a VAE generator)");
  } else {
    showZSource("z drawn from seed 0");
  }
  $("#shuffle").disabled = $("#seed").disabled = !info.z_dim;
  document.body.dataset.ready = "true";
  changed();
}

wire();
start();
