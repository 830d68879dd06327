//! Reading Flex tensors in the fused CPU kernels.

use burn::backend::flex::FlexTensor;
use burn::tensor::DType;

/// The tensor in row-major order (a copy only when it is a strided view). The fused CPU
/// kernels compute in f32.
pub(crate) fn contiguous_f32(t: &FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "the fused CPU kernels compute in f32");
    if t.is_contiguous() { t.clone() } else { t.to_contiguous() }
}

/// The values of a tensor returned by [`contiguous_f32`].
pub(crate) fn f32_values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}
