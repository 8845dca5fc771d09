// A helper thread of the page's decoder (vlmkit-web.js, WasmDecoder): vlmkit-gemv-shared.wasm over
// the memory it shares with the page. It sleeps until the page posts a job (a few matrix products
// cut into chunks of rows), then claims chunks beside the page's thread until none is left
// (runChunks). The page never waits for this thread to start a job, only for a chunk it has
// claimed: on a busy machine that is the OS's delay in running it again, not half of a product.
import { runChunks, CONTROL } from "./vlmkit-web.js";

self.onmessage = async ({ data: { module, memory, control, xq, xs } }) => {
  let gemv, c;
  try {
    ({ gemv } = (await WebAssembly.instantiate(module, { env: { memory } })).exports);
    c = new Int32Array(memory.buffer, control, CONTROL.words);
  } catch (error) {
    postMessage({ error: String(error) }); // the page goes on with one thread
    return;
  }
  postMessage({ ready: true });
  let seen = Atomics.load(c, CONTROL.job);
  for (;;) {
    // sleeps at once: spinning first (2,000 or 20,000 loads) was no faster on a quiet 2-core
    // machine and 12-30% slower where another process held a core (node, the demo model's decoder)
    Atomics.wait(c, CONTROL.job, seen);
    seen = Atomics.load(c, CONTROL.job);
    runChunks(c, gemv, xq, xs, seen, true);
  }
};
