// vlmkit's browser captioner: an ES module, no build step, nothing loaded from outside its folder.
//
//   import { caption } from "./vlmkit-web.js";
//   const text = await caption(document.querySelector("img"));   // or a File / Blob / ImageBitmap
//
// It runs the folder `vlmkit export --format web` writes (its vlmkit-onnx.json says what) the way the
// Python runtime (vlmkit/runtime/onnx.py) runs an ONNX export, token for token:
//   - preprocessing from the manifest: resize with the declared filter *and implementation*
//     ("pil": Pillow's 22-bit fixed-point kernels; "torchvision": ATen's int16 kernels with the
//     weights computed as the numpy port computes them), centre crop with the declared rounding,
//     rescale and normalise in float32;
//   - the prompt's token embeddings, the image prefix from vision.onnx, then greedy decoding with
//     decoder.onnx and its key/value cache until a stop id or max_new_tokens;
//   - detokenizing with tokenizers.js (@huggingface/tokenizers), special tokens skipped.
// onnxruntime-web runs the graphs: wasm by default, WebGPU when the browser has an adapter.
// WebGPU kernels compute in another order, so where two tokens are nearly tied (often, in an
// untrained model) its captions may differ from Python's; the wasm backend's match them.

const HERE = new URL(".", import.meta.url);
const MANIFEST = "vlmkit-onnx.json"; // the ONNX export's manifest, with a "web" section

/** Load the captioner of the export folder at `base` (default: this module's folder).
 *  options.backend: "auto" (WebGPU when available, else wasm), "wasm" or "webgpu";
 *  options.threads: wasm threads (default: the cores, up to 4; needs a cross-origin-isolated page);
 *  options.onProgress({ loaded, total, file }): bytes fetched so far (from the network or the cache);
 *  options.cache: keep the files in the browser's Cache API (default true), keyed by their SHA-256,
 *  so a second visit reads them from disk and a changed export is fetched anew. */
export async function loadCaptioner(base = HERE, options = {}) {
  base = new URL(base, location.href);
  if (!base.pathname.endsWith("/")) base = new URL(base.pathname + "/", base);
  const started = performance.now();
  const manifest = await fetchJSON(new URL(MANIFEST, base));
  if (!manifest.web) throw new Error(`vlmkit: ${base} is an ONNX export without the browser runtime (export with --format web)`);
  const web = manifest.web;
  const loader = new Loader(base, web.files || {}, options);
  const runtime = web.runtime;
  const ort = await import(new URL(runtime.onnxruntime, base).href);
  ort.env.wasm.wasmPaths = new URL(runtime.vendor, base).href;
  const cores = navigator.hardwareConcurrency || 1;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? options.threads || Math.min(4, cores) : 1;
  const backend = await chooseBackend(options.backend || "auto");
  const providers = backend === "webgpu" ? ["webgpu", "wasm"] : ["wasm"];
  const graphs = manifest.variants[manifest.default_variant];
  const stages = {}; // ms per loading stage, for the benchmark's breakdown
  const timed = async (stage, promise) => { const t = performance.now(); const out = await promise; stages[stage] = Math.round(performance.now() - t); return out; };
  const session = (bytes) => ort.InferenceSession.create(bytes, { executionProviders: providers, graphOptimizationLevel: "all" });
  // every file fetched at once; onnxruntime's binary first, so that the sessions can start
  const wasmBinary = runtime.wasm_binary ? loader.bytes(runtime.wasm_binary) : null;
  if (wasmBinary) ort.env.wasm.wasmBinary = await timed("onnxruntime binary", wasmBinary);
  const [vision, decoder, embeddings, tokenizer] = await Promise.all([
    timed("vision graph", loader.bytes(graphs.vision).then((b) => timed("vision session", session(b)))),
    timed("decoder", web.decoder
      ? WasmDecoder.load(loader, web.decoder, runtime, base, ort.env.wasm.numThreads)
      : loader.bytes(graphs.decoder).then(session)),
    web.decoder ? null : loader.bytes(web.embed_tokens.file).then((b) => new EmbeddingTable(b, web.embed_tokens)),
    timed("tokenizer", loadTokenizer(base, manifest, loader)),
  ]);
  const timings = { loadMs: performance.now() - started, fromCache: loader.fromCache, fetched: loader.fetched, stages };
  return new Captioner({ ort, manifest, vision, decoder, embeddings, tokenizer, backend, ...timings });
}

let defaultCaptioner = null;

/** Caption one image (an <img>, <canvas>, ImageBitmap, ImageData, File or Blob) with the export
 *  this module sits in; the first call loads the graphs. */
export async function caption(image, options = {}) {
  defaultCaptioner ??= loadCaptioner(HERE, options);
  return (await defaultCaptioner).caption(image);
}

export class Captioner {
  constructor({ ort, manifest, vision, decoder, embeddings, tokenizer, backend, loadMs, fromCache, fetched, stages }) {
    Object.assign(this, { ort, manifest, vision, decoder, embeddings, tokenizer, backend, loadMs, fromCache, fetched, stages });
    const tokens = manifest.tokens;
    this.stopIds = new Set(tokens.stop_ids.map(Number));
    const dec = manifest.decoder;
    this.pastNames = dec.inputs.filter((n) => n.startsWith("past_key_values."));
    this.presentNames = dec.outputs.filter((n) => n.startsWith("present."));
    this.kvHeads = dec.num_kv_heads;
    this.headDim = dec.head_dim;
    this.hidden = dec.hidden_size;
    this.queue = Promise.resolve(); // onnxruntime sessions run one call at a time
  }

  /** Stop the decoder's workers and release the graphs' sessions; the captioner is unusable after. */
  async dispose() {
    await this.queue;
    this.decoder?.dispose?.();
    await Promise.all([this.vision, this.decoder].map((s) => s?.release?.()));
  }

  /** The caption of `image` (a string). */
  async caption(image) {
    return (await this.captionDetails(image)).text;
  }

