//! Reading tensors back from a device: the model crate's helpers, re-exported so the trainer,
//! evaluation and generation share one error type (`?` carries it across the crates unchanged).

pub use prefer_llama::host::{DeviceReadError, read, values};
