// Assembles vlmkit-gemv.wat into vlmkit-gemv.wasm with wabt (npm install wabt@1.0.37; a tool for
// whoever edits the kernel: the export copies the committed .wasm, nothing builds it at run time).
//   NODE_PATH=path/to/node_modules node vlmkit/runtime/web/build-gemv.mjs
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
const here = new URL(".", import.meta.url);
const wabt = await createRequire(import.meta.url)("wabt")();
const source = readFileSync(new URL("vlmkit-gemv.wat", here), "utf8");
const module = wabt.parseWat("vlmkit-gemv.wat", source, { simd: true });
module.validate();
const { buffer } = module.toBinary({});
writeFileSync(new URL("vlmkit-gemv.wasm", here), Buffer.from(buffer));
console.log(`vlmkit-gemv.wasm: ${buffer.length} bytes`);
