//! Bit-parallel LCS (Allison–Dix / Crochemore et al.): one bit per position of the shorter
//! sequence, `V ← (V + (V & M_y)) | (V & ¬M_y)` per symbol `y` of the longer one, carries
//! across 64-bit words; the LCS length is the number of zero bits of `V`. Tokens are renumbered
//! densely per group so each sequence's match masks are a flat table built once.

use std::collections::HashMap;

/// Match masks of one sequence over a dense alphabet: `words` u64 per symbol.
struct Masks {
    bits: Vec<u64>,
    words: usize,
    len: usize,
}

impl Masks {
    fn new(seq: &[u32], alphabet: usize) -> Self {
        let words = seq.len().div_ceil(64).max(1);
        let mut bits = vec![0u64; alphabet * words];
        for (i, &c) in seq.iter().enumerate() {
            bits[c as usize * words + i / 64] |= 1 << (i % 64);
        }
        Self { bits, words, len: seq.len() }
    }

    /// LCS length of this (the shorter) sequence with `other`.
    fn lcs(&self, other: &[u32], v: &mut Vec<u64>) -> usize {
        if self.len == 0 {
            return 0;
        }
        v.clear();
        v.resize(self.words, u64::MAX);
        for &y in other {
            let mask = &self.bits[y as usize * self.words..(y as usize + 1) * self.words];
            let mut carry = 0u64;
            for (w, &mw) in v.iter_mut().zip(mask) {
                let u = *w & mw;
                let (sum, c1) = w.overflowing_add(u);
                let (sum, c2) = sum.overflowing_add(carry);
                carry = (c1 | c2) as u64;
                *w = sum | (*w & !mw);
            }
        }
        // Bits past the length start at 1 and stay 1 (`V & ¬M` keeps every unmatched one),
        // so they add no zeros.
        v.iter().map(|w| w.count_zeros() as usize).sum()
    }
}

/// Token ids renumbered `0..alphabet` in order of appearance (mask tables are then indexed,
/// not hashed). Ids in a small range are renumbered through a lookup table.
fn dense(seqs: &[&[i64]]) -> (Vec<Vec<u32>>, usize) {
    let (lo, hi) = seqs.iter().flat_map(|s| s.iter()).fold((i64::MAX, i64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    let total: usize = seqs.iter().map(|s| s.len()).sum();
    let mut next = 0u32;
    let out = if lo <= hi && ((hi - lo) as u64) < (1 << 16).max(8 * total as u64) {
        let mut table = vec![u32::MAX; (hi - lo + 1) as usize];
        seqs.iter()
            .map(|s| {
                s.iter()
                    .map(|&t| {
                        let slot = &mut table[(t - lo) as usize];
                        if *slot == u32::MAX {
                            *slot = next;
                            next += 1;
                        }
                        *slot
                    })
                    .collect()
            })
            .collect()
    } else {
        let mut ids: HashMap<i64, u32> = HashMap::new();
        seqs.iter()
            .map(|s| {
                s.iter()
                    .map(|t| {
                        *ids.entry(*t).or_insert_with(|| {
                            next += 1;
                            next - 1
                        })
                    })
                    .collect()
            })
            .collect()
    };
    (out, (next as usize).max(1))
}

/// LCS length of one pair, bit-parallel.
pub fn lcs_length_bit_parallel(a: &[i64], b: &[i64]) -> usize {
    let (seqs, alphabet) = dense(&[a, b]);
    let (short, long) = if seqs[0].len() <= seqs[1].len() { (&seqs[0], &seqs[1]) } else { (&seqs[1], &seqs[0]) };
    Masks::new(short, alphabet).lcs(long, &mut Vec::new())
}

/// `[N, N]` LCS lengths of every pair of one group: each sequence's masks are built once.
pub fn lcs_group_bit_parallel(seqs: &[&[i64]]) -> Vec<i64> {
    let n = seqs.len();
    let (seqs, alphabet) = dense(seqs);
    let masks: Vec<Masks> = seqs.iter().map(|s| Masks::new(s, alphabet)).collect();
    let mut out = vec![-1i64; n * n];
    let mut v = Vec::new();
    for i in 0..n {
        out[i * n + i] = seqs[i].len() as i64;
        for j in i + 1..n {
            let (short, long) = if seqs[i].len() <= seqs[j].len() { (i, j) } else { (j, i) };
            let l = masks[short].lcs(&seqs[long], &mut v) as i64;
            out[i * n + j] = l;
            out[j * n + i] = l;
        }
    }
    out
}

mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::IntTensor;
    use burn::tensor::TensorData;

    use super::lcs_group_bit_parallel;
    use crate::lcs::{LcsBackend, group_sequences};

    fn ints(t: IntTensor<Flex>) -> (Vec<i64>, Vec<usize>, burn::tensor::DType) {
        let dtype = t.dtype();
        let shape = t.layout().shape().to_vec();
        (t.into_data().convert::<i64>().try_into_vec::<i64>().expect("int tensor"), shape, dtype)
    }

    impl LcsBackend for Flex {
        fn lcs_similarity(tokens: IntTensor<Self>, lengths: IntTensor<Self>) -> IntTensor<Self> {
            let (t, shape, dtype) = ints(tokens);
            let (len, _, _) = ints(lengths);
            let (g, n, l) = (shape[0], shape[1], shape[2]);
            let out = group_sequences(&t, &len, g, n, l, lcs_group_bit_parallel);
            FlexTensor::from_data(TensorData::new(out, vec![g, n, n]).convert_dtype(dtype))
        }
    }
}
