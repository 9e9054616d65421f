// Online softmax bookkeeping shared by the attention kernels.
//
// A row's state is (m, l, acc): the running maximum score, the running sum of
// exp(score - m), and the running sum of exp(score - m) * v. Scores that are masked out
// are NEG_BIG and contribute exactly 0, so a row that has seen no key yet keeps
// m = NEG_BIG, l = 0, acc = 0 and can be continued by any later kernel.

const NEG_BIG: f32 = -1.0e30;

// True for a score that came from a real (unmasked) key.
fn is_live(s: f32) -> bool {
    return s > 0.5 * NEG_BIG;
}

// exp(s - m) for live scores, 0 for masked ones.
fn softmax_weight(s: f32, m: f32) -> f32 {
    return select(0.0, exp(s - m), is_live(s));
}

// Factor that rescales old (l, acc) when the running maximum moves from m_old to m_new.
fn rescale_factor(m_old: f32, m_new: f32) -> f32 {
    return exp(m_old - m_new);
}
