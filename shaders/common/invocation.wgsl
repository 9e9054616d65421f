// The builtins of a compute entry point as one parameter, `fn k(me: Invocation)`:
// `me.id` (workgroup id), `me.lid` (thread index in the workgroup); `InvocationN` adds
// `me.count` (the grid, for grids folded over two axes: `flat_id`), `InvocationSub` the
// subgroup index and count (`me.sid`, `me.nsg`: the matrix-unit kernels).

struct Invocation {
    @builtin(workgroup_id) id: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

struct InvocationN {
    @builtin(workgroup_id) id: vec3<u32>,
    @builtin(num_workgroups) count: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

struct InvocationSub {
    @builtin(workgroup_id) id: vec3<u32>,
    @builtin(num_workgroups) count: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sid: u32,
    @builtin(num_subgroups) nsg: u32,
}

// The workgroup's index in a grid folded over x and y (more workgroups than one axis
// holds).
fn flat_id(me: InvocationN) -> u32 {
    return me.id.x + me.id.y * me.count.x;
}
