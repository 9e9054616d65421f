// GGUF weight matrices `[rows, cols]` read in place from the file's blocks (the CPU
// twin is src/quant/ggml.rs): the tensor's bytes exactly as the file stores them (rows
// one after the other, each `cols / BW` blocks of BB bytes; ggml's block_* structs) in
// an `array<u32>` binding named `w` that the kernel declares, padded by one word so that
// four bytes read at any offset stay inside.
//
// `ggml_load4(row, col, cols)`: the values at `col .. col + 3` of a row in f32
// (`col % 4 == 0`, so the four share one block, sub-block and scale).
// One format flag: GGML_F32, GGML_F16, GGML_BF16, GGML_Q4_0, GGML_Q4_1, GGML_Q5_0,
// GGML_Q8_0, GGML_Q4_K, GGML_Q6_K. Without the shader-f16 feature: halves are read with
// unpack2x16float, bytes with shifts.

#ifdef GGML
// Four bytes from byte offset `b` (any alignment), little endian.
fn gbytes(b: u32) -> u32 {
    let i = b >> 2u;
    let s = (b & 3u) * 8u;
    if (s == 0u) {
        return w[i];
    }
    return (w[i] >> s) | (w[i + 1u] << (32u - s));
}

// The f16 at an even byte offset.
fn gf16(b: u32) -> f32 {
    return unpack2x16float(w[b >> 2u] >> ((b & 2u) * 8u)).x;
}

// Nibbles of the four bytes of `word`, each shifted right by `shift` (0: low, 4: high).
fn gnib4(word: u32, shift: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(word) >> (vec4<u32>(0u, 8u, 16u, 24u) + vec4<u32>(shift))) & vec4<u32>(15u));
}

// The four bytes of `word` as signed values.
fn gi8x4(word: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(word)) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

fn ggml_load4(row: u32, col: u32, cols: u32) -> vec4<f32> {
#ifdef GGML_F32
    let i = row * cols + col;
    return vec4<f32>(bitcast<f32>(w[i]), bitcast<f32>(w[i + 1u]), bitcast<f32>(w[i + 2u]), bitcast<f32>(w[i + 3u]));
#endif
#ifdef GGML_F16
    let i = (row * cols + col) / 2u;
    return vec4<f32>(unpack2x16float(w[i]), unpack2x16float(w[i + 1u]));
#endif
#ifdef GGML_BF16
    let i = (row * cols + col) / 2u;
    let a = w[i];
    let b = w[i + 1u];
    return vec4<f32>(bitcast<f32>(a << 16u), bitcast<f32>(a & 0xffff0000u), bitcast<f32>(b << 16u), bitcast<f32>(b & 0xffff0000u));
#endif
#ifdef GGML_Q4_0
    // block_q4_0: d (f16), qs[16]: element j low nibble, j + 16 high nibble of byte j.
    let o = col % 32u;
    let base = (row * (cols / 32u) + col / 32u) * 18u;
    return (gnib4(gbytes(base + 2u + o % 16u), (o / 16u) * 4u) - vec4<f32>(8.0)) * gf16(base);
#endif
#ifdef GGML_Q4_1
    // block_q4_1: d, m (f16), qs[16]; value q·d + m.
    let o = col % 32u;
    let base = (row * (cols / 32u) + col / 32u) * 20u;
    return gnib4(gbytes(base + 4u + o % 16u), (o / 16u) * 4u) * gf16(base) + vec4<f32>(gf16(base + 2u));
#endif
#ifdef GGML_Q5_0
    // block_q5_0: d (f16), qh (32 high bits, bit j for element j), qs[16] as Q4_0.
    let o = col % 32u;
    let base = (row * (cols / 32u) + col / 32u) * 22u;
    let hi = (vec4<u32>(gbytes(base + 2u)) >> (vec4<u32>(0u, 1u, 2u, 3u) + vec4<u32>(o))) & vec4<u32>(1u);
    let q = gnib4(gbytes(base + 6u + o % 16u), (o / 16u) * 4u) + vec4<f32>(hi) * 16.0;
    return (q - vec4<f32>(16.0)) * gf16(base);
#endif
#ifdef GGML_Q8_0
    // block_q8_0: d (f16), qs[32] signed.
    let o = col % 32u;
    let base = (row * (cols / 32u) + col / 32u) * 34u;
    return gi8x4(gbytes(base + 2u + o)) * gf16(base);
#endif
#ifdef GGML_Q4_K
    // block_q4_K (256 values): d, dmin (f16), scales[12] (6-bit scale and min of 8
    // sub-blocks of 32), qs[128]: 64-value chunk c holds sub-blocks 2c (low nibbles)
    // and 2c + 1 (high nibbles) of bytes 32c .. 32c + 31.
    let o = col % 256u;
    let base = (row * (cols / 256u) + col / 256u) * 144u;
    let c = o / 64u;
    let l = o % 64u;
    let j = 2u * c + l / 32u;
    let s = (base + 4u) / 4u;  // blocks are 16-byte aligned: the scales start on a word
    let sc = array<u32, 3>(w[s], w[s + 1u], w[s + 2u]);
    var scale: u32;
    var mn: u32;
    if (j < 4u) {
        scale = (sc[0] >> (8u * j)) & 63u;
        mn = (sc[1] >> (8u * j)) & 63u;
    } else {
        let b8 = (sc[2] >> (8u * (j - 4u))) & 255u;
        scale = (b8 & 15u) | (((sc[0] >> (8u * (j - 4u) + 6u)) & 3u) << 4u);
        mn = (b8 >> 4u) | (((sc[1] >> (8u * (j - 4u) + 6u)) & 3u) << 4u);
    }
    let q = gnib4(w[(base + 16u + 32u * c + l % 32u) / 4u], (l / 32u) * 4u);
    return q * (gf16(base) * f32(scale)) - vec4<f32>(gf16(base + 2u) * f32(mn));
#endif
#ifdef GGML_Q6_K
    // block_q6_K (256 values): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16]
    // (signed, one per 16 values), d (f16). Half n (128 values), quarter qd (32): low
    // bits from ql[64n + l + 32 (qd & 1)] (high nibble when qd ≥ 2), high bits
    // 2qd.. of qh[32n + l], scale 8n + l / 16 + 2qd; value d·scale·(q − 32).
    let o = col % 256u;
    let base = (row * (cols / 256u) + col / 256u) * 210u;
    let n = o / 128u;
    let qd = (o % 128u) / 32u;
    let l = o % 32u;
    let lo = gnib4(gbytes(base + 64u * n + l + 32u * (qd & 1u)), 4u * (qd / 2u));
    let hi = (vec4<u32>(gbytes(base + 128u + 32u * n + l)) >> (vec4<u32>(0u, 8u, 16u, 24u) + vec4<u32>(2u * qd))) & vec4<u32>(3u);
    let q = lo + vec4<f32>(hi) * 16.0 - vec4<f32>(32.0);
    let scale = f32((bitcast<i32>(gbytes(base + 192u + 8u * n + l / 16u + 2u * qd)) << 24u) >> 24u);
    return q * (gf16(base + 208u) * scale);
#endif
}
#endif
