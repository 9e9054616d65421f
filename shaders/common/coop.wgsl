// The cooperative-matrix types of the matrix-unit kernels: square f16 operand tiles and
// f32 accumulators, T × T with T = 16 (TILE16: NVIDIA, AMD, Intel) or 8 (Apple, lavapipe).
// Cooperative matrices are subgroup-scoped and have no per-element access: the kernels
// load and store them through workgroup memory, in subgroup-uniform control flow.

enable f16;
enable wgpu_cooperative_matrix;

#ifdef TILE16
alias MatA = coop_mat16x16<f16, A>;
alias MatB = coop_mat16x16<f16, B>;
alias MatC = coop_mat16x16<f32, C>;
const T: u32 = 16u;
#else
alias MatA = coop_mat8x8<f16, A>;
alias MatB = coop_mat8x8<f16, B>;
alias MatC = coop_mat8x8<f32, C>;
const T: u32 = 8u;
#endif
