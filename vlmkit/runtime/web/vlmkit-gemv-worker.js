// The web decoder's second thread (vlmkit-web.js, WasmDecoder): runs vlmkit-gemv-shared.wasm on
// its share of a product's rows, in the memory it shares with the page. The page writes the
// product's arguments into the control words and bumps control[0]; this thread computes, then
// stores the same number in control[9]. It spins a little before sleeping, because a decoder step
// asks for a product every few tens of microseconds.
onmessage = async ({ data: { module, memory, control } }) => {
  const instance = await WebAssembly.instantiate(module, { env: { memory } });
  const gemv = instance.exports.gemv;
  const c = new Int32Array(memory.buffer, control, 16);
  postMessage("ready");
  let seen = Atomics.load(c, 0);
  for (;;) {
    for (let spins = 0; Atomics.load(c, 0) === seen && spins < 100000; spins++);
    if (Atomics.load(c, 0) === seen) Atomics.wait(c, 0, seen);
    seen = Atomics.load(c, 0);
    gemv(c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]);
    Atomics.store(c, 9, seen);
  }
};
