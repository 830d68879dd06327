//! Scalar building blocks shared by the fused CPU kernels.

/// `e^x` for the non-positive arguments of a softmax, branch-free so loops vectorise:
/// `2^n · e^g` with `n` the nearest integer to `x·log2 e` and `|g| ≤ ln2 / 2`, `e^g` by its
/// degree-6 Taylor polynomial (relative error < 1e-6 for x ≥ −10). `−∞` (and anything below −87) gives 0.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to an integer
    let y = (x * std::f32::consts::LOG2_E).max(-127.0);
    let shifted = y + ROUND;
    let n = shifted - ROUND;
    let g = (y - n) * std::f32::consts::LN_2;
    let p = 1.0 + g * (1.0 + g * (0.5 + g * (1.0 / 6.0 + g * (1.0 / 24.0 + g * (1.0 / 120.0 + g * (1.0 / 720.0))))));
    // 2^n through the exponent bits. `shifted` holds n in its low mantissa bits (two's
    // complement relative to ROUND's), so n + 127 is integer arithmetic on the bit pattern —
    // no float-to-int conversion, whose saturating semantics would not vectorise.
    // n = −127 gives exponent field 0, i.e. 0.0.
    let biased = shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    p * f32::from_bits(biased << 23)
}

/// The output buffer of a kernel that writes every element. Debug builds (the tests, whose
/// kernels crate keeps debug assertions) fill it with NaN, so an element a kernel forgets
/// fails the harness; release builds skip that extra pass over memory (a zeroed allocation:
/// fresh pages are zero already).
pub(crate) fn output_buffer(len: usize) -> Vec<f32> {
    if cfg!(debug_assertions) { vec![f32::NAN; len] } else { vec![0.0; len] }
}

/// Runs `f` compiled for the widest vector unit this CPU has (AVX-512, AVX2 + FMA, or the
/// baseline), picked at run time: the crate is built for baseline x86-64, so loops written for
/// auto-vectorisation only get wide vectors inside such a call. The closure must be marked
/// `#[inline(always)]` (`with_widest_simd(#[inline(always)] || …)`), and so must the functions
/// it calls: anything LLVM leaves out of line is compiled for the baseline (measured: without
/// the attribute every kernel loop ran as SSE2 code).
#[inline(always)]
pub(crate) fn with_widest_simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// Lanes of the independent accumulators in the vectorised reductions below: a strict-order
/// `f32` sum cannot be vectorised, 16 partial sums can.
const LANES: usize = 16;

/// The largest element (−∞ for an empty slice).
#[inline(always)]
pub(crate) fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    rest.iter().chain(&acc).copied().fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m })
}

/// Replaces each `x` by `e^(x − shift)` (all arguments ≤ 0: `shift` is at least the maximum)
/// and returns their sum.
#[inline(always)]
pub(crate) fn exp_shifted_in_place(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp_nonpositive(*x - shift);
            *a += *x;
        }
    }
    let mut total: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - shift);
        total += *x;
    }
    total + acc.iter().sum::<f32>()
}

/// `Σ_i f(a_i, b_i)` over two slices of one length, with independent partial sums so that it
/// vectorises (dot products, sums, centred squares).
#[inline(always)]
pub(crate) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| f(x, y)).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    tail + acc.iter().sum::<f32>()
}

/// A row-major matrix operand of [`matmul`] whose rows lie `stride` elements apart (a view of
/// a wider buffer, e.g. one head's rows inside `[B, T, H·D]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
}

impl<'a> Rows<'a> {
    /// Rows `start..start + count`, each `width` long: the slice from the first row's start to
    /// the last row's end.
    #[inline(always)]
    pub fn rows(&self, start: usize, count: usize, width: usize) -> Rows<'a> {
        debug_assert!(self.stride >= width, "rows() of a matrix without an explicit row stride");
        let first = start * self.stride;
        let end = if count == 0 { first } else { first + (count - 1) * self.stride + width };
        Rows { data: &self.data[first..end], stride: self.stride }
    }
}

impl<'a> From<&'a [f32]> for Rows<'a> {
    /// A dense matrix: the stride is set by [`matmul`] from the shape (`0` = packed).
    fn from(data: &'a [f32]) -> Self {
        Rows { data, stride: 0 }
    }
}

impl<'a> From<&'a Vec<f32>> for Rows<'a> {
    fn from(data: &'a Vec<f32>) -> Self {
        Rows { data, stride: 0 }
    }
}

/// `c[m×n] (+)= a · b` for row-major `a` (`[m×k]`, or stored `[k×m]` when `a_transposed`)
/// and `b` (`[k×n]`, or stored `[n×k]` when `b_transposed`), through `gemm`. An operand's
/// stride is the distance between its stored rows; 0 means packed (the stored row length).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<'a, 'b>(
    c: &mut [f32],
    a: impl Into<Rows<'a>>,
    b: impl Into<Rows<'b>>,
    (m, n, k): (usize, usize, usize),
    a_transposed: bool,
    b_transposed: bool,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    // Stored shape (rows, row length) of each operand.
    let (a_rows, a_width) = if a_transposed { (k, m) } else { (m, k) };
    let (b_rows, b_width) = if b_transposed { (n, k) } else { (k, n) };
    let stride = |r: &Rows, width: usize| if r.stride == 0 { width } else { r.stride };
    let (a, b) = (a.into(), b.into());
    let (lda, ldb) = (stride(&a, a_width), stride(&b, b_width));
    let extent = |rows: usize, ld: usize, width: usize| if rows == 0 || width == 0 { 0 } else { (rows - 1) * ld + width };
    assert!(lda >= a_width && ldb >= b_width, "matmul: a row stride shorter than the row");
    assert!(c.len() >= m * n && a.data.len() >= extent(a_rows, lda, a_width) && b.data.len() >= extent(b_rows, ldb, b_width));
    // Row-major strides: (column stride, row stride) of the logical operand.
    let (a_cs, a_rs) = if a_transposed { (lda as isize, 1) } else { (1, lda as isize) };
    let (b_cs, b_rs) = if b_transposed { (ldb as isize, 1) } else { (1, ldb as isize) };
    // SAFETY: the asserts above bound every index the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_exp() {
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_nonpositive(x), (x as f64).exp());
            // Relative 1e-6 where softmax weights matter; below e^-10 the rounding of
            // x · log2 e dominates and the absolute error is what counts.
            let ok = if x >= -10.0 { ((got as f64 - want) / want).abs() < 1e-6 } else { (got as f64 - want).abs() < 1e-9 };
            assert!(ok, "x={x}: {got} vs {want}");
        }
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-200.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn vectorised_reductions_match_scalar_ones() {
        for len in [0usize, 1, 5, 16, 17, 100, 1000] {
            let xs: Vec<f32> = (0..len).map(|i| ((i * 7919) % 113) as f32 * 0.1 - 5.0).collect();
            let want_max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(with_widest_simd(#[inline(always)] || max_of(&xs)), want_max, "len {len}");
            let mut ys = xs.clone();
            let sum = with_widest_simd(#[inline(always)] || exp_shifted_in_place(&mut ys, want_max));
            let want_sum: f64 = xs.iter().map(|&x| ((x - want_max) as f64).exp()).sum();
            assert!((sum as f64 - want_sum).abs() <= 1e-5 * want_sum.max(1.0), "len {len}: {sum} vs {want_sum}");
            for (y, &x) in ys.iter().zip(&xs) {
                assert!((*y as f64 - ((x - want_max) as f64).exp()).abs() < 1e-6);
            }
        }
    }
}
