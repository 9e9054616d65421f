// The workgroup builtins of a compute entry point as one parameter: `Workgroup` (`wg.id`,
// the workgroup id) or `WorkgroupN` (`wg.count` too: the grid, for grids folded over two
// axes, see `flat_id`). Only workgroup-uniform builtins go in these structs: a browser
// takes a struct parameter holding the thread index as non-uniform as a whole, and then
// a loop bound from `wg.id` as non-uniform flow around barriers. The thread index is its
// own parameter: `fn k(wg: Workgroup, @builtin(local_invocation_index) lid: u32)`.
// (The matrix-unit kernels' `InvocationSub` is in common/coop.wgsl: browsers reject a
// subgroup builtin in a module without the subgroups extension, even in an unused
// struct.)

struct Workgroup {
    @builtin(workgroup_id) id: vec3<u32>,
}

struct WorkgroupN {
    @builtin(workgroup_id) id: vec3<u32>,
    @builtin(num_workgroups) count: vec3<u32>,
}

// The workgroup's index in a grid folded over x and y (more workgroups than one axis
// holds).
fn flat_id(wg: WorkgroupN) -> u32 {
    return wg.id.x + wg.id.y * wg.count.x;
}
