// The model page: loads a GGUF file (picker, drag-and-drop, or the bundled SmolLM2 when
// the server has it), then generates with the crate's GPU decoder on WebGPU (CPU/WASM
// without it), streaming tokens; and the sparse-prefill view of one layer of a long text.
// Test hook: `window.wgsparseChat` (ready, loadUrl(url), loadBytes(bytes, name),
// generate(prompt, options), view(text, options), kvCacheBytes(positions), last result).
import init, { WebContext, WebModel, methods, version } from "./pkg/wgsparse_web.js";
import { paintPattern } from "./pattern.js";
import { clearError, setStatus, showError as showPageError } from "./page.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const BUNDLED = "models/smollm2-135m-instruct-q4_1.gguf";
// WASM memory is 32-bit: the file is copied in once, and the decoder needs room beside it.
const MAX_FILE_BYTES = 2 ** 31;
let ctx = null;
let model = null;
let busy = false;

const showError = (err) => showPageError(err, "wgsparse chat");

window.addEventListener("error", (e) => showError(e.error || e.message));
window.addEventListener("unhandledrejection", (e) => showError(e.reason));

function mib(b) { return (b / 2 ** 20).toFixed(1) + " MiB"; }

async function loadBytes(bytes, name) {
  if (bytes.length > MAX_FILE_BYTES) {
    throw new Error(`${name} is ${mib(bytes.length)}: over the ${mib(MAX_FILE_BYTES)} a page's WebAssembly memory can take with room for the decoder; pick a smaller model`);
  }
  setStatus("loading", `loading ${name} (${mib(bytes.length)})…`);
  clearError();
  await new Promise((r) => setTimeout(r, 0)); // let the status paint
  if (model) { model.free(); model = null; }
  model = await WebModel.load(ctx, bytes, name);
  const info = JSON.parse(model.infoJson());
  $("model").textContent = `${info.name}: ${info.architecture}, ${info.layers} layers, d ${info.d_model}, ` +
    `${info.heads}/${info.kv_heads} heads${info.experts ? `, ${info.experts} experts` : ""}, vocab ${info.vocab} (${info.tokenizer}); ` +
    `${info.engine === "gpu" ? "GPU decoder (WebGPU)" : "CPU decoder (WASM)"}, weights ${mib(info.weight_bytes)} ` +
    `from a ${mib(info.file_bytes)} file, loaded in ${(info.load_ms / 1e3).toFixed(1)} s`;
  $("run").disabled = false;
  $("view-run").disabled = false;
  setStatus("done", "model loaded");
  return info;
}

async function loadUrl(url) {
  setStatus("loading", `fetching ${url}…`);
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return loadBytes(new Uint8Array(await r.arrayBuffer()), url.split("/").pop());
}

async function loadFile(file) {
  return loadBytes(new Uint8Array(await file.arrayBuffer()), file.name);
}

function options() {
  return {
    max_tokens: Number($("max_tokens").value),
    method: $("method").value,
    chat: $("chat").checked,
    temperature: Number($("temperature").value),
    top_k: Number($("top_k").value),
    top_p: Number($("top_p").value),
    seed: Number($("seed").value),
  };
}

function row(name, value) {
  const tr = document.createElement("tr");
  tr.innerHTML = `<td>${name}</td><td class="num">${value}</td>`;
  return tr;
}

async function generate(prompt, opts) {
  if (!model) throw new Error("load a model first");
  if (busy) throw new Error("a generation is running");
  busy = true;
  $("run").disabled = true;
  const out = $("output");
  out.innerHTML = "";
  const p = document.createElement("span");
  p.className = "prompt";
  p.textContent = prompt;
  out.append(p);
  const gen = document.createElement("span");
  out.append(gen);
  setStatus("running", "prefill…");
  try {
    let n = 0;
    const r = JSON.parse(await model.generate(prompt, JSON.stringify(opts), (piece) => {
      gen.textContent += piece;
      n++;
      setStatus("running", `generating: ${n} token${n === 1 ? "" : "s"}`);
    }));
    const t = $("stats");
    t.innerHTML = "";
    t.append(row("engine · prompt attention", `${r.engine} · ${r.method}`),
      row("prompt tokens", r.prompt_tokens),
      row("time to first token", `${r.ttft_ms.toFixed(0)} ms`),
      row("prefill", `${r.prefill_tok_s.toFixed(1)} tok/s`),
      row("decode", `${r.decode_tok_s.toFixed(2)} tok/s (${r.tokens.length} tokens)`),
      row("peak GPU buffers", r.peak_gpu_bytes === null ? "not reported by the browser" : mib(r.peak_gpu_bytes)));
    window.wgsparseChat.last = r;
    setStatus("done", `done in ${(r.total_ms / 1e3).toFixed(1)} s`);
    return r;
  } finally {
    busy = false;
    $("run").disabled = false;
  }
}

