// Headless-browser test of the model page (web/chat.html): serves web/ and, under
// /models/, a folder of GGUF files; drives the system Chromium (playwright-core, never a
// downloaded browser) and checks
//   1. with WebGPU (SwiftShader here): SmolLM2-135M loads through the page's bundled-model
//      path and its greedy continuation of the prompt is the native CPU decoder's text
//      and tokens (given as JSON), on the GPU decoder;
//   2. without WebGPU: the same model on the CPU decoder compiled to WASM, same text; a
//      file chosen with the file picker and one dropped on the page load;
//   3. the sparse-prefill view on the first 4,096 tokens of a text: SALE on one layer of
//      SmolLM2 on WebGPU against dense (reported density below 1, attention-mass recall
//      at least 0.9, both pattern pictures drawn);
//   4. a tiny synthetic SmallThinker (MoE) file generates on WebGPU without error, and a
//      32k-position KV cache for SmolLM2 fits on WebGPU;
//   5. no page errors, no console errors, no error box.
// Prefill and decode tok/s are printed (SwiftShader's, not a real GPU's). Screenshots go to
// the out dir.
// Usage: node model-test.mjs <web dir> <out dir> <models dir> <expected.json> <prompt> <tokens> <long text>
import { chromium } from "playwright-core";
import { chromiumArgs, serve } from "./serve.mjs";
import fs from "node:fs";
import path from "node:path";
import os from "node:os";

const [webArg, outArg, modelsArg, expectedArg, prompt, tokensArg, textArg] = process.argv.slice(2);
const longText = fs.readFileSync(textArg, "utf8").slice(0, 40_000);
const webDir = path.resolve(webArg);
const outDir = path.resolve(outArg);
const modelsDir = path.resolve(modelsArg);
const expected = JSON.parse(fs.readFileSync(expectedArg, "utf8"));
const maxTokens = Number(tokensArg);
fs.mkdirSync(outDir, { recursive: true });
const browserPath = process.env.CHROMIUM || "/usr/bin/chromium";

const log = (...a) => console.log("[model-test]", ...a);
let failures = 0;
function check(cond, what) {
  if (cond) log("ok  ", what);
  else { failures++; log("FAIL", what); }
}