  /** { text, ids, ms, preprocessMs, visionMs, tokens } for `image`. */
  captionDetails(image) {
    const run = this.queue.then(() => this.#captionNow(image));
    this.queue = run.catch(() => {});
    return run;
  }

  /** Pixel values [1, 3, H, W] (Float32Array) as the Python runtime computes them. */
  async preprocess(image) {
    return preprocess(await rgbPixels(image), this.manifest.preprocessing);
  }

  /** The image prefix of `image` (the vision graph's output): { data: Float32Array, dims }. */
  prefix(image) {
    const run = this.queue.then(async () => {
      const prefix = await this.#prefixOf(await this.preprocess(image));
      const out = { data: Float32Array.from(prefix.data), dims: prefix.dims };
      prefix.dispose?.();
      return out;
    });
    this.queue = run.catch(() => {});
    return run;
  }

  /** The page's own decoder's logits after the prompt of `image` (Float32Array [vocab]): what the
   *  browser tests compare with vlmkit.runtime.web_decoder in Python. */
  promptLogits(image) {
    const run = this.queue.then(async () => {
      if (!(this.decoder instanceof WasmDecoder)) throw new Error("vlmkit: this export runs its decoder in onnxruntime-web");
      const prefix = await this.#prefixOf(await this.preprocess(image));
      const embeds = this.#promptEmbeds(prefix.data, prefix.dims[1]);
      prefix.dispose?.();
      const hidden = this.hidden;
      const cache = this.decoder.newCache(embeds.length / hidden);
      let logits;
      const length = embeds.length / hidden;
      for (let t = 0; t < length; t++) logits = this.decoder.step(embeds.subarray(t * hidden, (t + 1) * hidden), t, cache, t === length - 1);
      return logits;
    });
    this.queue = run.catch(() => {});
    return run;
  }

  async #prefixOf(pixels) {
    const [h, w] = this.manifest.preprocessing.input_size;
    const vis = this.manifest.vision;
    const out = await this.vision.run({ [vis.input]: new this.ort.Tensor("float32", pixels, [1, 3, h, w]) });
    return out[vis.output];
  }

  async #captionNow(image) {
    const t0 = performance.now();
    const pixels = await this.preprocess(image);
    const t1 = performance.now();
    const prefix = await this.#prefixOf(pixels);
    const t2 = performance.now();
    const ids =
      this.decoder instanceof WasmDecoder
        ? this.decoder.greedy(this.#promptEmbeds(prefix.data, prefix.dims[1]), this.manifest.generation.max_new_tokens, this.stopIds)
        : await this.#greedy(prefix.data, prefix.dims[1]);
    prefix.dispose?.();
    let text = this.tokenizer.decode(ids, { skip_special_tokens: true, clean_up_tokenization_spaces: false });
    if (this.manifest.tokens.clean_up_tokenization_spaces) text = cleanUpTokenization(text);
    text = pythonStrip(text);
    const t3 = performance.now();
    return { text, ids, ms: t3 - t0, preprocessMs: t1 - t0, visionMs: t2 - t1, tokens: ids.length };
  }

  /** before + [image prefix] + after, embedded: Float32Array [T * hidden] */
  #promptEmbeds(prefix, prefixTokens) {
    const { hidden } = this;
    const { before, after } = this.manifest.tokens;
    const table = this.embeddings || this.decoder;
    const embeds = new Float32Array((before.length + prefixTokens + after.length) * hidden);
    before.forEach((id, i) => table.row(id, embeds, i * hidden));
    embeds.set(prefix.subarray(0, prefixTokens * hidden), before.length * hidden);
    after.forEach((id, i) => table.row(id, embeds, (before.length + prefixTokens + i) * hidden));
    return embeds;
  }

  async #greedy(prefix, prefixTokens) {
    const { ort, hidden } = this;
    const { before, after } = this.manifest.tokens;
    const length0 = before.length + prefixTokens + after.length;
    const embeds = new Float32Array(length0 * hidden);
    before.forEach((id, i) => this.embeddings.row(id, embeds, i * hidden));
    embeds.set(prefix.subarray(0, prefixTokens * hidden), before.length * hidden);
    after.forEach((id, i) => this.embeddings.row(id, embeds, (before.length + prefixTokens + i) * hidden));

    let past = {};
    for (const name of this.pastNames) {
      past[name] = new ort.Tensor("float32", new Float32Array(0), [1, this.kvHeads, 0, this.headDim]);
    }
    let feedEmbeds = embeds;
    let step = length0;
    let length = length0;
    let positions = BigInt64Array.from({ length: length0 }, (_, i) => BigInt(i));
    const limit = this.manifest.generation.max_new_tokens;
    const ids = [];
    for (let i = 0; i < limit; i++) {
      const feed = {
        inputs_embeds: new ort.Tensor("float32", feedEmbeds, [1, step, hidden]),
        attention_mask: new ort.Tensor("int64", new BigInt64Array(length).fill(1n), [1, length]),
        position_ids: new ort.Tensor("int64", positions, [1, step]),
        ...past,
      };
      const out = await this.decoder.run(feed);
      for (const name of this.pastNames) past[name].dispose?.();
      const next = argmax(out.logits.data);
      out.logits.dispose?.();
      if (this.stopIds.has(next)) {
        for (const name of this.presentNames) out[name].dispose?.();
        break;
      }
      ids.push(next);
      past = {};
      this.pastNames.forEach((name, k) => (past[name] = out[this.presentNames[k]]));
      feedEmbeds = new Float32Array(hidden);
      this.embeddings.row(next, feedEmbeds, 0);
      positions = BigInt64Array.of(BigInt(length));
      step = 1;
      length += 1;
    }
    for (const name of this.pastNames) past[name]?.dispose?.();
    return ids;
  }
}

// ------------------------------------------------------------------------------ loading

