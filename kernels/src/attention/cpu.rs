//! Flash attention on the CPU (the Flex backend): tiles of queries × keys with an online
//! softmax, keeping only each row's log-sum-exp; the backward recomputes the scores per tile
//! (FlashAttention-2). No `[T, T]` buffer exists at any point; work is split over (batch, head)
//! and query tiles with rayon, and every tile product is a `gemm` call. Query × key tiles
//! whose segment ids cannot match (another packed document) are skipped whole.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::math::{Rows, exp_nonpositive, exp_shifted_in_place, matmul, max_of, output_buffer, with_widest_simd};

/// Query and key rows per tile.
const TILE: usize = 128;

/// Shapes and masking of one attention call over contiguous `[B, H, T, D]` buffers.
#[derive(Debug, Clone, Copy)]
pub struct FlashShape {
    pub batch: usize,
    pub heads: usize,
    pub tq: usize,
    pub tk: usize,
    pub dim: usize,
    pub causal: bool,
    pub scale: f32,
}

impl FlashShape {
    /// How many keys query `i` sees: keys `j <= i + (tk − tq)` when causal (bottom-right
    /// aligned). With more queries than keys, the first `tq − tk` queries see none: their
    /// output is 0 and so is their gradient.
    fn visible_keys(&self, i: usize) -> usize {
        if self.causal { (i + 1 + self.tk).saturating_sub(self.tq).min(self.tk) } else { self.tk }
    }

    /// Columns `c0..c0 + cols` of row `i` that are not in the future: how many, from `c0`.
    fn visible_in_tile(&self, i: usize, c0: usize, cols: usize) -> usize {
        self.visible_keys(i).saturating_sub(c0).min(cols)
    }
}

/// `[B, H, T, D]` values read one `(batch, head)` slab at a time: each slab's `T` rows of `D`
/// lie `row_stride` apart, the slabs anywhere in `data`. Views are read where they lie: the KV
/// cache's prefix (a view of a longer buffer: no copy of every cached key and value at every
/// token) and q, k, v split from the fused `[B, T, (H + 2·H_kv)·D]` projection (no copy of
/// each into a `[B, H, T, D]` buffer, in the forward and again in the backward).
#[derive(Debug, Clone, Copy)]
pub struct Heads<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub batch_stride: usize,
    pub head_stride: usize,
    pub heads: usize,
    /// Distance between consecutive rows (`D` when a slab is dense).
    pub row_stride: usize,
    /// Rows per slab.
    pub rows: usize,
    /// Head dim: the length of a row.
    pub dim: usize,
}

impl<'a> Heads<'a> {
    /// The rows of `(batch, head)` number `bh = batch · heads + head`.
    fn slab(&self, bh: usize) -> Rows<'a> {
        let start = self.offset + (bh / self.heads) * self.batch_stride + (bh % self.heads) * self.head_stride;
        Rows { data: &self.data[start..], stride: self.row_stride }.rows(0, self.rows, self.dim)
    }
}

/// The smallest and largest segment id of each `TILE` of a row of segment ids.
fn tile_ranges(segments: &[f32]) -> Vec<(f32, f32)> {
    segments.chunks(TILE).map(|c| c.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))).collect()
}

/// Whether two tiles' segment ranges overlap: tiles that do not can share no visible pair.
fn may_meet(a: (f32, f32), b: (f32, f32)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// One batch row's segment ids (`[Tq]` and `[Tk]`) and their per-tile ranges.
struct RowSegments<'a> {
    query: &'a [f32],
    key: &'a [f32],
    query_tiles: Vec<(f32, f32)>,
    key_tiles: Vec<(f32, f32)>,
}

impl<'a> RowSegments<'a> {
    fn new(query_segments: &'a [f32], key_segments: &'a [f32], b: usize, s: &FlashShape) -> Self {
        let query = &query_segments[b * s.tq..(b + 1) * s.tq];
        let key = &key_segments[b * s.tk..(b + 1) * s.tk];
        Self { query, key, query_tiles: tile_ranges(query), key_tiles: tile_ranges(key) }
    }

    /// Whether query tile starting at `r0` and key tile starting at `c0` can share a segment.
    fn tiles_meet(&self, r0: usize, c0: usize) -> bool {
        may_meet(self.query_tiles[r0 / TILE], self.key_tiles[c0 / TILE])
    }
}

