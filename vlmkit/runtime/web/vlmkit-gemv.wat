;; The web decoder's matrix-vector product (vlmkit/runtime/web_decoder.py describes the format):
;;   y[n] = sum over blocks b of K/32:  (sum_{k in b} xq[k] * w[n, k]) * xs[b] * ws[n, b]
;; w: int8 [N, K] row-major; ws: float32 [N, K/32]; xq: int16 [K]; xs: float32 [K/32]; y: float32.
;; A block's products are exact in int32 (i32x4.dot_i16x8_s), then scaled and summed in float32.
;; Rows n0..n1 (a caller may split the rows between threads). K must be a multiple of 32.
;; Built with wabt: node vlmkit/runtime/web/build-gemv.mjs (writes vlmkit-gemv.wasm beside it).
(module
  (import "env" "memory" (memory 1 65536))
  (func (export "gemv")
    (param $xq i32) (param $xs i32) (param $w i32) (param $ws i32) (param $y i32)
    (param $K i32) (param $n0 i32) (param $n1 i32)
    (local $n i32) (local $b i32) (local $blocks i32) (local $wp i32) (local $xp i32) (local $sp i32)
    (local $acc v128) (local $v v128) (local $d v128)
    (local.set $blocks (i32.shr_u (local.get $K) (i32.const 5)))
    (local.set $n (local.get $n0))
    (block $rows_done (loop $rows
      (br_if $rows_done (i32.ge_u (local.get $n) (local.get $n1)))
      (local.set $acc (v128.const f32x4 0 0 0 0))
      (local.set $wp (i32.add (local.get $w) (i32.mul (local.get $n) (local.get $K))))
      (local.set $sp (i32.add (local.get $ws) (i32.shl (i32.mul (local.get $n) (local.get $blocks)) (i32.const 2))))
      (local.set $xp (local.get $xq))
      (local.set $b (i32.const 0))
      (block $blocks_done (loop $each_block
        (br_if $blocks_done (i32.ge_u (local.get $b) (local.get $blocks)))
        (local.set $v (v128.load (local.get $wp)))
        (local.set $d (i32x4.add
          (i32x4.dot_i16x8_s (i16x8.extend_low_i8x16_s (local.get $v)) (v128.load (local.get $xp)))
          (i32x4.dot_i16x8_s (i16x8.extend_high_i8x16_s (local.get $v)) (v128.load offset=16 (local.get $xp)))))
        (local.set $v (v128.load offset=16 (local.get $wp)))
        (local.set $d (i32x4.add (local.get $d) (i32x4.add
          (i32x4.dot_i16x8_s (i16x8.extend_low_i8x16_s (local.get $v)) (v128.load offset=32 (local.get $xp)))
          (i32x4.dot_i16x8_s (i16x8.extend_high_i8x16_s (local.get $v)) (v128.load offset=48 (local.get $xp))))))
        (local.set $acc (f32x4.add (local.get $acc) (f32x4.mul (f32x4.convert_i32x4_s (local.get $d))
          (f32x4.splat (f32.mul (f32.load (local.get $sp))
                                (f32.load (i32.add (local.get $xs) (i32.shl (local.get $b) (i32.const 2)))))))))
        (local.set $wp (i32.add (local.get $wp) (i32.const 32)))
        (local.set $xp (i32.add (local.get $xp) (i32.const 64)))
        (local.set $sp (i32.add (local.get $sp) (i32.const 4)))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (br $each_block)))
      (f32.store (i32.add (local.get $y) (i32.shl (local.get $n) (i32.const 2)))
        (f32.add (f32.add (f32x4.extract_lane 0 (local.get $acc)) (f32x4.extract_lane 1 (local.get $acc)))
                 (f32.add (f32x4.extract_lane 2 (local.get $acc)) (f32x4.extract_lane 3 (local.get $acc)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $rows)))))
