//! LCS similarity as a CubeCL kernel (Cube backends: CUDA, wgpu): one cube per pair `i ≤ j`
//! of a group runs the dynamic program by anti-diagonal wavefronts: the cells of a diagonal
//! are independent, so the cube's units compute them together, keeping the last three
//! diagonals in shared memory. No unit loops longer than `(|a| + |b|) · ⌈|b| / units⌉`, which
//! also keeps every loop far below the iteration cap Mesa's software Vulkan puts on shaders.
//! Integers throughout, so the result is exactly the reference's.

use burn::backend::TensorMetadata;
use burn::backend::tensor::IntTensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::calculate_cube_count_elemwise;
use burn_cubecl::cubecl::prelude::CubeDim;

use super::{LcsBackend, MAX_GPU_LENGTH};
use crate::cube_tensors::{contiguous, elem, filled};

/// Units per cube: one per column of the shorter sequence, up to this many.
const UNITS: u32 = 128;
/// Shared memory holds three diagonals of up to `L + 1` cells; `L` is rounded up to this
/// multiple so a handful of kernel variants cover all lengths.
const LENGTH_BUCKET: usize = 64;

mod kernels {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    /// Sequence `s`'s length, clamped to `0..=l` like the reference.
    #[cube]
    fn clamped_len<I: Int>(lengths: &Tensor<I>, s: usize, l: usize) -> usize {
        let raw = lengths[s];
        let mut len = 0;
        if raw > I::from_int(0) {
            len = usize::cast_from(raw);
            if len > l {
                len = l;
            }
        }
        len
    }

    /// Cube `(g, i, j)`: `out[g, i, j] = out[g, j, i] = LCS(seq_i, seq_j)` for `i ≤ j`.
    /// `M[x][y]` (LCS of the prefixes ending at `a[x]`, `b[y]`) lives at slot `y + 1` of the
    /// buffer of diagonal `x + y`; slot 0 is the empty prefix, always 0.
    #[cube(launch)]
    pub fn lcs_wavefront<I: Int>(
        tokens: &Tensor<I>,
        lengths: &Tensor<I>,
        out: &mut Tensor<I>,
        n: usize,
        l: usize,
        #[comptime] capacity: usize,
        #[define(I)] _dtype: ElemType,
    ) {
        let pair = CUBE_POS;
        let g = pair / (n * n);
        let i = (pair / n) % n;
        let j = pair % n;
        if pair >= out.len() || i > j {
            terminate!();
        }
        let (a, b) = (g * n + i, g * n + j);
        let (la, lb) = (clamped_len::<I>(lengths, a, l), clamped_len::<I>(lengths, b, l));
        let units = CUBE_DIM as usize;
        let unit = UNIT_POS as usize;
        let mut diagonals = Shared::new_slice(3 * capacity);
        let mut s = unit;
        while s < 3 * capacity {
            diagonals[s] = I::from_int(0);
            s += units;
        }
        sync_cube();
        let steps = la + lb;
        for d in 0..steps {
            if d + 1 < steps {
                let cur = (d % 3) * capacity;
                let prev = ((d + 2) % 3) * capacity;
                let prev2 = ((d + 1) % 3) * capacity;
                let mut y = unit;
                while y < lb {
                    if y <= d && d - y < la {
                        let x = d - y;
                        let left = diagonals[prev + y];
                        let mut up = I::from_int(0);
                        let mut corner = I::from_int(0);
                        if x > 0 {
                            up = diagonals[prev + y + 1];
                            corner = diagonals[prev2 + y];
                        }
                        let mut value = left;
                        if tokens[a * l + x] == tokens[b * l + y] {
                            value = corner + I::from_int(1);
                        } else if up > value {
                            value = up;
                        }
                        diagonals[cur + y + 1] = value;
                    }
                    y += units;
                }
            }
            sync_cube();
        }
        if unit == 0 {
            let mut lcs = I::from_int(0);
            if la > 0 && lb > 0 {
                lcs = diagonals[((la + lb - 2) % 3) * capacity + lb];
            }
            out[(g * n + i) * n + j] = lcs;
            out[(g * n + j) * n + i] = lcs;
        }
    }
}

impl LcsBackend for CubeBackend {
    fn lcs_similarity(tokens: IntTensor<Self>, lengths: IntTensor<Self>) -> IntTensor<Self> {
        let (tokens, lengths) = (contiguous(tokens), contiguous(lengths));
        debug_assert_eq!(tokens.dtype, lengths.dtype, "tokens and lengths share the int dtype");
        let [g, n, l] = tokens.shape().dims::<3>();
        let out = filled(&tokens, [g, n, n], tokens.dtype, -1.0); // poisoned: every pair must be written
        let pairs = g * n * n;
        if pairs == 0 {
            return out;
        }
        assert!(l <= MAX_GPU_LENGTH, "lcs_similarity on a GPU takes sequences of up to {MAX_GPU_LENGTH} tokens, got {l}");
        let capacity = (l + 1).div_ceil(LENGTH_BUCKET) * LENGTH_BUCKET;
        kernels::lcs_wavefront::launch(
            &tokens.client,
            // One cube per pair (the count may be laid out in 2D; CUBE_POS is linear).
            calculate_cube_count_elemwise(&tokens.client, pairs, CubeDim::new_1d(1)),
            CubeDim::new_1d(UNITS),
            tokens.clone().into_tensor_arg(),
            lengths.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            n,
            l,
            capacity,
            elem(&tokens),
        );
        out
    }
}