/// Forward: returns `(output [B,H,Tq,D], lse [B,H,Tq])`. Query `i` sees key `j` only where
/// `query_segments [B, Tq]` and `key_segments [B, Tk]` agree. A query row that sees no key
/// gets output 0 and log-sum-exp −∞.
pub fn flash_forward(q: Heads, k: Heads, v: Heads, query_segments: &[f32], key_segments: &[f32], s: FlashShape) -> (Vec<f32>, Vec<f32>) {
    let FlashShape { batch, heads, tq, dim, .. } = s;
    // Every tile writes its rows (poisoned in debug builds).
    let mut out = output_buffer(batch * heads * tq * dim);
    let mut lse = output_buffer(batch * heads * tq);
    // Per (batch, head), then per query tile: each task writes its own disjoint rows.
    out.par_chunks_mut(tq * dim).zip(lse.par_chunks_mut(tq)).enumerate().for_each(|(bh, (out_head, lse_head))| {
        let segments = RowSegments::new(query_segments, key_segments, bh / heads, &s);
        let (q, k, v) = (q.slab(bh), k.slab(bh), v.slab(bh));
        out_head.par_chunks_mut(TILE * dim).zip(lse_head.par_chunks_mut(TILE)).enumerate().for_each(|(t, (out_tile, lse_tile))| {
            let r0 = t * TILE;
            let rows = lse_tile.len();
            let q_tile = q.rows(r0, rows, dim);
            with_widest_simd(#[inline(always)] || forward_tile(q_tile, k, v, &segments, r0, s, out_tile, lse_tile));
        });
    });
    (out, lse)
}

/// One tile of queries (starting at query `r0`) against all visible keys of one head; writes
/// the tile's output rows and log-sum-exps.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_tile(q: Rows, k: Rows, v: Rows, segments: &RowSegments, r0: usize, s: FlashShape, out: &mut [f32], lse: &mut [f32]) {
    let dim = s.dim;
    let rows = lse.len();
    let mut acc = vec![0f32; rows * dim];
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0f32; rows];
    let mut scores = vec![0f32; rows * TILE];
    // The tile's last row sees the most keys.
    for c0 in (0..s.visible_keys(r0 + rows - 1)).step_by(TILE) {
        if !segments.tiles_meet(r0, c0) {
            continue; // every score of the tile would be masked
        }
        let cols = TILE.min(s.tk - c0);
        matmul(&mut scores, q, k.rows(c0, cols, dim), (rows, cols, dim), false, true, false, Parallelism::None);
        let key_segments = &segments.key[c0..c0 + cols];
        for r in 0..rows {
            let row = &mut scores[r * cols..(r + 1) * cols];
            let visible = s.visible_in_tile(r0 + r, c0, cols);
            let own = segments.query[r0 + r];
            for (c, x) in row.iter_mut().enumerate() {
                *x = if c >= visible || key_segments[c] != own { f32::NEG_INFINITY } else { *x * s.scale };
            }
            let new_max = max[r].max(max_of(row));
            if new_max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let correction = exp_nonpositive(max[r] - new_max);
            let row_sum = exp_shifted_in_place(row, new_max);
            sum[r] = sum[r] * correction + row_sum;
            max[r] = new_max;
            acc[r * dim..(r + 1) * dim].iter_mut().for_each(|a| *a *= correction);
        }
        // acc += P · V_tile
        matmul(&mut acc, &scores, v.rows(c0, cols, dim), (rows, dim, cols), false, false, true, Parallelism::None);
    }
    for r in 0..rows {
        // A row that saw no key keeps its zero accumulator.
        let inv = if sum[r] > 0.0 { 1.0 / sum[r] } else { 0.0 };
        for (o, a) in out[r * dim..(r + 1) * dim].iter_mut().zip(&acc[r * dim..(r + 1) * dim]) {
            *o = a * inv;
        }
        lse[r] = if sum[r] > 0.0 { max[r] + sum[r].ln() } else { f32::NEG_INFINITY };
    }
}

