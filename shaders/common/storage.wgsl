// Tensor storage access, four elements at a time.
//
// f32 tensors bind as array<vec4<f32>>. f16 tensors bind as array<u32> (two halves per
// word) and are converted with unpack2x16float / pack2x16float, which every WGSL
// implementation has: f16 storage works without the `shader-f16` feature (browsers,
// GL). Element indices passed here are always multiples of 4 (head_dim % 4 == 0 and
// binding bases are multiples of 4 elements).

#ifdef STORE_F16
alias Store4 = vec2<u32>;
fn decode4(w: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}
fn encode4(v: vec4<f32>) -> vec2<u32> {
    return vec2<u32>(pack2x16float(v.xy), pack2x16float(v.zw));
}
#else
alias Store4 = vec4<f32>;
fn decode4(w: vec4<f32>) -> vec4<f32> {
    return w;
}
fn encode4(v: vec4<f32>) -> vec4<f32> {
    return v;
}
#endif
