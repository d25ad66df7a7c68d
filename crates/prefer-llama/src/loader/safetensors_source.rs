//! Reads tensors from one or more memory-mapped `.safetensors` files.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, tensor::Metadata};

use crate::{
    error::{LoadError, Result},
    weights::{HostTensor, RawTensor, WeightSource},
};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// Tensors of a single file or of a sharded checkpoint, read lazily and converted to f32.
pub struct SafetensorsSource {
    origin: PathBuf,
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens the given files; `origin` names the checkpoint in messages.
    pub fn open(origin: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
            // SAFETY: the file is opened read-only and only read through this map; a checkpoint
            // rewritten while we load it is outside what any loader can guard against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                LoadError::format(path, format!("not a valid safetensors file: {e}"))
            })?;
            for name in metadata.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                header_len,
                metadata,
            });
        }
        Ok(Self {
            origin: origin.to_path_buf(),
            shards,
            index,
        })
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Raw little-endian bytes, dtype and shape of a tensor, without conversion.
    pub fn raw(&self, name: &str) -> Option<(Dtype, Vec<usize>, &[u8])> {
        let shard = &self.shards[*self.index.get(name)?];
        let info = shard.metadata.info(name)?;
        let (begin, end) = info.data_offsets;
        let start = 8 + shard.header_len;
        Some((
            info.dtype,
            info.shape.clone(),
            &shard.mmap[start + begin..start + end],
        ))
    }
}

impl WeightSource for SafetensorsSource {
    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let Some((dtype, shape, bytes)) = self.raw(name) else {
            return Ok(None);
        };
        let path = &self.shards[self.index[name]].path;
        let data = to_f32(bytes, dtype).ok_or_else(|| LoadError::UnsupportedDtype {
            path: path.clone(),
            name: name.into(),
            dtype: format!("{dtype:?}"),
            hint: if dtype == Dtype::U8 {
                " (a bitsandbytes 4-bit weight: load this model in 4-bit)".into()
            } else {
                " (supported: F32, F16, BF16, F64)".into()
            },
        })?;
        Ok(Some(HostTensor::new(shape, data)))
    }

    fn take_raw(&mut self, name: &str) -> Result<Option<RawTensor>> {
        Ok(self.raw(name).map(|(dtype, shape, bytes)| RawTensor {
            dtype: format!("{dtype:?}"),
            shape,
            bytes: bytes.to_vec(),
        }))
    }

    fn origin(&self) -> &Path {
        &self.origin
    }
}

/// Converts little-endian floats to f32; `None` for non-float types.
pub fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunk of 8")) as f32)
            .collect(),
        _ => return None,
    })
}