async function fetchJSON(url) {
  // revalidated: the manifest names the other files' hashes, so it must never be a stale copy
  const response = await fetch(url, { cache: "no-cache" });
  if (!response.ok) throw new Error(`vlmkit: cannot load ${url} (HTTP ${response.status})`);
  return response.json();
}

const CACHE = "vlmkit-web";

/** Fetches the export's files (the manifest's web.files: bytes, sha256, gzip or not), all at once,
 *  reporting progress; keeps each (decompressed) in the Cache API under its URL and hash, so a
 *  second visit reads it from disk and a re-export (another hash) is fetched anew. */
class Loader {
  constructor(base, files, { onProgress, cache = true } = {}) {
    Object.assign(this, { base, files, onProgress });
    this.total = Object.values(files).reduce((sum, f) => sum + f.bytes, 0);
    this.loaded = 0;
    this.fetched = 0; // bytes that came from the network
    this.fromCache = [];
    this.cache = cache && typeof caches !== "undefined" ? caches.open(CACHE).catch(() => null) : Promise.resolve(null);
  }

  #progress(n, file) {
    this.loaded += n;
    this.onProgress?.({ loaded: this.loaded, total: this.total, file });
  }

  /** The bytes of `name` (Uint8Array), decompressed when the export stored it gzipped. `into`: a
   *  Uint8Array of exactly their length to read them into (the decoder's wasm memory: no second
   *  copy of 143 MB). */
  async bytes(name, into = null) {
    const meta = this.files[name];
    if (!meta) throw new Error(`vlmkit: ${name} is not in the manifest's web.files`);
    const url = new URL(meta.path || name, this.base);
    const key = new Request(`${url.href}?sha256=${meta.sha256}`);
    const cache = await this.cache;
    const hit = cache && (await cache.match(key));
    if (hit) {
      this.fromCache.push(name);
      const data = into ? await readInto(hit.body, into, url) : new Uint8Array(await hit.arrayBuffer());
      this.#progress(meta.bytes, name);
      return data;
    }
    const response = await fetch(url);
    if (!response.ok || !response.body) throw new Error(`vlmkit: cannot load ${url} (HTTP ${response.status})`);
    let stream = response.body.pipeThrough(new TransformStream({
      transform: (chunk, controller) => { this.fetched += chunk.byteLength; this.#progress(chunk.byteLength, name); controller.enqueue(chunk); },
    }));
    if (meta.encoding === "gzip") stream = stream.pipeThrough(new DecompressionStream("gzip"));
    // the cache gets its own branch of the stream: `into` may be a view of a shared memory, which
    // a Response may not take; a full disk only costs the next visit
    let caching = null;
    if (cache) {
      const [mine, theirs] = stream.tee();
      stream = mine;
      caching = cache.put(key, new Response(theirs)).catch(() => {});
    }
    try {
      const data = into ? await readInto(stream, into, url) : new Uint8Array(await new Response(stream).arrayBuffer());
      await caching;
      return data;
    } catch (error) {
      caching?.then(() => cache.delete(key)); // never keep what failed its check
      throw error;
    }
  }
}

/** A byte stream read into `into` (Uint8Array), which it must fill exactly. */
async function readInto(stream, into, url) {
  let at = 0;
  const reader = stream.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (at + value.byteLength > into.length) throw new Error(`vlmkit: ${url} is longer than its manifest says`);
    into.set(value, at);
    at += value.byteLength;
  }
  if (at !== into.length) throw new Error(`vlmkit: ${url} has ${at} bytes, its manifest says ${into.length}`);
  return into;
}

async function chooseBackend(wanted) {
  if (wanted === "wasm") return "wasm";
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (adapter) return "webgpu";
  if (wanted === "webgpu") throw new Error("vlmkit: WebGPU was asked for but this browser has no WebGPU adapter");
  return "wasm";
}

async function loadTokenizer(base, manifest, loader) {
  const { Tokenizer } = await import(new URL(manifest.web.runtime.tokenizers, base).href);
  const files = manifest.web.tokenizer;
  const json = (name) => loader.bytes(name).then((b) => JSON.parse(new TextDecoder().decode(b)));
  const [tokenizer, config] = await Promise.all([json(files.file), files.config ? json(files.config) : {}]);
  return new Tokenizer(tokenizer, config);
}

/** The token-embedding table [V, D]: raw little-endian float32 or float16 rows after `offset`
 *  bytes (the .npy header, which the manifest measured). */
class EmbeddingTable {
  constructor(bytes, spec) {
    const [rows, dim] = spec.shape;
    this.dim = dim;
    this.dtype = spec.dtype;
    const start = bytes.byteOffset + (spec.offset || 0);
    const buffer = bytes.buffer.slice(start, start + rows * dim * (spec.dtype === "float16" ? 2 : 4));
    if (spec.dtype === "float32") this.data = new Float32Array(buffer);
    else if (spec.dtype === "float16") this.data = new Uint16Array(buffer);
    else throw new Error(`vlmkit: unknown embedding dtype ${spec.dtype}`);
    if (this.data.length !== rows * dim) throw new Error("vlmkit: the embedding table is shorter than its manifest says");
  }

  /** Row `id` as float32 into `out` at `offset`. */
  row(id, out, offset) {
    const start = id * this.dim;
    if (this.dtype === "float32") out.set(this.data.subarray(start, start + this.dim), offset);
    else for (let j = 0; j < this.dim; j++) out[offset + j] = halfToFloat(this.data[start + j]);
  }
}

/** The web export's decoder (vlmkit/runtime/web_decoder.py says why and what): int8 weights in
 *  blocks of 32 with float16 scales, activations quantized to int16 per block of 32 before each
 *  product, the products in vlmkit-gemv.wasm (WebAssembly SIMD), norms, rotary attention with
 *  grouped key/value heads and the SiLU-gated MLP here, one position per step. The token-embedding
 *  table is the same int8 form, and the LM head when the model ties them. */
