// Assembles vlmkit-gemv.wat into vlmkit-gemv.wasm (its memory unshared: one thread) and
// vlmkit-gemv-shared.wasm (a shared memory: the page's thread and vlmkit-gemv-worker.js, on a
// cross-origin-isolated page) with wabt (npm install wabt@1.0.37; a tool for whoever edits the kernel: the export copies
// the committed .wasm files, nothing builds them at run time).
//   NODE_PATH=path/to/node_modules node vlmkit/runtime/web/build-gemv.mjs
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
const here = new URL(".", import.meta.url);
const wabt = await createRequire(import.meta.url)("wabt")();
const source = readFileSync(new URL("vlmkit-gemv.wat", here), "utf8");
const MEMORY = '(import "env" "memory" (memory 1 65536))';
if (!source.includes(MEMORY)) throw new Error(`vlmkit-gemv.wat must import its memory as ${MEMORY}`);
for (const [name, text] of [
  ["vlmkit-gemv.wasm", source],
  ["vlmkit-gemv-shared.wasm", source.replace(MEMORY, '(import "env" "memory" (memory 1 65536 shared))')],
]) {
  const module = wabt.parseWat(name, text, { simd: true, threads: true });
  module.validate({ simd: true, threads: true });
  const { buffer } = module.toBinary({});
  writeFileSync(new URL(name, here), Buffer.from(buffer));
  console.log(`${name}: ${buffer.length} bytes`);
}
