//! polyburn's custom ops. Each op lives in its own module with a reference made of plain
//! tensor ops (the definition every faster implementation is checked against).

pub mod attention;
pub mod diversity;