class WasmDecoder {
  /** `threads` > 1 on a cross-origin-isolated page: threads - 1 workers (vlmkit-gemv-worker.js)
   *  share the memory and claim chunks of each product's rows beside this thread (runChunks);
   *  otherwise one thread, and one thread (with a console warning) where a worker cannot start. */
  static async load(loader, spec, runtime, base, threads = 1) {
    const shared = threads > 1 && self.crossOriginIsolated && runtime.gemv_shared && runtime.gemv_worker;
    const kernel = await WebAssembly.compile(await loader.bytes(shared ? runtime.gemv_shared : runtime.gemv));
    const decoder = new WasmDecoder(spec, kernel, shared);
    // decoder.bin straight into the wasm memory, as it arrives (from the network or the cache),
    // while the workers start
    await Promise.all([
      loader.bytes(spec.file, new Uint8Array(decoder.memory.buffer, decoder.base, spec.bytes)),
      shared && decoder.#startWorkers(kernel, new URL(runtime.gemv_worker, base), threads - 1).catch((e) => decoder.#alone(e)),
    ]);
    const t = performance.now();
    decoder.#fill(spec);
    decoder.setupMs = Math.round(performance.now() - t);
    return decoder;
  }

  constructor(spec, kernel, shared = false) {
    const a = (this.arch = spec.architecture);
    this.block = spec.block;
    this.hidden = a.hidden;
    const maxK = Math.max(a.hidden, a.intermediate, a.heads * a.head_dim);
    // one job's outputs side by side: q, k and v; gate and up; the logits
    const maxY = Math.max(a.vocab, 2 * a.intermediate, (a.heads + 2 * a.kv_heads) * a.head_dim);
    // layout: the workers' control words, scratch (xq int16, xs float32, y float32), decoder.bin
    // as it is, float32 scales
    const align = (n) => Math.ceil(n / 64) * 64;
    this.control = 1024;
    this.xq = align(this.control + CONTROL.words * 4);
    this.xs = align(this.xq + maxK * 2);
    this.y = align(this.xs + (maxK / this.block) * 4);
    this.base = align(this.y + maxY * 4);
    let end = align(this.base + spec.bytes);
    this.scaleAt = {};
    for (const [name, t] of Object.entries(spec.tensors)) {
      if (t.dtype !== "float16") continue;
      this.scaleAt[name] = end;
      end = align(end + (t.bytes / 2) * 4);
    }
    const pages = Math.ceil(end / 65536);
    this.memory = new WebAssembly.Memory({ initial: pages, maximum: pages, shared: Boolean(shared) });
    this.gemvFn = new WebAssembly.Instance(kernel, { env: { memory: this.memory } }).exports.gemv;
    this.xqView = new Int16Array(this.memory.buffer, this.xq, maxK); // the kernel's input, quantized
    this.xsView = new Float32Array(this.memory.buffer, this.xs, maxK / this.block);
    this.workers = [];
    this.threads = 1;
  }

