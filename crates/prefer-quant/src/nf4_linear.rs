//! The frozen NF4 linear layer: it holds only packed codes and scales on the device and dequantises
//! to f32 inside its forward, so no full-precision copy of the weight stays resident.
//!
//! Device layout (not bitsandbytes' byte layout): codes as i32 words of eight 4-bit codes, element
//! `8w + k` at bits `4k..4k+4`; double-quantised scales as i32 words of four 8-bit codes. i32 is an
//! integer type every backend supports (WGSL has no u8).

use burn::{
    module::{Module, Param, ParamId},
    tensor::{DType, ElementConversion, Int, Tensor, TensorData, backend::Backend},
};
use prefer_kernels::{FrozenMatmulBackend, Nf4DequantBackend, frozen_matmul, nf4_dequantize};
use prefer_llama::{
    DeviceReadError, HostTensor, LinearFactory, LinearLayer, LinearSpec, LoadError, Result,
    WeightSource, host::read, linear::cast_to,
};

use crate::{
    double_quant::{NESTED_BLOCKSIZE, dynamic_map},
    nf4::{NF4_CODE, nibble},
    nf4_weight::{Absmax, Nf4Weight},
};

/// A linear layer whose weight is NF4: `y = x · dequant(W)ᵀ + b`.
#[derive(Module, Debug)]
pub struct Nf4Linear<B: Backend> {
    /// Packed codes, `ceil(n_blocks · blocksize / 8)` i32 words; frozen.
    pub codes: Param<Tensor<B, 1, Int>>,
    /// Per-block absmax (plain), or per-256-block nested absmax (double quantisation); frozen.
    pub scales: Param<Tensor<B, 1>>,
    /// Double quantisation: 8-bit absmax codes in i32 words; frozen.
    pub scale_codes: Option<Param<Tensor<B, 1, Int>>>,
    /// Optional bias `[out]`; frozen.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The NF4 levels (a constant, not a parameter).
    pub code_table: Tensor<B, 1>,
    /// The 8-bit dynamic map (a constant).
    pub dynamic_table: Tensor<B, 1>,
    /// Mean absmax added back after the nested dequantisation.
    pub offset: f32,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Values per block.
    pub blocksize: usize,
}

fn int_words<B: Backend>(words: Vec<i32>, device: &B::Device) -> Param<Tensor<B, 1, Int>> {
    let n = words.len();
    Param::initialized(
        ParamId::new(),
        Tensor::from_data(TensorData::new(words, [n]), (device, DType::I32)),
    )
}

fn frozen<B: Backend>(v: Vec<f32>, device: &B::Device) -> Param<Tensor<B, 1>> {
    let n = v.len();
    Param::initialized(
        ParamId::new(),
        Tensor::from_data(TensorData::new(v, [n]), device),
    )
}