async function view(text, opts) {
  if (!model) throw new Error("load a model first");
  if (busy) throw new Error("a generation is running");
  busy = true;
  $("view-run").disabled = true;
  setStatus("running", "sparse-prefill view: prefill…");
  try {
    const v = JSON.parse(await model.prefillView(text, JSON.stringify(opts)));
    const m = v.method;
    paintPattern($("view-dense"), v.dense_pattern);
    paintPattern($("view-sparse"), m.pattern);
    $("view-dense-head").textContent = `dense: ${v.dense_ms.toFixed(1)} ms`;
    $("view-method-head").textContent = `${m.method}: ${m.attention_ms.toFixed(1)} ms, density ${m.density.toFixed(3)}, ` +
      `recall ${m.recall === null ? "–" : m.recall.toFixed(4)}`;
    const t = $("view-stats");
    t.innerHTML = "";
    t.append(row("tokens · layer · head", `${v.tokens} · ${v.layer} · ${v.head}`),
      row("prefill of layers 0–" + v.layer + " (dense, WASM CPU decoder)", `${(v.prefill_ms / 1e3).toFixed(1)} s`),
      row(`attention, dense (${m.backend}, ${m.attention_timing})`, `${v.dense_ms.toFixed(1)} ms`),
      row(`attention, ${m.method} (${m.attention_timing})`, `${m.attention_ms.toFixed(1)} ms`),
      row("density (share of causal pairs computed)", m.density.toFixed(4)),
      row("attention-mass recall vs dense", m.recall === null ? "–" : m.recall.toFixed(4)));
    window.wgsparseChat.lastView = v;
    setStatus("done", "view done");
    return v;
  } finally {
    busy = false;
    $("view-run").disabled = false;
  }
}

async function main() {
  await init();
  for (const m of methods()) {
    for (const sel of ["method", "view-method"]) {
      if (sel === "view-method" && (m === "block-sparse" || m === "stripes")) continue;
      const o = document.createElement("option");
      o.textContent = m;
      if (sel === "view-method" && m === "sale") o.selected = true;
      $(sel).append(o);
    }
  }
  ctx = await WebContext.create(params.get("device") || "auto");
  const info = JSON.parse(ctx.infoJson());
  $("device").textContent = info.is_cpu
    ? `CPU (WASM)${info.fallback_reason ? ": " + info.fallback_reason : ""}`
    : `WebGPU${info.capabilities.f16 ? " (f16)" : ""}`;
  document.title += ` · ${version()}`;
  $("file").addEventListener("change", (e) => e.target.files[0] && loadFile(e.target.files[0]).catch(showError));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) loadFile(f).catch(showError);
  });
  // The bundled model: offered when the server has it (the test setup does).
  fetch(BUNDLED, { method: "HEAD" }).then((r) => {
    if (r.ok) {
      $("bundled").hidden = false;
      $("bundled").addEventListener("click", () => loadUrl(BUNDLED).catch(showError));
    }
  }).catch(() => {});
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    generate($("prompt").value, options()).catch(showError);
  });
  $("view-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const layer = $("view-layer").value;
    view($("view-text").value, {
      tokens: Number($("view-tokens").value),
      layer: layer === "" ? null : Number(layer),
      head: Number($("view-head").value),
      method: $("view-method").value,
    }).catch(showError);
  });
  setStatus("done", "ready: pick a model");
}

// Bytes of a GPU KV cache of `n` positions for the loaded model (made and dropped).
async function kvCacheBytes(n) {
  if (!model) throw new Error("load a model first");
  return model.kvCacheBytes(n);
}

window.wgsparseChat = { ready: main(), loadUrl, loadBytes, generate, view, kvCacheBytes, last: null, lastView: null };
