// The builtins of a compute entry point as one parameter, `fn k(me: Invocation)`:
// `me.id` (workgroup id), `me.lid` (thread index in the workgroup); `InvocationN` adds
// `me.count` (the grid, for grids folded over two axes: `flat_id`). The matrix-unit
// kernels' `InvocationSub` (with the subgroup index and count) is in common/coop.wgsl:
// browsers reject a subgroup builtin in a module without the subgroups extension, even
// in a struct nothing uses.

struct Invocation {
    @builtin(workgroup_id) id: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

struct InvocationN {
    @builtin(workgroup_id) id: vec3<u32>,
    @builtin(num_workgroups) count: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

// The workgroup's index in a grid folded over x and y (more workgroups than one axis
// holds).
fn flat_id(me: InvocationN) -> u32 {
    return me.id.x + me.id.y * me.count.x;
}
