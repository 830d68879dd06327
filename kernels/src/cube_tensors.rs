//! What every CubeCL implementation in this crate needs around its kernels: contiguous inputs,
//! outputs poisoned with NaN (so a unit that forgets its element fails the harness), and a
//! one-unit-per-element launch grid.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim, InputScalar};
use burn_cubecl::cubecl::calculate_cube_count_elemwise;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, full_device_dtype};
use burn_cubecl::tensor::CubeTensor;

/// The tensor with row-major strides (the kernels index flat offsets).
pub(crate) fn contiguous(tensor: CubeTensor) -> CubeTensor {
    into_contiguous(tensor)
}

/// A new row-major tensor on `like`'s device filled with `value` (the runtime may pad rows of
/// a fresh allocation; the kernels index flat offsets).
pub(crate) fn filled(like: &CubeTensor, shape: impl Into<Shape>, dtype: DType, value: f64) -> CubeTensor {
    into_contiguous(full_device_dtype(like.client.clone(), shape.into(), like.device.clone(), InputScalar::new(value, dtype_to_storage_type(dtype)), dtype))
}

/// A float output every element of which the kernel must write: NaN until it does.
pub(crate) fn poisoned(like: &CubeTensor, shape: impl Into<Shape>) -> CubeTensor {
    filled(like, shape, like.dtype, f64::NAN)
}

/// Scratch memory a kernel fully writes before reading.
pub(crate) fn scratch(like: &CubeTensor, shape: impl Into<Shape>, dtype: DType) -> CubeTensor {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape.into(), dtype)
}

/// A grid with at least `units` units (kernels return early past their element count), or
/// `None` when there is nothing to launch.
pub(crate) fn grid(like: &CubeTensor, units: usize) -> Option<(CubeCount, CubeDim)> {
    (units > 0).then(|| {
        let dim = CubeDim::new(&like.client, units);
        (calculate_cube_count_elemwise(&like.client, units, dim), dim)
    })
}

/// The storage type a kernel is instantiated for.
pub(crate) fn elem(tensor: &CubeTensor) -> burn_cubecl::cubecl::ir::ElemType {
    dtype_to_storage_type(tensor.dtype)
}