impl<B: Backend> Nf4Linear<B> {
    /// Uploads a quantised weight (and bias).
    pub fn from_weight(w: &Nf4Weight, bias: Option<&HostTensor>, device: &B::Device) -> Self {
        let padded = w.n_blocks() * w.blocksize;
        let words: Vec<i32> = (0..padded.div_ceil(8))
            .map(|wi| {
                (0..8).fold(0u32, |acc, k| {
                    let i = wi * 8 + k;
                    let c = if i < w.len() {
                        nibble(&w.packed, i) as u32
                    } else {
                        7
                    }; // 7 is the zero level
                    acc | (c << (4 * k))
                }) as i32
            })
            .collect();
        let (scales, scale_codes, offset) = match &w.absmax {
            Absmax::Plain(v) => (v.clone(), None, 0.0),
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            } => {
                let words: Vec<i32> = codes
                    .chunks(4)
                    .map(|c| {
                        c.iter()
                            .enumerate()
                            .fold(0u32, |acc, (k, &b)| acc | ((b as u32) << (8 * k)))
                            as i32
                    })
                    .collect();
                (
                    nested_absmax.clone(),
                    Some(int_words(words, device)),
                    *offset,
                )
            }
        };
        Self {
            codes: int_words(words, device),
            scales: frozen(scales, device),
            scale_codes,
            bias: bias.map(|b| frozen(b.data.clone(), device)),
            code_table: Tensor::from_data(TensorData::new(NF4_CODE.to_vec(), [16]), device),
            dynamic_table: Tensor::from_data(
                TensorData::new(dynamic_map().to_vec(), [256]),
                device,
            ),
            offset,
            shape: w.shape,
            blocksize: w.blocksize,
        }
    }

    fn n_blocks(&self) -> usize {
        (self.shape[0] * self.shape[1]).div_ceil(self.blocksize)
    }

    /// The absmax of every block, `[n_blocks]`.
    pub fn block_absmax(&self) -> Tensor<B, 1> {
        let scales = self.scales.val();
        let Some(codes) = &self.scale_codes else {
            return scales;
        };
        let nb = self.n_blocks();
        let words = codes.val();
        let bytes: Vec<_> = (0..4)
            .map(|k| {
                words
                    .clone()
                    .bitwise_right_shift_scalar((8 * k).elem())
                    .bitwise_and_scalar(255.elem())
            })
            .collect();
        let idx = Tensor::stack::<2>(bytes, 1).reshape([-1]).narrow(0, 0, nb);
        let device = words.device();
        let block_of = Tensor::<B, 1, Int>::arange(0..nb as i64, (&device, DType::I32))
            .div_scalar(NESTED_BLOCKSIZE as i64);
        self.dynamic_table.clone().select(0, idx) * scales.select(0, block_of) + self.offset
    }

    /// The weight `[out, in]` in f32, built on the device from codes and scales (a CubeCL kernel on
    /// wgpu and CUDA, tensor operations elsewhere).
    pub fn dequantize(&self) -> Tensor<B, 2>
    where
        B: Nf4DequantBackend,
    {
        let [out, inp] = self.shape;
        let w = nf4_dequantize(
            self.codes.val(),
            self.code_table.clone(),
            self.block_absmax(),
            self.blocksize,
            out * inp,
        );
        w.reshape([out, inp])
    }

    /// Downloads the codes and scales into bitsandbytes' layout.
    ///
    /// # Errors
    /// If the codes or scales cannot be read back from the device: a partial weight would be
    /// wrong codes, not a smaller weight.
    pub fn to_weight(&self) -> std::result::Result<Nf4Weight, DeviceReadError> {
        let words: Vec<i32> = read(self.codes.val(), "the NF4 codes")?;
        let n = self.shape[0] * self.shape[1];
        let code = |i: usize| ((words[i / 8] as u32 >> (4 * (i % 8))) & 15) as u8;
        let packed = (0..n.div_ceil(2))
            .map(|j| (code(2 * j) << 4) | if 2 * j + 1 < n { code(2 * j + 1) } else { 7 })
            .collect();
        let scales: Vec<f32> = read(self.scales.val(), "the NF4 block scales")?;
        let absmax = match &self.scale_codes {
            None => Absmax::Plain(scales),
            Some(c) => {
                let words: Vec<i32> = read(c.val(), "the NF4 double-quantised scale codes")?;
                let codes = (0..self.n_blocks())
                    .map(|i| ((words[i / 4] as u32 >> (8 * (i % 4))) & 255) as u8)
                    .collect();
                Absmax::Double {
                    codes,
                    nested_absmax: scales,
                    offset: self.offset,
                }
            }
        };
        Ok(Nf4Weight {
            shape: self.shape,
            blocksize: self.blocksize,
            packed,
            absmax,
        })
    }
}

impl<B: Nf4DequantBackend + FrozenMatmulBackend> LinearLayer<B> for Nf4Linear<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // Dequantised in f32 and rounded once into the compute type, as bitsandbytes does.
        let dtype = x.dtype();
        let y = frozen_matmul(x, cast_to(self.dequantize(), dtype).transpose());
        match &self.bias {
            Some(b) => y + cast_to(b.val(), dtype).unsqueeze(),
            None => y,
        }
    }

    fn merged_weight(&self) -> Tensor<B, 2> {
        self.dequantize()
    }

    fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(Param::val)
    }

    fn dims(&self) -> [usize; 2] {
        self.shape
    }
}

/// Quantises every projection to NF4 while a checkpoint loads (`load_in_4bit`).
#[derive(Debug, Clone, Copy)]
pub struct Nf4Factory {
    /// Values per block (64 as bitsandbytes' default).
    pub blocksize: usize,
    /// Quantise the absmax too (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

impl Default for Nf4Factory {
    fn default() -> Self {
        Self {
            blocksize: 64,
            double_quant: true,
        }
    }
}

impl<B: Nf4DequantBackend + FrozenMatmulBackend> LinearFactory<B> for Nf4Factory {
    type Layer = Nf4Linear<B>;

    /// Reads a pre-quantised bitsandbytes weight when the checkpoint has one; otherwise quantises
    /// the full-precision weight.
    fn build(
        &self,
        spec: &LinearSpec,
        source: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<Nf4Linear<B>> {
        if let Some(w) = crate::bnb::read_bnb_weight(source, spec)? {
            let bias = if spec.bias {
                Some(prefer_llama::fetch(
                    source,
                    &format!("{}.bias", spec.site.hf_path()),
                    &[spec.out_features],
                )?)
            } else {
                None
            };
            return Ok(Nf4Linear::from_weight(&w, bias.as_ref(), device));
        }
        let (weight, bias) = spec.fetch_dense(source)?;
        let w = Nf4Weight::quantize(
            &weight.data,
            [spec.out_features, spec.in_features],
            self.blocksize,
            self.double_quant,
        )
        .map_err(|e| LoadError::Config {
            path: spec.site.hf_path().into(),
            message: e.to_string(),
        })?;
        Ok(Nf4Linear::from_weight(&w, bias.as_ref(), device))
    }
}
