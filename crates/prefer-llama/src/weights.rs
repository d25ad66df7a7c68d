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

/// A tensor as stored, for layers that read their own formats (e.g. bitsandbytes 4-bit codes).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// The file's dtype name (`U8`, `F32`, ...).
    pub dtype: String,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub bytes: Vec<u8>,
}

/// A source of named checkpoint tensors, in Hugging Face naming (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// Takes the tensor with this name, converted to f32, or `None` when the checkpoint lacks it.
    fn take(&mut self, name: &str) -> crate::Result<Option<HostTensor>>;
    /// Takes the tensor with this name as stored, or `None` (the default for sources that only
    /// hold floats).
    fn take_raw(&mut self, _name: &str) -> crate::Result<Option<RawTensor>> {
        Ok(None)
    }
    /// Where the weights come from, for error messages.
    fn origin(&self) -> &std::path::Path;
}

/// Takes a tensor and checks its shape.
pub fn fetch(
    source: &mut dyn WeightSource,
    name: &str,
    expected: &[usize],
) -> crate::Result<HostTensor> {
    let path = source.origin().to_path_buf();
    match source.take(name)? {
        None => Err(crate::LoadError::MissingTensor {
            path,
            name: name.into(),
            expected: expected.to_vec(),
        }),
        Some(t) if t.shape != expected => Err(crate::LoadError::Shape {
            path,
            name: name.into(),
            expected: expected.to_vec(),
            found: t.shape,
        }),
        Some(t) => Ok(t),
    }
}

/// Tensors held in memory by name: for models built in-process (tests, benchmarks, conversions).
#[derive(Debug, Default)]
pub struct MemoryWeights {
    tensors: std::collections::HashMap<String, HostTensor>,
    origin: std::path::PathBuf,
}

impl MemoryWeights {
    /// An empty set; `origin` names it in error messages.
    pub fn new(origin: impl Into<std::path::PathBuf>) -> Self {
        Self {
            tensors: Default::default(),
            origin: origin.into(),
        }
    }

    /// Names of the tensors held, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Random weights for every tensor of `config`, in Hugging Face naming: normal(0, `std`) matrices
    /// and norms near 1, from a seeded generator.
    pub fn random(config: &crate::LlamaConfig, std: f32, seed: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut normal = move |n: usize, mean: f32, s: f32| -> Vec<f32> {
            // Box–Muller: the workspace needs no distribution crate for this.
            (0..n)
                .map(|_| {
                    let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                    mean + s * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                })
                .collect()
        };
        let c = config;
        let mut w = Self::new("<random weights>");
        let mut add = |name: String, shape: Vec<usize>, mean: f32, s: f32| {
            let n = shape.iter().product();
            w.insert(name, HostTensor::new(shape, normal(n, mean, s)));
        };
        add(
            "model.embed_tokens.weight".into(),
            vec![c.vocab_size, c.hidden_size],
            0.0,
            std,
        );
        add("model.norm.weight".into(), vec![c.hidden_size], 1.0, 0.1);
        if !c.tie_word_embeddings {
            add(
                "lm_head.weight".into(),
                vec![c.vocab_size, c.hidden_size],
                0.0,
                std,
            );
        }
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            add(
                format!("{p}.input_layernorm.weight"),
                vec![c.hidden_size],
                1.0,
                0.1,
            );
            add(
                format!("{p}.post_attention_layernorm.weight"),
                vec![c.hidden_size],
                1.0,
                0.1,
            );
            for (proj, out, inp, bias) in [
                ("self_attn.q_proj", q, c.hidden_size, c.qkv_bias),
                ("self_attn.k_proj", kv, c.hidden_size, c.qkv_bias),
                ("self_attn.v_proj", kv, c.hidden_size, c.qkv_bias),
                ("self_attn.o_proj", c.hidden_size, q, c.o_bias),
                (
                    "mlp.gate_proj",
                    c.intermediate_size,
                    c.hidden_size,
                    c.mlp_bias,
                ),
                (
                    "mlp.up_proj",
                    c.intermediate_size,
                    c.hidden_size,
                    c.mlp_bias,
                ),
                (
                    "mlp.down_proj",
                    c.hidden_size,
                    c.intermediate_size,
                    c.mlp_bias,
                ),
            ] {
                add(format!("{p}.{proj}.weight"), vec![out, inp], 0.0, std);
                if bias {
                    add(format!("{p}.{proj}.bias"), vec![out], 0.0, std);
                }
            }
        }
        w
    }
}

impl WeightSource for MemoryWeights {
    fn take(&mut self, name: &str) -> crate::Result<Option<HostTensor>> {
        Ok(self.tensors.remove(name))
    }

    fn origin(&self) -> &std::path::Path {
        &self.origin
    }
}
