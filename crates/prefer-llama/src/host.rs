//! Reading tensors back from a device. A failed read (a device error, data of the wrong type or
//! size) is an error that names what was being read — never an empty vector that panics later,
//! keys the reference cache wrongly or gives a generation that silently stops.
//!
//! It lives in the model crate, the lowest one that reads tensors back (generation, NF4 weights),
//! so every crate above returns the same error type.

use burn::tensor::{BasicOps, Element, Tensor, TensorData, backend::Backend};

/// A tensor could not be read back from its device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reading {what} from the device failed: {message}")]
pub struct DeviceReadError {
    /// What was being read (`reference log-probs`, `per-pair values`, …).
    pub what: String,
    /// The backend's or the data's complaint.
    pub message: String,
}

impl DeviceReadError {
    /// An error reading `what`.
    pub fn new(what: &str, message: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            message: message.into(),
        }
    }
}

/// Reads `t` (float, int or bool) to the host as `E`s; `what` names it in the error.
pub fn read<E: Element, B: Backend, const D: usize, K: BasicOps<B>>(
    t: Tensor<B, D, K>,
    what: &str,
) -> Result<Vec<E>, DeviceReadError> {
    let data = t
        .try_into_data()
        .map_err(|e| DeviceReadError::new(what, format!("{e:?}")))?;
    values(data, what)
}

/// The values of data already on the host, as `E`s, checked against its shape.
pub fn values<E: Element>(data: TensorData, what: &str) -> Result<Vec<E>, DeviceReadError> {
    let expected = data.num_elements();
    let values = data
        .convert::<E>()
        .into_vec::<E>()
        .map_err(|e| DeviceReadError::new(what, format!("{e:?}")))?;
    if values.len() != expected {
        return Err(DeviceReadError::new(
            what,
            format!("{} values for a shape of {expected}", values.len()),
        ));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use burn::tensor::DType;

    use super::*;

    #[test]
    fn a_bad_buffer_is_an_error_naming_what_was_read() {
        // Three bytes cannot hold an f32: the read fails instead of giving an empty vector.
        let data = TensorData::from_bytes_vec(vec![0u8; 3], [1], DType::F32);
        let err = values::<f32>(data, "reference log-probs").unwrap_err();
        assert_eq!(err.what, "reference log-probs");
        assert!(err.to_string().starts_with("reading reference log-probs"));
        let ok = values::<f64>(TensorData::new(vec![1.5f32, 2.0], [2]), "x").unwrap();
        assert_eq!(ok, [1.5, 2.0]);
    }
}