/// Backward: `(dq, dk, dv)` from the forward's inputs, output, log-sum-exp and `d_out`.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
    q: Heads,
    k: Heads,
    v: Heads,
    query_segments: &[f32],
    key_segments: &[f32],
    out: Heads,
    lse: &[f32],
    d_out: Heads,
    s: FlashShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let FlashShape { heads, tq, tk, dim, .. } = s;
    // Gradient accumulators, one disjoint slice of each per (batch, head).
    let (bh_count, tk_len) = (s.batch * heads, tk * dim);
    let (mut dq, mut dk, mut dv) = (vec![0f32; bh_count * tq * dim], vec![0f32; bh_count * tk_len], vec![0f32; bh_count * tk_len]);
    dq.par_chunks_mut(tq * dim)
        .zip(dk.par_chunks_mut(tk * dim))
        .zip(dv.par_chunks_mut(tk * dim))
        .enumerate()
        .for_each(|(bh, ((dq, dk), dv))| {
            let inputs = HeadInputs {
                q: q.slab(bh),
                k: k.slab(bh),
                v: v.slab(bh),
                segments: RowSegments::new(query_segments, key_segments, bh / heads, &s),
                out: out.slab(bh),
                lse: &lse[bh * tq..(bh + 1) * tq],
                d_out: d_out.slab(bh),
            };
            with_widest_simd(#[inline(always)] || backward_head(&inputs, s, dq, dk, dv));
        });
    (dq, dk, dv)
}

/// One head's slices of the backward's inputs.
struct HeadInputs<'a> {
    q: Rows<'a>,
    k: Rows<'a>,
    v: Rows<'a>,
    segments: RowSegments<'a>,
    out: Rows<'a>,
    lse: &'a [f32],
    d_out: Rows<'a>,
}

/// One head: for each key tile, every query tile that sees it recomputes `P = exp(S − lse)` and
/// adds its share to dV, dK (this tile) and dQ (that query tile).
#[inline(always)]
fn backward_head(inputs: &HeadInputs, s: FlashShape, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    let HeadInputs { q, k, v, ref segments, out, lse, d_out } = *inputs;
    let FlashShape { tq, tk, dim, scale, .. } = s;
    // D_i = rowsum(dO ∘ O).
    let delta: Vec<f32> = (0..tq).map(|i| d_out.rows(i, 1, dim).data.iter().zip(out.rows(i, 1, dim).data).map(|(g, o)| g * o).sum()).collect();
    let mut p = vec![0f32; TILE * TILE];
    let mut dp = vec![0f32; TILE * TILE];
    for c0 in (0..tk).step_by(TILE) {
        let cols = TILE.min(tk - c0);
        let (k_tile, v_tile) = (k.rows(c0, cols, dim), v.rows(c0, cols, dim));
        // The first query that can see key c0.
        let first_query = if s.causal { (c0 + tq).saturating_sub(tk) } else { 0 };
        for r0 in (first_query / TILE * TILE..tq).step_by(TILE) {
            if !segments.tiles_meet(r0, c0) {
                continue; // P is zero on the whole tile
            }
            let rows = TILE.min(tq - r0);
            let q_tile = q.rows(r0, rows, dim);
            let do_tile = d_out.rows(r0, rows, dim);
            matmul(&mut p, q_tile, k_tile, (rows, cols, dim), false, true, false, Parallelism::None);
            let key_segments = &segments.key[c0..c0 + cols];
            for r in 0..rows {
                let l = lse[r0 + r];
                let visible = if l == f32::NEG_INFINITY { 0 } else { s.visible_in_tile(r0 + r, c0, cols) };
                let own = segments.query[r0 + r];
                for (c, x) in p[r * cols..(r + 1) * cols].iter_mut().enumerate() {
                    *x = if c >= visible || key_segments[c] != own { 0.0 } else { exp_nonpositive(*x * scale - l) };
                }
            }
            // dV_tile += Pᵀ · dO
            matmul(&mut dv[c0 * dim..(c0 + cols) * dim], &p, do_tile, (cols, dim, rows), true, false, true, Parallelism::None);
            // dP = dO · V_tileᵀ ; dS = P ∘ (dP − D) · scale
            matmul(&mut dp, do_tile, v_tile, (rows, cols, dim), false, true, false, Parallelism::None);
            for r in 0..rows {
                let d = delta[r0 + r];
                for c in 0..cols {
                    dp[r * cols + c] = p[r * cols + c] * (dp[r * cols + c] - d) * scale;
                }
            }
            // dK_tile += dSᵀ · Q ; dQ_tile += dS · K_tile
            matmul(&mut dk[c0 * dim..(c0 + cols) * dim], &dp, q_tile, (cols, dim, rows), true, false, true, Parallelism::None);
            matmul(&mut dq[r0 * dim..(r0 + rows) * dim], &dp, k_tile, (rows, dim, cols), false, false, true, Parallelism::None);
        }
    }
}

mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::{FlashShape, Heads, flash_backward, flash_forward};
    use crate::attention::FlashAttentionBackend;

    use crate::flex_tensors::{contiguous_f32 as contiguous, f32_values as values};

    /// Where each `(batch, head)` slab of a `[B, H, T, D]` tensor starts and how far apart its
    /// rows lie, when each row's `D` values are contiguous and rows do not overlap:
    /// `(offset, batch stride, head stride, row stride)`.
    fn slab_layout(t: &FlexTensor) -> Option<(usize, usize, usize, usize)> {
        let layout = t.layout();
        let (shape, st) = (layout.shape(), layout.strides());
        let dim = shape[3] as isize;
        let row_stride = if shape[2] <= 1 { dim } else { st[2] };
        let rows_readable = (st[3] == 1 || shape[3] <= 1) && row_stride >= dim;
        (rows_readable && st[0] >= 0 && st[1] >= 0 && t.dtype() == burn::tensor::DType::F32)
            .then(|| (layout.start_offset(), st[0] as usize, st[1] as usize, row_stride as usize))
    }

    /// q, k or v as it lies when its slabs can be read in place, else a row-major copy.
    fn readable(t: &FlexTensor) -> FlexTensor {
        if slab_layout(t).is_some() { t.clone() } else { contiguous(t) }
    }

    /// The slabs of a tensor [`readable`] returned.
    fn heads(t: &FlexTensor) -> Heads<'_> {
        let (offset, batch_stride, head_stride, row_stride) = slab_layout(t).expect("readable layout");
        let shape = t.layout().shape();
        Heads { data: t.storage::<f32>(), offset, batch_stride, head_stride, heads: shape[1], row_stride, rows: shape[2], dim: shape[3] }
    }

    fn shape(q: &FlexTensor, k: &FlexTensor, causal: bool, scale: f32) -> FlashShape {
        let qs = q.layout().shape();
        let ks = k.layout().shape();
        FlashShape { batch: qs[0], heads: qs[1], tq: qs[2], tk: ks[2], dim: qs[3], causal, scale }
    }

    fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    impl FlashAttentionBackend for Flex {
        fn flash_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            query_segments: FloatTensor<Self>,
            key_segments: FloatTensor<Self>,
            causal: bool,
            scale: f32,
        ) -> FloatTensor<Self> {
            Self::flash_attention_forward(q, k, v, query_segments, key_segments, causal, scale).0
        }

        fn flash_attention_forward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            query_segments: FloatTensor<Self>,
            key_segments: FloatTensor<Self>,
            causal: bool,
            scale: f32,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let s = shape(&q, &k, causal, scale);
            let [q, k, v] = [&q, &k, &v].map(readable);
            let [qs, ks] = [&query_segments, &key_segments].map(contiguous);
            let (out, lse) = flash_forward(heads(&q), heads(&k), heads(&v), values(&qs), values(&ks), s);
            (tensor(out, vec![s.batch, s.heads, s.tq, s.dim]), tensor(lse, vec![s.batch, s.heads, s.tq]))
        }

        fn flash_attention_backward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            query_segments: FloatTensor<Self>,
            key_segments: FloatTensor<Self>,
            out: FloatTensor<Self>,
            lse: FloatTensor<Self>,
            d_out: FloatTensor<Self>,
            causal: bool,
            scale: f32,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let s = shape(&q, &k, causal, scale);
            // d_out is normally a view too: the gradient of the model's `[B, T, H·D]` output
            // seen as `[B, H, T, D]`.
            let [q, k, v, out, d_out] = [&q, &k, &v, &out, &d_out].map(readable);
            let [qs, ks, lse] = [&query_segments, &key_segments, &lse].map(contiguous);
            let (dq, dk, dv) = flash_backward(
                heads(&q),
                heads(&k),
                heads(&v),
                values(&qs),
                values(&ks),
                heads(&out),
                values(&lse),
                heads(&d_out),
                s,
            );
            let (qs, ks) = (vec![s.batch, s.heads, s.tq, s.dim], vec![s.batch, s.heads, s.tk, s.dim]);
            (tensor(dq, qs), tensor(dk, ks.clone()), tensor(dv, ks))
        }
    }
}
