//! Bit-parallel LCS (Allison–Dix / Crochemore et al.): one bit per position of the shorter
//! sequence, `V ← (V + (V & M_y)) | (V & ¬M_y)` per symbol `y` of the longer one, carries
//! across 64-bit words; the LCS length is the number of zero bits of `V`.

use std::collections::HashMap;

pub fn lcs_length_bit_parallel(a: &[i64], b: &[i64]) -> usize {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let m = short.len();
    if m == 0 {
        return 0;
    }
    let words = m.div_ceil(64);
    // Match masks over the alphabet of the shorter sequence.
    let mut masks: HashMap<i64, Vec<u64>> = HashMap::new();
    for (i, &c) in short.iter().enumerate() {
        masks.entry(c).or_insert_with(|| vec![0; words])[i / 64] |= 1 << (i % 64);
    }
    let mut v = vec![u64::MAX; words];
    for y in long {
        let Some(mask) = masks.get(y) else { continue };
        let mut carry = 0u64;
        for (w, &mw) in v.iter_mut().zip(mask) {
            let u = *w & mw;
            let (sum, c1) = w.overflowing_add(u);
            let (sum, c2) = sum.overflowing_add(carry);
            carry = (c1 | c2) as u64;
            *w = sum | (*w & !mw);
        }
    }
    // Bits past `m` start at 1 and stay 1 (`V & ¬M` keeps every unmatched one), so they add
    // no zeros.
    let zeros: u32 = v.iter().map(|w| w.count_zeros()).sum();
    zeros as usize
}

mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::IntTensor;
    use burn::tensor::TensorData;

    use super::lcs_length_bit_parallel;
    use crate::lcs::{LcsBackend, all_pairs};

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
            let out = all_pairs(&t, &len, g, n, l, lcs_length_bit_parallel);
            FlexTensor::from_data(TensorData::new(out, vec![g, n, n]).convert_dtype(dtype))
        }
    }
}
