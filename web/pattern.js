// The selected-keys picture of one head, shared by the demo and the model page: query
// blocks (rows) × key bins (columns), each cell the fraction of its causal pairs the
// method computed (web/src/pattern.rs builds it).

// Cell colour: masked (no causal pair) grey; otherwise from skipped (pink) to computed
// (blue) by the computed fraction; exactly computed cells are pure #2f6fe4.
export function cellColor(v) {
  if (v < 0) return "#f1f3f5";
  if (v >= 1) return "#2f6fe4";
  const mix = (a, b) => Math.round(a + (b - a) * v);
  return `rgb(${mix(0xf2, 0x2f)},${mix(0xb8, 0x6f)},${mix(0xb5, 0xe4)})`;
}

// Paints pattern `p` on canvas `cv`; false (a 1 × 1 canvas) when there is none.
export function paintPattern(cv, p) {
  const g = cv.getContext("2d");
  if (!p) {
    cv.width = 1;
    cv.height = 1;
    return false;
  }
  // Columns are keys (or bins of keys); rows are query blocks, drawn tall enough that
  // the picture is roughly square.
  const cw = Math.max(1, Math.floor(512 / p.k_bins));
  const rh = Math.max(1, Math.floor((cw * p.k_bins) / p.q_blocks));
  cv.width = cw * p.k_bins;
  cv.height = rh * p.q_blocks;
  for (let r = 0; r < p.q_blocks; r++) {
    for (let c = 0; c < p.k_bins; c++) {
      g.fillStyle = cellColor(p.cells[r * p.k_bins + c]);
      g.fillRect(c * cw, r * rh, cw, rh);
    }
  }
  return true;
}

export function patternCaption(p) {
  return `head ${p.head}: ${p.q_blocks} query blocks of ${p.block_q} rows × ${p.k_bins} columns of ${p.key_bin} key(s); ` +
    `${(100 * p.head_density).toFixed(1)}% of this head's causal pairs computed. Stripes are single columns.`;
}
