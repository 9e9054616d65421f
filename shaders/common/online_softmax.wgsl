// Online softmax bookkeeping shared by the attention kernels.
//
// A row's state is (m, l, acc): the running maximum score, the running sum of
// exp(score - m), and the running sum of exp(score - m) * v. Scores that are masked out
// are NEG_BIG and contribute exactly 0, so a row that has seen no key yet keeps
// m = NEG_BIG, l = 0, acc = 0 and can be continued by any later kernel.
//
// Inside a kernel scores are in log2 units (q.k * scale * log2(e)) so that the weights
// are exp2, the hardware's native exponential; m crosses kernel boundaries (the ML
// buffer) in natural-log units: use m_to_natural / m_from_natural there.

const NEG_BIG: f32 = -1.0e30;
const LOG2E: f32 = 1.4426950408889634;

// True for a score that came from a real (unmasked) key.
fn is_live(s: f32) -> bool {
    return s > 0.5 * NEG_BIG;
}

// 2^(s - m) for live scores (log2 units), 0 for masked ones.
fn softmax_weight(s: f32, m: f32) -> f32 {
    return select(0.0, exp2(s - m), is_live(s));
}

// Factor that rescales old (l, acc) when the running maximum moves from m_old to m_new.
fn rescale_factor(m_old: f32, m_new: f32) -> f32 {
    return exp2(m_old - m_new);
}

// Row maximum from the ML buffer (natural log) to kernel units (log2), and back.
fn m_from_natural(m: f32) -> f32 {
    return select(NEG_BIG, m * LOG2E, is_live(m));
}
fn m_to_natural(m: f32) -> f32 {
    return select(NEG_BIG, m / LOG2E, is_live(m));
}
