// Weight matrices `[rows, cols]` (row-major, cols a multiple of 32) stored in an
// `array<u32>`, read four consecutive elements at a time (`col` a multiple of 4).
//
// WEIGHTS_F16: IEEE halves, two per u32 (unpack2x16float: no `shader-f16` needed).
// WEIGHTS_Q4_0: ggml's Q4_0 repacked u32-aligned. The buffer holds first the nibbles of
// every 32-weight block, 4 words per block (the block's 16 `qs` bytes verbatim, little
// endian: element j is the low nibble and element j+16 the high nibble of byte j), then,
// from word `scale_base`, the f16 scales `d`, two blocks per word (even block in the low
// half). Blocks are numbered row-major: `row * cols / 32 + col / 32`. Value: `(q - 8) * d`.
//
// Usage for a binding `B`: `let l = wloc(row, col, cols, sb); let v = wdecode(B[l.w0], B[l.w1], l);`

struct WLoc {
    w0: u32,
    w1: u32,
    shift: u32,
    hi: u32,
}

#ifdef WEIGHTS_Q4_0
fn wloc(row: u32, col: u32, cols: u32, scale_base: u32) -> WLoc {
    let blk = row * (cols / 32u) + col / 32u;
    let o = col % 32u;
    var l: WLoc;
    l.w0 = blk * 4u + (o % 16u) / 4u;
    l.w1 = scale_base + blk / 2u;
    l.shift = (o / 16u) * 4u;
    l.hi = blk % 2u;
    return l;
}

fn wdecode(word: u32, sword: u32, l: WLoc) -> vec4<f32> {
    let d = unpack2x16float(sword)[l.hi];
    let q = (vec4<u32>(word) >> (vec4<u32>(0u, 8u, 16u, 24u) + vec4<u32>(l.shift))) & vec4<u32>(15u);
    return (vec4<f32>(q) - vec4<f32>(8.0)) * d;
}
#else
fn wloc(row: u32, col: u32, cols: u32, scale_base: u32) -> WLoc {
    let e = row * cols + col;
    var l: WLoc;
    l.w0 = e / 2u;
    l.w1 = e / 2u + 1u;
    l.shift = 0u;
    l.hi = 0u;
    return l;
}

fn wdecode(a: u32, b: u32, l: WLoc) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(a), unpack2x16float(b));
}
#endif
