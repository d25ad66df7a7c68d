//! Named f32 tensors on the host: the common currency between checkpoint readers
//! (safetensors, GGUF) and the model builder.

use burn::tensor::{Tensor, TensorData, backend::Backend};

/// A dense f32 tensor in row-major order with Hugging Face's shape and layout.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape, outermost first (a Linear weight is `[out_features, in_features]`).
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor of the given shape; `data.len()` must equal the shape's product.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// The transpose of a 2-D tensor.
    pub fn transposed(&self) -> Self {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut out = vec![0.0; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = self.data[r * cols + c];
            }
        }
        Self {
            shape: vec![cols, rows],
            data: out,
        }
    }

    /// Uploads to a device as a `D`-dimensional tensor.
    pub fn to_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(
            TensorData::new(self.data.clone(), self.shape.clone()),
            device,
        )
    }
}

/// A source of named checkpoint tensors, in Hugging Face naming (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// Takes the tensor with this name, converted to f32, or `None` when the checkpoint lacks it.
    fn take(&mut self, name: &str) -> crate::Result<Option<HostTensor>>;
    /// Where the weights come from, for error messages.
    fn origin(&self) -> &std::path::Path;
}