  async #startWorkers(kernel, url, count) {
    const started = Array.from({ length: count }, () => {
      const worker = new Worker(url, { type: "module" });
      this.workers.push(worker);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`${url} did not start in ${WORKER_START_MS / 1000} s`)), WORKER_START_MS);
        worker.onmessage = ({ data }) => {
          clearTimeout(timer);
          if (data?.error) reject(new Error(`${url}: ${data.error}`));
          else resolve();
        };
        worker.onerror = (e) => {
          clearTimeout(timer);
          reject(new Error(`${url} failed: ${e.message || "it could not be loaded"}`));
        };
        worker.postMessage({ module: kernel, memory: this.memory, control: this.control, xq: this.xq, xs: this.xs });
      });
    });
    await Promise.all(started);
    this.controlWords = new Int32Array(this.memory.buffer, this.control, CONTROL.words);
    this.job = Atomics.load(this.controlWords, CONTROL.job);
    this.threads = 1 + count;
  }

  /** Back to one thread (the shared kernel runs alone as well), saying why. */
  #alone(error) {
    console.warn(`vlmkit: the decoder runs on one thread: ${error.message}`);
    this.dispose();
  }

  /** Chunks of products computed by the workers so far (0 on one thread). */
  get workerChunks() {
    return this.controlWords ? Atomics.load(this.controlWords, CONTROL.byWorkers) : 0;
  }

  /** Stop the decoder's workers (the page's thread computes alone from then on). */
  dispose() {
    for (const worker of this.workers) worker.terminate();
    this.workers = [];
    this.controlWords = null;
    this.threads = 1;
  }

  /** decoder.bin (in the memory at `base`): its float16 scales as float32, views of its tensors. */
  #fill(spec) {
    const a = this.arch;
    const buffer = this.memory.buffer;
    const half = halfTable();
    for (const [name, at] of Object.entries(this.scaleAt)) {
      const t = spec.tensors[name];
      const from = new Uint16Array(buffer, this.base + t.offset, t.bytes / 2);
      const to = new Float32Array(buffer, at, t.bytes / 2);
      for (let i = 0; i < from.length; i++) to[i] = half[from[i]];
    }
    const f32 = (name) => { const t = spec.tensors[name]; return t && new Float32Array(buffer, this.base + t.offset, t.bytes / 4); };
    const matrix = (name) => { const t = spec.tensors[`${name}.q`]; return { w: this.base + t.offset, ws: this.scaleAt[`${name}.s`], n: t.shape[0], k: t.shape[1] }; };
    this.embed = matrix("embed");
    this.embedQ = new Int8Array(buffer, this.embed.w, this.embed.n * this.embed.k);
    this.embedS = new Float32Array(buffer, this.embed.ws, (this.embed.n * this.embed.k) / this.block);
    this.lmHead = a.tied ? this.embed : matrix("lm_head");
    this.norm = f32("norm");
    this.layers = Array.from({ length: a.layers }, (_, i) => {
      const p = `layers.${i}`;
      const layer = { inputNorm: f32(`${p}.input_norm`), postNorm: f32(`${p}.post_norm`) };
      for (const n of ["q", "k", "v", "o", "gate", "up", "down"]) layer[n] = matrix(`${p}.${n}`);
      for (const n of ["q", "k", "v"]) layer[`${n}Bias`] = f32(`${p}.${n}.bias`);
      return layer;
    });
    this.invFreq = Float32Array.from(a.inv_freq);
  }

  /** Embedding row `id` (dequantized) into `out` at `offset`. */
  row(id, out, offset) {
    const { k } = this.embed;
    const block = this.block;
    for (let j = 0; j < k; j++) out[offset + j] = this.embedQ[id * k + j] * this.embedS[(id * k + j) / block | 0];
  }

  /** `x` (Float32Array [K]) into the kernel's int16 input, with a scale per block of 32. */
  #quantize(x) {
    const { xqView: xq, xsView: xs, block } = this;
    for (let b = 0, start = 0; start < x.length; b++, start += block) {
      const end = start + block;
      let max = 0;
      for (let j = start; j < end; j++) {
        const a = Math.abs(x[j]);
        if (a > max) max = a;
      }
      const scale = max === 0 ? 1 : Math.fround(max / 32767);
      xs[b] = scale;
      for (let j = start; j < end; j++) {
        const q = x[j] / scale; // rounded half away from zero, as vlmkit.runtime.web_decoder
        const v = Math.floor((q < 0 ? -q : q) + 0.5);
        xq[j] = q < 0 ? -v : v;
      }
    }
  }

  /** The products of the matrices `ms` with the last quantized input: new Float32Arrays [N]. With
   *  workers, one job: the rows cut into chunks of ~64k weights, claimed by whichever thread is free. */
  #products(...ms) {
    const at = [];
    for (let p = 0, y = this.y; p < ms.length; y += ms[p].n * 4, p++) at.push(y);
    const c = this.controlWords;
    if (!c) {
      ms.forEach((m, p) => this.gemvFn(this.xq, this.xs, m.w, m.ws, at[p], m.k, 0, m.n));
    } else {
      const job = (this.job = (this.job + 1) & JOB_MASK);
      const chunks = postJob(c, job, ms, at);
      runChunks(c, this.gemvFn, this.xq, this.xs, job, false);
      // spin (this thread may not block), only for chunks a worker has claimed and is computing;
      // a worker that never counts its chunk (it died) leaves this thread to compute alone
      for (let spins = 1, since = 0; Atomics.load(c, CONTROL.done) < chunks; spins++) {
        if (spins % 4096) continue;
        since ||= performance.now();
        if (performance.now() - since > WORKER_STALL_MS) {
          this.#alone(new Error(`a worker held a chunk for over ${WORKER_STALL_MS / 1000} s`));
          return this.#products(...ms);
        }
      }
    }
    return ms.map((m, p) => new Float32Array(this.memory.buffer, at[p], m.n).slice());
  }

  static addBias(y, bias) {
    if (bias) for (let i = 0; i < y.length; i++) y[i] += bias[i];
    return y;
  }

  #rms(x, weight) {
    let sum = 0;
    for (let i = 0; i < x.length; i++) sum += x[i] * x[i];
    const inv = 1 / Math.sqrt(sum / x.length + this.arch.rms_eps);
    const out = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++) out[i] = weight[i] * Math.fround(x[i] * inv);
    return out;
  }

  #rope(x, heads, position) {
    const dim = this.arch.head_dim;
    const half = dim / 2;
    const scale = this.arch.rope_scaling;
    for (let i = 0; i < half; i++) {
      const angle = Math.fround(position * this.invFreq[i]);
      const c = Math.fround(Math.cos(angle) * scale);
      const s = Math.fround(Math.sin(angle) * scale);
      for (let h = 0; h < heads; h++) {
        const a = x[h * dim + i];
        const b = x[h * dim + half + i];
        x[h * dim + i] = a * c - b * s;
        x[h * dim + half + i] = b * c + a * s;
      }
    }
  }

  /** A key/value cache for `length` positions. */
  newCache(length) {
    const { kv_heads: kvHeads, head_dim: dim } = this.arch;
    return this.layers.map(() => ({ keys: new Float32Array(length * kvHeads * dim), values: new Float32Array(length * kvHeads * dim) }));
  }

  /** One position (`x`, Float32Array [hidden]) through the decoder; its keys and values go into
   *  `cache`; returns the logits after it (Float32Array [vocab]), or null without `logits` (a
   *  prompt position before the last: the LM head is a fifth of a step). */
  step(x, position, cache, logits = true) {
    const { heads, kv_heads: kvHeads, head_dim: dim, scaling } = this.arch;
    const group = heads / kvHeads;
    x = Float32Array.from(x);
    const scores = new Float64Array(position + 1);
    const sums = new Float64Array(dim);
    const attended = new Float32Array(heads * dim);
    for (let l = 0; l < this.layers.length; l++) {
      const layer = this.layers[l];
      const { keys, values } = cache[l];
      this.#quantize(this.#rms(x, layer.inputNorm));
      let [q, k, v] = this.#products(layer.q, layer.k, layer.v);
      q = WasmDecoder.addBias(q, layer.qBias);
      k = WasmDecoder.addBias(k, layer.kBias);
      v = WasmDecoder.addBias(v, layer.vBias);
      this.#rope(q, heads, position);
      this.#rope(k, kvHeads, position);
      keys.set(k, position * kvHeads * dim);
      values.set(v, position * kvHeads * dim);
      for (let h = 0; h < heads; h++) {
        const kv = (h / group) | 0;
        let max = -Infinity;
        const qh = h * dim;
        for (let t = 0; t <= position; t++) {
          let dot = 0;
          const at = (t * kvHeads + kv) * dim;
          for (let d = 0; d < dim; d++) dot += q[qh + d] * keys[at + d];
          scores[t] = Math.fround(dot * scaling);
          if (scores[t] > max) max = scores[t];
        }
        let total = 0;
        for (let t = 0; t <= position; t++) total += scores[t] = Math.exp(scores[t] - max);
        // each output's sum over the positions in their order, a position's values read in a row
        sums.fill(0);
        for (let t = 0; t <= position; t++) {
          const weight = scores[t];
          const at = (t * kvHeads + kv) * dim;
          for (let d = 0; d < dim; d++) sums[d] += weight * values[at + d];
        }
        for (let d = 0; d < dim; d++) attended[qh + d] = sums[d] / total;
      }
      this.#quantize(attended);
      const [o] = this.#products(layer.o);
      for (let i = 0; i < x.length; i++) x[i] += o[i];
      this.#quantize(this.#rms(x, layer.postNorm));
      const [gate, up] = this.#products(layer.gate, layer.up);
      for (let i = 0; i < gate.length; i++) gate[i] = (gate[i] / (1 + Math.exp(-gate[i]))) * up[i];
      this.#quantize(gate);
      const [down] = this.#products(layer.down);
      for (let i = 0; i < x.length; i++) x[i] += down[i];
    }
    if (!logits) return null;
    this.#quantize(this.#rms(x, this.norm));
    return this.#products(this.lmHead)[0];
  }

  /** Greedy ids after the prompt `embeds` (Float32Array [T * hidden]), one position at a time. */
  greedy(embeds, maxNewTokens, stopIds) {
    const hidden = this.hidden;
    const length = embeds.length / hidden;
    const cache = this.newCache(length + maxNewTokens);
    // the leading positions this prompt shares with the last one (the tokens before the image):
    // their keys and values are the same numbers, so they are copied, not computed again
    const last = this.lastPrompt;
    let shared = 0;
    while (last && shared < Math.min(embeds.length, last.embeds.length) / hidden - 1 && sameRow(embeds, last.embeds, shared * hidden, hidden)) shared++;
    const { kv_heads: kvHeads, head_dim: dim } = this.arch;
    for (let l = 0; shared && l < cache.length; l++) {
      cache[l].keys.set(last.cache[l].keys.subarray(0, shared * kvHeads * dim));
      cache[l].values.set(last.cache[l].values.subarray(0, shared * kvHeads * dim));
    }
    let logits;
    for (let t = shared; t < length; t++) logits = this.step(embeds.subarray(t * hidden, (t + 1) * hidden), t, cache, t === length - 1);
    this.lastPrompt = { embeds: embeds.slice(), cache };
    const ids = [];
    const x = new Float32Array(hidden);
    for (let position = length; ids.length < maxNewTokens; position++) {
      const next = argmax(logits);
      if (stopIds.has(next)) break;
      ids.push(next);
      if (ids.length === maxNewTokens) break;
      this.row(next, x, 0);
      logits = this.step(x, position, cache);
    }
    return ids;
  }
}

