// The wgsparse demo page: picks a device, runs attention through the WASM module and
// shows timings, errors against dense attention and the selected block pattern.
// Test hook: `window.wgsparseDemo` (ready, run(options), last result).
import init, { WebContext, check_cpu_kernels, methods, version } from "./pkg/wgsparse_web.js";
import { paintPattern, patternCaption } from "./pattern.js";
import { clearError, setStatus, showError as showPageError } from "./page.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const contexts = new Map(); // device pick -> Promise<WebContext>

const showError = (err) => showPageError(err, "wgsparse demo");

window.addEventListener("error", (e) => showError(e.error || e.message));
window.addEventListener("unhandledrejection", (e) => showError(e.reason));

async function browserAdapterText() {
  // What the browser itself says about its adapter (wgpu leaves the name empty on the web).
  try {
    const a = navigator.gpu && (await navigator.gpu.requestAdapter());
    if (!a) return "";
    const i = a.info || {};
    return [i.vendor, i.architecture, i.device, i.description].filter((x) => x).join(" / ");
  } catch {
    return "";
  }
}

function context(pick) {
  if (!contexts.has(pick)) {
    const p = WebContext.create(pick);
    p.catch(() => contexts.delete(pick)); // a failed open may be retried
    contexts.set(pick, p);
  }
  return contexts.get(pick);
}

async function describeDevice(ctx) {
  const info = JSON.parse(ctx.infoJson());
  let text, detail;
  if (info.is_cpu) {
    text = "CPU (WASM)";
    detail = info.fallback_reason ? "— fallback: " + info.fallback_reason : "— CPU path chosen";
  } else {
    const adapter = (await browserAdapterText()) || info.adapter || "adapter";
    text = "WebGPU: " + adapter;
    const c = info.capabilities;
    detail = `— max ${c.max_invocations} invocations/workgroup, ${(c.max_storage_binding / 2 ** 20).toFixed(0)} MiB per binding, ` +
      `${c.max_workgroup_storage} B workgroup memory, f16 arithmetic ${c.f16 ? "yes" : "no"}, ` +
      `dense tiles ${info.dense_tile_rows} rows`;
  }
  $("device").textContent = text;
  $("device-detail").textContent = detail;
  $("device").dataset.backend = info.backend;
  return { ...info, label: text };
}

const fmt = (x, d = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const sci = (x) => (x === null || x === undefined ? "–" : Number(x).toExponential(2));

function row(table, cells) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => {
    const td = document.createElement("td");
    td.textContent = c;
    if (i > 0) td.className = "num";
    tr.appendChild(td);
  });
  table.appendChild(tr);
}

function render(summary, device) {
  const t = $("summary").tBodies[0];
  t.replaceChildren();
  row(t, ["device", device.label]);
  row(t, ["method", summary.method]);
  row(t, ["shape", `${summary.q_heads}×${summary.seq_len}×${summary.head_dim} (KV heads ${summary.kv_heads}), ${summary.dtype}, ${summary.causal ? "causal" : "full"}`]);
  row(t, ["attention time", `${fmt(summary.attention_ms)} ms (${summary.attention_timing})`]);
  row(t, ["total time", `${fmt(summary.total_ms)} ms`]);
  row(t, ["data", summary.data]);
  row(t, ["density (causal pairs computed)", fmt(summary.density, 4)]);
  const qy = summary.quality;
  row(t, ["attention-mass recall vs dense", qy ? fmt(qy.attn_recall, 4) : "–"]);
  row(t, ["output rel. L2 error vs dense", qy ? sci(qy.rel_l2_err) : "–"]);
  row(t, ["elements within 0.01 of dense", qy ? fmt(qy.tol_recall_01, 4) : "–"]);
  row(t, ["checked against", summary.reference || "not compared"]);
  row(t, ["max |error| vs that reference", summary.error ? sci(summary.error.max_abs_err) : "–"]);
  row(t, ["non-finite outputs", String(summary.nonfinite)]);
  const s = $("stages").tBodies[0];
  s.replaceChildren();
  for (const st of summary.stages) row(s, [st.name, `${fmt(st.ms)} ms`]);
  drawPattern(summary.pattern);
}

function drawPattern(p) {
  if (!paintPattern($("pattern"), p)) {
    $("pattern-caption").textContent = "No pattern reported.";
    return;
  }
  $("pattern-caption").textContent = patternCaption(p);
}

function formOptions() {
  const v = (id) => $(id).value;
  return {
    method: v("method"),
    seq_len: Number(v("seq_len")),
    q_heads: Number(v("q_heads")),
    kv_heads: Number(v("kv_heads")),
    head_dim: Number(v("head_dim")),
    dtype: v("dtype"),
    device: v("device_pick"),
    data: v("data"),
    theta: Number(v("theta")),
    window: Number(v("window")),
    tau: Number(v("tau")),
    bits: Number(v("bits")),
    gamma: Number(v("gamma")),
    min_budget: Number(v("min_budget")),
    compare: $("compare").checked,
  };
}

let busy = false;
const warmed = new Set(); // device picks that have run once
async function run(options) {
  if (busy) throw new Error("a run is already in progress");
  busy = true;
  $("run").disabled = true;
  clearError();
  const { device = "auto", ...opts } = options;
  try {
    setStatus("running", "opening device…");
    const ctx = await context(device);
    const dev = await describeDevice(ctx);
    const first = !dev.is_cpu && !warmed.has(device) ? " (the first run includes the browser's shader compilation)" : "";
    setStatus("running", `running ${opts.method || "dense"} on ${dev.is_cpu ? "the CPU (WASM)" : "WebGPU"}…${first}`);
    // Let the browser paint the state before the (possibly long) run.
    await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
    const res = await ctx.runAttention(JSON.stringify({ block: 64, ...opts }));
    const summary = JSON.parse(res.json);
    const output = res.output;
    res.free();
    warmed.add(device);
    render(summary, dev);
    setStatus("done", `done in ${fmt(summary.total_ms, 0)} ms`);
    const result = { summary, device: dev, output };
    window.wgsparseDemo.last = result;
    return result;
  } catch (e) {
    showError(e);
    throw e;
  } finally {
    busy = false;
    $("run").disabled = false;
  }
}

async function main() {
  setStatus("loading", "loading WebAssembly…");
  await init();
  const sel = $("method");
  for (const m of methods()) {
    const o = document.createElement("option");
    o.value = o.textContent = m;
    sel.appendChild(o);
  }
  if (params.get("device")) $("device_pick").value = params.get("device");
  const ctx = await context($("device_pick").value);
  await describeDevice(ctx);
  $("run").disabled = false;
  setStatus("idle", `ready (wgsparse ${version()})`);
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    run(formOptions()).catch(() => {}); // shown on the page by run()
  });
  $("device_pick").addEventListener("change", () => {
    context($("device_pick").value).then(describeDevice).catch(showError);
  });
  return { methods: methods() };
}

// checkCpuKernels(seed): the CPU path's quantized products (SIMD128) against f64.
window.wgsparseDemo = {
  run,
  last: null,
  checkCpuKernels: (seed) => JSON.parse(check_cpu_kernels(BigInt(seed))),
};
window.wgsparseDemo.ready = main().catch((e) => {
  showError(e);
  throw e;
});
