// What the browser tests share: a static server on 127.0.0.1 and Chromium's flags.
import http from "node:http";
import fs from "node:fs";
import path from "node:path";

const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript",
  ".wasm": "application/wasm", ".json": "application/json", ".css": "text/css", ".ts": "text/plain" };

// Serves `webDir` at / and each `[prefix, dir]` of `mounts` at /prefix/ (GET and HEAD;
// nothing outside those folders). Resolves to { server, base } (base ends with "/").
export async function serve(webDir, mounts = []) {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    let p = path.normalize(decodeURIComponent(url.pathname)).replace(/^(\.\.[/\\])+/, "");
    if (p.endsWith("/")) p += "index.html";
    const mount = mounts.find(([prefix]) => p.startsWith(`/${prefix}/`));
    const [root, rel] = mount ? [mount[1], p.slice(mount[0].length + 2)] : [webDir, p];
    const file = path.join(root, rel);
    if (!file.startsWith(root) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404); res.end("not found"); return;
    }
    res.writeHead(200, { "content-type": types[path.extname(file)] || "application/octet-stream",
      "content-length": fs.statSync(file).size, "cache-control": "no-store" });
    if (req.method === "HEAD") { res.end(); return; }
    fs.createReadStream(file).pipe(res);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { server, base: `http://127.0.0.1:${server.address().port}/` };
}

const baseArgs = ["--headless=new", "--no-sandbox", "--disable-gpu-sandbox", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"];

// Chromium's flags: WebGPU on SwiftShader, or no WebGPU at all (the CPU fallback).
export function chromiumArgs(webgpu) {
  return webgpu
    ? [...baseArgs, "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader"]
    : [...baseArgs, "--disable-features=WebGPU,Vulkan"];
}