/** The decoder's control words in its shared memory (Int32Array indices): the job number (the
 *  workers sleep on it), the next chunk to claim (the job number in the high bits: a thread late
 *  from the last job cannot claim one of this job's chunks), chunks done, chunks, products, and per
 *  product (up to 4): weights, scales, output, K, N, rows per chunk, its first chunk. */
export const CONTROL = { job: 0, next: 1, done: 2, chunks: 3, count: 4, byWorkers: 5, products: 8, perProduct: 8, words: 40 };
const JOB_SHIFT = 20; // the chunk's index in the low 20 bits of CONTROL.next
const CHUNK_MASK = (1 << JOB_SHIFT) - 1;
const JOB_MASK = 0x7ff;
const CHUNK_WEIGHTS = 65536; // ~15 us of the kernel
const WORKER_START_MS = 20000;
const WORKER_STALL_MS = 5000;

/** Post job number `job` to the workers: the products `ms` ({ w, ws, n, k }) into the outputs at
 *  `at`, on the input xq/xs. Returns its number of chunks. */
function postJob(c, job, ms, at) {
  Atomics.store(c, CONTROL.next, (job << JOB_SHIFT) | CHUNK_MASK); // no chunk to claim until it is written
  let chunks = 0;
  ms.forEach((m, p) => {
    const rows = Math.max(16, Math.round(CHUNK_WEIGHTS / m.k));
    [m.w, m.ws, at[p], m.k, m.n, rows, chunks].forEach((v, i) => Atomics.store(c, CONTROL.products + p * CONTROL.perProduct + i, v));
    chunks += Math.ceil(m.n / rows);
  });
  Atomics.store(c, CONTROL.count, ms.length);
  Atomics.store(c, CONTROL.chunks, chunks);
  Atomics.store(c, CONTROL.done, 0);
  Atomics.store(c, CONTROL.next, job << JOB_SHIFT);
  Atomics.store(c, CONTROL.job, job);
  Atomics.notify(c, CONTROL.job);
  return chunks;
}

/** Claim chunks of job `job` one at a time (compare-and-swap on CONTROL.next) and compute them,
 *  until none is left or another job has started; the thread that computes a chunk counts it done
 *  (`worker`: and counts it in CONTROL.byWorkers). Claiming the last chunk closes the job
 *  (CHUNK_MASK), so a thread that stalled between its read and its swap for a multiple of 2,048
 *  jobs can only ever take a chunk that the current job still has. Every row is computed by the
 *  same kernel whichever thread takes it: the results do not depend on the threads. */
export function runChunks(c, gemv, xq, xs, job, worker) {
  for (;;) {
    const next = Atomics.load(c, CONTROL.next);
    const chunk = next & CHUNK_MASK;
    const chunks = Atomics.load(c, CONTROL.chunks);
    if (next >>> JOB_SHIFT !== job || chunk >= chunks) return;
    const after = chunk + 1 < chunks ? next + 1 : (job << JOB_SHIFT) | CHUNK_MASK;
    if (Atomics.compareExchange(c, CONTROL.next, next, after) !== next) continue;
    // claimed: the job cannot change before this chunk is counted done
    const count = c[CONTROL.count];
    let at = CONTROL.products;
    while (at - CONTROL.products < (count - 1) * CONTROL.perProduct && chunk >= c[at + CONTROL.perProduct + 6]) at += CONTROL.perProduct;
    const rows = c[at + 5];
    const n0 = (chunk - c[at + 6]) * rows;
    gemv(xq, xs, c[at], c[at + 1], c[at + 2], c[at + 3], n0, Math.min(c[at + 4], n0 + rows));
    if (worker) Atomics.add(c, CONTROL.byWorkers, 1);
    Atomics.add(c, CONTROL.done, 1);
  }
}

