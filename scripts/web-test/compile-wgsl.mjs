// Compiles every WGSL file of a folder with the browser's own shader compiler (Tint, in
// headless Chromium on SwiftShader's WebGPU) and fails on any error: naga's validation
// (tests/portability.rs) is not the browser's, e.g. in its uniformity analysis.
//
//   node scripts/web-test/compile-wgsl.mjs DIR      (CHROMIUM=/path/to/chromium)
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const dir = process.argv[2];
const files = fs.readdirSync(dir).filter((f) => f.endsWith(".wgsl")).sort();
const browserPath = process.env.CHROMIUM || "/usr/bin/chromium";
const log = (...a) => console.log("[compile-wgsl]", ...a);

// WebGPU needs a secure context: an empty page on localhost.
const server = http.createServer((_, res) => res.end("<!doctype html><title>wgsl</title>"));
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const ctx = await chromium.launchPersistentContext(fs.mkdtempSync(path.join(os.tmpdir(), "wgsparse-wgsl-")), {
  executablePath: browserPath, headless: true,
  args: ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader"],
});
let rejected = 0;
try {
  const page = ctx.pages()[0] || (await ctx.newPage());
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  for (const f of files) {
    const code = fs.readFileSync(path.join(dir, f), "utf8");
    const errors = await page.evaluate(async (code) => {
      if (!window.dev) window.dev = await (await navigator.gpu.requestAdapter()).requestDevice();
      const info = await window.dev.createShaderModule({ code }).getCompilationInfo();
      return info.messages.filter((m) => m.type === "error").map((m) => `${m.lineNum}:${m.linePos} ${m.message}`);
    }, code);
    if (errors.length) {
      rejected++;
      log(`FAIL ${f} (${code.split("\n")[0]}): ${errors.join("; ")}`);
    }
  }
} finally {
  await ctx.close();
  server.close();
}
log(`${files.length} kernel variants compiled by the browser, ${rejected} rejected`);
process.exit(rejected || files.length === 0 ? 1 : 0);