const { server, base } = await serve(webDir, [["models", modelsDir]]);
async function session(webgpu, label, body) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "wgsparse-chromium-"));
  const args = chromiumArgs(webgpu);
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: browserPath, headless: true, args, viewport: { width: 1100, height: 900 },
  });
  const page = ctx.pages()[0] || (await ctx.newPage());
  const problems = [];
  page.on("pageerror", (e) => problems.push("pageerror: " + e.message));
  page.on("console", (m) => { if (m.type() === "error") problems.push("console.error: " + m.text()); });
  page.on("crash", () => problems.push("page crashed"));
  page.setDefaultTimeout(480_000);
  try {
    await page.goto(base + "chat.html");
    await page.evaluate(() => window.wgsparseChat.ready);
    await body(page);
    const box = await page.evaluate(() => document.getElementById("error").textContent);
    check(!box, `${label}: no error box (${box || "empty"})`);
    check(problems.length === 0, `${label}: no page or console errors ${JSON.stringify(problems)}`);
    await page.screenshot({ path: path.join(outDir, `model-${label}.png`), fullPage: true });
  } finally {
    await ctx.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function smollm2(page, label, engine) {
  const t0 = Date.now();
  const info = await page.evaluate(() => window.wgsparseChat.loadUrl("models/smollm2-135m-instruct-q4_1.gguf"));
  log(`${label}: loaded in ${Date.now() - t0} ms:`, JSON.stringify(info));
  check(info.engine === engine, `${label}: the ${engine} decoder runs the model (${info.engine})`);
  const r = await page.evaluate(([p, n]) => window.wgsparseChat.generate(p, { max_tokens: n, method: "dense" }),
    [prompt, maxTokens]);
  log(`${label}: ${JSON.stringify(r.text)}; prefill ${r.prefill_tok_s.toFixed(2)} tok/s (${r.prompt_tokens} tokens, ` +
    `ttft ${r.ttft_ms.toFixed(0)} ms), decode ${r.decode_tok_s.toFixed(2)} tok/s`);
  check(JSON.stringify(r.tokens) === JSON.stringify(expected.tokens),
    `${label}: greedy tokens equal the native CPU decoder's (${r.tokens} vs ${expected.tokens})`);
  check(r.text === expected.text, `${label}: text equals the native CPU decoder's`);
  const shown = await page.evaluate(() => document.getElementById("output").textContent);
  check(shown === prompt + r.text, `${label}: the page streamed the continuation`);
}

await session(true, "webgpu", async (page) => {
  await smollm2(page, "webgpu", "gpu");
  // A 32k-token context for SmolLM2: 30 layers × K and V × 3 heads × 64 × 2 bytes (f16).
  const kv = await page.evaluate(() => window.wgsparseChat.kvCacheBytes(32768));
  const want = 30 * 2 * 3 * 64 * 32768 * 2;
  check(kv >= want && kv < want * 1.1, `a KV cache of 32,768 positions fits on WebGPU (${kv} B)`);
  const t0 = Date.now();
  const v = await page.evaluate((t) => window.wgsparseChat.view(t, { tokens: 4096, layer: 2, head: 0, method: "sale" }),
    longText);
  const m = v.method;
  log(`view: ${v.tokens} tokens, layer ${v.layer}: prefill ${(v.prefill_ms / 1e3).toFixed(1)} s (WASM CPU decoder); ` +
    `attention dense ${v.dense_ms.toFixed(0)} ms, ${m.method} ${m.attention_ms.toFixed(0)} ms (${m.backend}), ` +
    `density ${m.density.toFixed(3)}, recall ${m.recall.toFixed(4)}; ${Date.now() - t0} ms in all`);
  check(v.tokens === 4096 && v.layer === 2, `view: 4,096 tokens of layer 2 (${v.tokens}, ${v.layer})`);
  check(v.dense_pattern.head_density === 1 && m.pattern && v.dense_ms > 0, "view: dense timed, both patterns drawn");
  check(m.density > 0 && m.density < 1, `view: SALE skipped blocks (density ${m.density})`);
  check(m.recall >= 0.9 && m.recall <= 1 + 1e-9, `view: SALE's attention-mass recall vs dense ${m.recall} >= 0.9`);
  check(m.backend === "webgpu", `view: the attention ran on WebGPU (${m.backend})`);
  await page.screenshot({ path: path.join(outDir, "model-view-webgpu.png"), fullPage: true });
  const info = await page.evaluate(() => window.wgsparseChat.loadUrl("models/tiny-smallthinker.gguf"));
  check(info.architecture === "smallthinker" && info.experts > 0 && info.engine === "gpu",
    `smallthinker: an MoE model on the GPU decoder (${JSON.stringify(info)})`);
  const r = await page.evaluate(() => window.wgsparseChat.generate("Hello", { max_tokens: 6, method: "dense" }));
  check(r.tokens.length >= 1 && r.tokens.length <= 6, `smallthinker: generated ${r.tokens.length} tokens`);
});
await session(false, "cpu", async (page) => {
  await smollm2(page, "cpu", "cpu");
  // The file picker and drag-and-drop (the tiny MoE file): the page loads what is chosen.
  const shown = (name) => page.waitForFunction((n) => document.getElementById("model").textContent.startsWith(n), name);
  await page.setInputFiles("#file", path.join(modelsDir, "tiny-smallthinker.gguf"));
  await shown("tiny-smallthinker.gguf");
  check(true, "file picker: the chosen file loads");
  await page.evaluate(async () => {
    const buf = await (await fetch("models/tiny-smallthinker.gguf")).arrayBuffer();
    const dt = new DataTransfer();
    dt.items.add(new File([buf], "dropped.gguf"));
    document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
  });
  await shown("dropped.gguf");
  const r = await page.evaluate(() => window.wgsparseChat.generate("Hello", { max_tokens: 4, method: "dense" }));
  check(r.engine === "cpu" && r.tokens.length >= 1, `drag-and-drop: the dropped file loads and generates (${r.tokens.length} tokens)`);
});

server.close();
if (failures) {
  log(`${failures} check(s) failed`);
  process.exit(1);
}
log("model page: all checks passed");