let halfCache = null;
/** float16 bits -> float32, all 65,536 of them. */
function halfTable() {
  halfCache ??= Float32Array.from({ length: 65536 }, (_, h) => halfToFloat(h));
  return halfCache;
}

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const fraction = h & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

/** a[at..at+n) equals b[at..at+n) */
function sameRow(a, b, at, n) {
  for (let i = at; i < at + n; i++) if (a[i] !== b[i]) return false;
  return true;
}

function argmax(values) {
  let best = 0; // the first of equal maxima, as numpy's argmax
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

// transformers' clean_up_tokenization, as vlmkit.runtime.onnx.clean_up_tokenization
function cleanUpTokenization(text) {
  const pairs = [[" .", "."], [" ?", "?"], [" !", "!"], [" ,", ","], [" ' ", "'"], [" n't", "n't"], [" 'm", "'m"], [" 's", "'s"], [" 've", "'ve"], [" 're", "'re"]];
  for (const [a, b] of pairs) text = text.replaceAll(a, b);
  return text;
}

// Python's str.strip() strips what str.isspace() calls space: JS's \s less U+FEFF, plus \x1c-\x1f, \x85
const PY_SPACE = "[\\t\\n\\v\\f\\r \\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]";
const PY_STRIP = new RegExp(`^${PY_SPACE}+|${PY_SPACE}+$`, "g");

function pythonStrip(text) {
  return text.replace(PY_STRIP, "");
}

// ------------------------------------------------------------------------------ preprocessing

/** RGB pixels { data: Uint8Array [H * W * 3], width, height } of an image-like or a Blob. Alpha is
 *  dropped as Pillow's convert("RGB") does (for fully opaque images the values are exact). */
export async function rgbPixels(image) {
  let source = image;
  if (typeof Blob !== "undefined" && image instanceof Blob) {
    source = await createImageBitmap(image, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } else if (typeof HTMLImageElement !== "undefined" && image instanceof HTMLImageElement) {
    if (!image.complete) await image.decode();
  }
  let rgba, width, height;
  if (typeof ImageData !== "undefined" && source instanceof ImageData) {
    ({ data: rgba, width, height } = source);
  } else {
    width = source.naturalWidth || source.videoWidth || source.width;
    height = source.naturalHeight || source.videoHeight || source.height;
    const canvas = new OffscreenCanvas(width, height);
    const context = canvas.getContext("2d", { colorSpace: "srgb", willReadFrequently: true });
    context.drawImage(source, 0, 0);
    rgba = context.getImageData(0, 0, width, height, { colorSpace: "srgb" }).data;
  }
  if (source !== image) source.close?.();
  const data = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < data.length; i += 3, j += 4) {
    data[i] = rgba[j];
    data[i + 1] = rgba[j + 1];
    data[i + 2] = rgba[j + 2];
  }
  return { data, width, height };
}

/** RGB pixels -> Float32Array [3, H, W] as vlmkit.runtime.onnx.preprocess_images makes them. */
export function preprocess(image, spec) {
  let { data, width, height } = image;
  if (spec.resize) {
    const [h, w] = resizeSize(width, height, spec.resize.size);
    if (h !== height || w !== width) {
      data = resizeUint8(data, height, width, h, w, spec.resize);
      [height, width] = [h, w];
    }
  }
  if (spec.center_crop) {
    const c = spec.center_crop;
    ({ data, width, height } = centerCrop(data, height, width, c.height, c.width, c.rounding || "floor"));
  }
  const [wantH, wantW] = spec.input_size;
  if (height !== wantH || width !== wantW) {
    throw new Error(`vlmkit: preprocessing made ${height}x${width} images but the vision graph takes ${wantH}x${wantW}`);
  }
  const f = Math.fround;
  const rescale = f(spec.rescale_factor);
  const mean = spec.mean.map(f);
  const std = spec.std.map(f);
  const out = new Float32Array(3 * height * width);
  const plane = height * width;
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      // float32 at every step, as numpy computes (pixels.astype(float32) * rescale - mean) / std
      out[c * plane + p] = f(f(f(data[p * 3 + c] * rescale) - mean[c]) / std[c]);
    }
  }
  return out;
}

function resizeSize(width, height, size) {
  if ("shortest_edge" in size) {
    const portrait = width <= height;
    const [short, long] = portrait ? [width, height] : [height, width];
    const newShort = size.shortest_edge;
    const newLong = Math.trunc((newShort * long) / short);
    return portrait ? [newLong, newShort] : [newShort, newLong];
  }
  return [size.height, size.width];
}

function centerCrop(data, h, w, height, width, rounding) {
  if (height > h || width > w) {
    // pad with zeros first, as transformers and torchvision do
    const H = Math.max(h, height);
    const W = Math.max(w, width);
    const top = Math.floor(Math.max(height - h, 0) / 2);
    const left = Math.floor(Math.max(width - w, 0) / 2);
    const padded = new Uint8Array(H * W * 3);
    for (let y = 0; y < h; y++) padded.set(data.subarray(y * w * 3, (y + 1) * w * 3), ((top + y) * W + left) * 3);
    [data, h, w] = [padded, H, W];
  }
  const cut = rounding === "floor" ? Math.trunc : roundHalfEven;
  const top = cut((h - height) / 2);
  const left = cut((w - width) / 2);
  const out = new Uint8Array(height * width * 3);
  for (let y = 0; y < height; y++) {
    const from = ((top + y) * w + left) * 3;
    out.set(data.subarray(from, from + width * 3), y * width * 3);
  }
  return { data: out, width, height };
}

