//! The GGUF container of llama.cpp: a header of typed key/value metadata, a table of tensor
//! descriptions, and aligned tensor data. Versions 2 and 3, little-endian.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
};

use memmap2::Mmap;

use crate::error::{LoadError, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U64(v) => Some(v),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F64(v) => Some(v),
            Self::U64(v) => Some(v as f64),
            Self::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor lies and how it is stored.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// ggml dimensions, innermost first (`ne[0]` is the row length).
    pub dims: Vec<usize>,
    /// ggml type id.
    pub ggml_type: u32,
    /// Byte offset from the start of the data section.
    pub offset: usize,
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    /// The file's path.
    pub path: PathBuf,
    /// Metadata by key.
    pub metadata: HashMap<String, GgufValue>,
    /// Tensor descriptions by name.
    pub tensors: HashMap<String, GgufTensorInfo>,
    mmap: Mmap,
    data_start: usize,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                LoadError::format(
                    self.path,
                    format!(
                        "truncated GGUF header (wanted {n} bytes at offset {})",
                        self.pos
                    ),
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        if n > self.bytes.len() as u64 {
            return Err(LoadError::format(
                self.path,
                format!("corrupt GGUF header: length {n} at offset {}", self.pos),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        let at = self.pos;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| {
            LoadError::format(
                self.path,
                format!("invalid UTF-8 in GGUF string at offset {at}"),
            )
        })
    }
    fn value(&mut self, ty: u32) -> Result<GgufValue> {
        let b = |r: &mut Self, n| -> Result<Vec<u8>> { Ok(r.take(n)?.to_vec()) };
        Ok(match ty {
            0 => GgufValue::U64(b(self, 1)?[0] as u64),
            1 => GgufValue::I64(b(self, 1)?[0] as i8 as i64),
            2 => GgufValue::U64(u16::from_le_bytes(b(self, 2)?.try_into().expect("2")) as u64),
            3 => GgufValue::I64(i16::from_le_bytes(b(self, 2)?.try_into().expect("2")) as i64),
            4 => GgufValue::U64(self.u32()? as u64),
            5 => GgufValue::I64(self.u32()? as i32 as i64),
            6 => GgufValue::F64(f32::from_bits(self.u32()?) as f64),
            7 => GgufValue::Bool(b(self, 1)?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                let inner = self.u32()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(self.u64()? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64()?)),
            other => {
                return Err(LoadError::format(
                    self.path,
                    format!("unknown GGUF value type {other} at offset {}", self.pos),
                ));
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file's header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
        // SAFETY: read-only map of a file we only read.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
        let mut r = Reader {
            bytes: &mmap,
            pos: 0,
            path,
        };
        if r.take(4).ok() != Some(b"GGUF".as_slice()) {
            return Err(LoadError::format(path, "not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(LoadError::format(
                path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let n_tensors = r.len()?;
        let n_kv = r.len()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty)?;
            metadata.insert(key, value);
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 4 {
                return Err(LoadError::format(
                    path,
                    format!("tensor `{name}` has {n_dims} dimensions"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.len()?);
            }
            let ggml_type = r.u32()?;
            let offset = r.len()?;
            tensors.insert(
                name,
                GgufTensorInfo {
                    dims,
                    ggml_type,
                    offset,
                },
            );
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32) as usize;
        let data_start = r.pos.div_ceil(alignment.max(1)) * alignment.max(1);
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            tensors,
            mmap,
            data_start,
        })
    }

    /// The bytes of a tensor, checked against the file's length.
    pub fn tensor_bytes(&self, name: &str, info: &GgufTensorInfo, n_bytes: usize) -> Result<&[u8]> {
        let start = self.data_start + info.offset;
        self.mmap.get(start..start + n_bytes).ok_or_else(|| {
            LoadError::format(
                &self.path,
                format!("tensor `{name}` runs past the end of the file"),
            )
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
}