function roundHalfEven(v) {
  const r = Math.round(v);
  return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// Separable resampling of uint8 RGB, horizontal pass first, uint8 between passes: Pillow's
// ImagingResample ("pil": 22 fraction bits) or ATen's antialiased uint8 kernel ("torchvision":
// as many fraction bits as fit an int16), with the same float64 filter weights as each.

const PIL_FILTERS = {
  bilinear: [1.0, (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; }],
  bicubic: [2.0, (x) => {
    const a = -0.5;
    x = Math.abs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
  }],
  box: [0.5, (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0)],
  hamming: [1.0, (x) => {
    x = Math.abs(x);
    if (x === 0.0) return 1.0;
    if (x >= 1.0) return 0.0;
    x *= Math.PI;
    return (Math.sin(x) / x) * (Math.fround(0.54) + Math.fround(0.46) * Math.cos(x));
  }],
  lanczos: [3.0, (x) => (-3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0)],
};

// the numpy port's formulas (vlmkit.runtime.onnx._bilinear/_bicubic), which are ATen's
const TORCHVISION_FILTERS = {
  bilinear: [1.0, (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; }],
  bicubic: [2.0, (x) => {
    const a = -0.5;
    x = Math.abs(x);
    if (x < 1.0) return ((a + 2) * x - (a + 3)) * x * x + 1;
    if (x < 2.0) return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a;
    return 0.0;
  }],
};

function sinc(x) {
  if (x === 0.0) return 1.0;
  x *= Math.PI;
  return Math.sin(x) / x;
}

function resizeUint8(data, h, w, height, width, resize) {
  const backend = resize.backend || "pil";
  const filters = backend === "torchvision" ? TORCHVISION_FILTERS : PIL_FILTERS;
  const filter = filters[resize.resample];
  if (!filter) throw new Error(`vlmkit: resample ${resize.resample} with the ${backend} backend is not supported in the browser`);
  // Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
  // pixels as the width (the manifest says which rule the exporting Pillow followed)
  const verticalFirst = resize.pass_order === "pillow13" && h - height > 0 && h - height > (w - width) * 2;
  if (verticalFirst && h !== height) [data, h] = [resampleAxis(data, h, w, height, filter, backend, false), height];
  if (w !== width) [data, w] = [resampleAxis(data, h, w, width, filter, backend, true), width];
  if (h !== height) data = resampleAxis(data, h, w, height, filter, backend, false);
  return data;
}

function resampleAxis(data, h, w, outSize, [baseSupport, fn], backend, horizontal) {
  const inSize = horizontal ? w : h;
  const scale = inSize / outSize;
  const support = scale >= 1.0 ? baseSupport * scale : baseSupport;
  const invScale = scale >= 1.0 ? 1.0 / scale : 1.0;
  const taps = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Float64Array(outSize * taps);
  for (let i = 0; i < outSize; i++) {
    const center = scale * (i + 0.5);
    const lo = Math.max(Math.trunc(center - support + 0.5), 0);
    const n = Math.min(Math.max(Math.min(Math.trunc(center + support + 0.5), inSize) - lo, 0), taps);
    const row = weights.subarray(i * taps, i * taps + n);
    for (let j = 0; j < n; j++) row[j] = fn((j + lo - center + 0.5) * invScale);
    // Pillow sums the weights in order; numpy (the torchvision port) sums pairwise
    const total = backend === "torchvision" ? numpySum(row) : row.reduce((s, v) => s + v, 0.0);
    if (total !== 0.0) for (let j = 0; j < n; j++) row[j] /= total;
    first[i] = lo;
    count[i] = n;
  }
  const precision = backend === "torchvision" ? int16Precision(weights) : 22;
  const one = 2 ** precision;
  const kernel = new Int32Array(weights.length);
  for (let k = 0; k < weights.length; k++) {
    const s = weights[k] * one;
    kernel[k] = s < 0 ? Math.trunc(s - 0.5) : Math.trunc(s + 0.5);
  }
  const outH = horizontal ? h : outSize;
  const outW = horizontal ? outSize : w;
  const out = new Uint8Array(outH * outW * 3);
  const half = 2 ** (precision - 1);
  for (let i = 0; i < outSize; i++) {
    const lo = first[i];
    const n = count[i];
    const k = i * taps;
    const lines = horizontal ? h : w;
    for (let line = 0; line < lines; line++) {
      for (let c = 0; c < 3; c++) {
        let acc = half;
        for (let j = 0; j < n; j++) {
          const src = horizontal ? (line * w + lo + j) * 3 + c : ((lo + j) * w + line) * 3 + c;
          acc += data[src] * kernel[k + j];
        }
        const v = Math.floor(acc / one);
        out[horizontal ? (line * outW + i) * 3 + c : (i * outW + line) * 3 + c] = v < 0 ? 0 : v > 255 ? 255 : v;
      }
    }
  }
  return out;
}

function int16Precision(weights) {
  let max = -Infinity;
  for (const v of weights) if (v > max) max = v;
  let precision = 0;
  while (precision < 22 && Math.trunc(0.5 + max * 2 ** (precision + 1)) < 2 ** 15) precision += 1;
  return precision;
}

// numpy's pairwise summation of float64 (what ndarray.sum does for a contiguous row)
function numpySum(a, start = 0, n = a.length) {
  if (n < 8) {
    let s = -0.0;
    for (let i = 0; i < n; i++) s += a[start + i];
    return s;
  }
  if (n <= 128) {
    const r = new Float64Array(8);
    for (let j = 0; j < 8; j++) r[j] = a[start + j];
    let i = 8;
    for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] += a[start + i + j];
    let s = (r[0] + r[1] + (r[2] + r[3])) + (r[4] + r[5] + (r[6] + r[7]));
    for (; i < n; i++) s += a[start + i];
    return s;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return numpySum(a, start, n2) + numpySum(a, start + n2, n - n2);
}
