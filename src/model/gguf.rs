//! A GGUF (v2/v3) reader: header, metadata and tensor directory, with tensor data read
//! on demand from the file (weights are never all in memory at once).
//!
//! Written here rather than taken from a crate: the GGUF crates on the registry either
//! read unchecked enum values from the file (undefined behaviour on an unknown tensor
//! type) or panic on truncated files, and this crate's rule is a typed error for every
//! bad file. Every length read from the file is checked against the bytes that remain.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::quant::ggml::{GgmlType, dequantize};
use crate::quant::qmat::FileMap;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Unsigned integer (u8, u16, u32, u64).
    U64(u64),
    /// Signed integer (i8, i16, i32, i64).
    I64(i64),
    /// Float (f32, f64).
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer (also from a non-negative signed one).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// As a float (also from integers).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Name (`blk.0.attn_q.weight`, ...).
    pub name: String,
    /// ggml dims, fastest first: a `[rows, cols]` matrix has `dims = [cols, rows]`.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte offset in the file (absolute).
    pub offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

enum Source {
    File(Mutex<File>),
    Mem(Vec<u8>),
}

/// An open GGUF file.
pub struct Gguf {
    path: Option<PathBuf>,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    source: Source,
    /// The file mapped on first use ([`Gguf::map_tensor`]; Unix only).
    #[cfg_attr(not(unix), allow(dead_code))]
    map: Mutex<Option<std::sync::Arc<FileMap>>>,
}

/// Reader that counts bytes and refuses lengths larger than what remains.
struct Cursor<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Cursor<R> {
    fn bad(&self, what: &str) -> Error {
        Error::Gguf(format!(
            "truncated or corrupt file: {what} at byte {} (file has {} bytes)",
            self.pos, self.len
        ))
    }
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(self.bad(what));
        }
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v).map_err(|_| self.bad(what))?;
        self.pos += n;
        Ok(v)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let v = self.bytes(N as u64, what)?;
        Ok(v.try_into().expect("N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| Error::Gguf(format!("{what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.arr::<1>("u8")?[0] as u64),
            1 => Value::I64(self.arr::<1>("i8")?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.arr("u16")?) as u64),
            3 => Value::I64(i16::from_le_bytes(self.arr("i16")?) as i64),
            4 => Value::U64(self.u32("u32")? as u64),
            5 => Value::I64(i32::from_le_bytes(self.arr("i32")?) as i64),
            6 => Value::F64(f32::from_le_bytes(self.arr("f32")?) as f64),
            7 => Value::Bool(self.arr::<1>("bool")?[0] != 0),
            8 => Value::Str(self.string("string value")?),
            9 => {
                if depth > 4 {
                    return Err(Error::Gguf("metadata arrays nested too deep".into()));
                }
                let ety = self.u32("array type")?;
                let n = self.u64("array length")?;
                // Every element takes at least one byte: a cheap bound on corrupt lengths.
                if n > self.len.saturating_sub(self.pos) {
                    return Err(self.bad("array length"));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.arr("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.arr("f64")?)),
            o => return Err(Error::Gguf(format!("unknown metadata value type {o}"))),
        })
    }
}

impl Gguf {
    /// Opens a GGUF file: reads the header, metadata and tensor directory (not the data).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path)
            .map_err(|e| Error::Gguf(format!("cannot open {}: {e}", path.display())))?;
        let len = file.metadata()?.len();
        let mut g = Self::parse(BufReader::new(file.try_clone()?), len)?;
        g.source = Source::File(Mutex::new(file));
        g.path = Some(path.to_path_buf());
        Ok(g)
    }

    /// Parses a GGUF held in memory (tests, small files).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let len = bytes.len() as u64;
        let mut g = Self::parse(std::io::Cursor::new(&bytes[..]), len)?;
        g.source = Source::Mem(bytes);
        Ok(g)
    }

    /// The file it was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn parse<R: Read>(r: R, len: u64) -> Result<Self> {
        let mut c = Cursor { r, pos: 0, len };
        let magic = c.arr::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(Error::Gguf(format!(
                "not a GGUF file (magic {magic:?}, expected \"GGUF\")"
            )));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::Gguf(format!(
                "GGUF version {version} is not supported (2 or 3)"
            )));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > len || n_kv > len {
            return Err(c.bad("counts larger than the file"));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32("tensor rank")?;
            if nd == 0 || nd > 4 {
                return Err(Error::Gguf(format!("tensor `{name}` has rank {nd}")));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(c.u64("tensor dim")?);
            }
            let ty = GgmlType::from_id(c.u32("tensor type")?)
                .map_err(|e| Error::Gguf(format!("tensor `{name}`: {e}")))?;
            let off = c.u64("tensor offset")?;
            raw.push((name, dims, ty, off));
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(Error::Gguf(format!("bad general.alignment {v:?}"))),
            },
        };
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = BTreeMap::new();
        for (name, dims, ty, off) in raw {
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::Gguf(format!("tensor `{name}`: dims overflow")))?;
            let bytes = ty
                .bytes_for(numel)
                .map_err(|e| Error::Gguf(format!("tensor `{name}`: {e}")))?;
            let offset = data_start
                .checked_add(off)
                .ok_or_else(|| Error::Gguf(format!("tensor `{name}`: offset overflow")))?;
            if offset.checked_add(bytes).is_none_or(|end| end > len) {
                return Err(Error::Gguf(format!(
                    "truncated file: tensor `{name}` needs bytes {offset}..{} but the file has {len}",
                    offset.saturating_add(bytes)
                )));
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::Gguf(format!("duplicate tensor `{name}`")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                bytes,
            });
        }
        Ok(Gguf {
            path: None,
            version,
            metadata,
            tensors,
            index,
            source: Source::Mem(Vec::new()),
            map: Mutex::new(None),
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required metadata value; a typed error names the missing key.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| Error::Gguf(format!("metadata key `{key}` is missing")))
    }

    /// A required unsigned integer.
    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| Error::Gguf(format!("`{key}` is {v:?}, expected an integer")))
    }

    /// A required float.
    pub fn f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64()
            .ok_or_else(|| Error::Gguf(format!("`{key}` is {v:?}, expected a number")))
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| Error::Gguf(format!("`{key}` is {v:?}, expected a string")))
    }

    /// A tensor's directory entry.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::Gguf(format!("tensor `{name}` is not in the file")))
    }

    /// A 2-D tensor (a weight matrix) with its `(rows, cols)`: ggml dims `[cols, rows]`;
    /// a typed error for any other rank.
    pub fn matrix(&self, name: &str) -> Result<(&TensorInfo, usize, usize)> {
        let t = self.tensor(name)?;
        if t.dims.len() != 2 {
            return Err(Error::Model(format!(
                "`{name}` has dims {:?}, expected a matrix",
                t.dims
            )));
        }
        Ok((t, t.dims[1] as usize, t.dims[0] as usize))
    }

    /// A 3-D tensor of `experts` stacked matrices (ggml dims `[cols, rows, experts]`,
    /// expert after expert) with one expert's `(rows, cols)`; a typed error for any
    /// other shape.
    pub fn experts(&self, name: &str, experts: usize) -> Result<(&TensorInfo, usize, usize)> {
        let t = self.tensor(name)?;
        if t.dims.len() != 3 || t.dims[2] as usize != experts {
            return Err(Error::Model(format!(
                "`{name}` has dims {:?}, expected [cols, rows, {experts}]",
                t.dims
            )));
        }
        Ok((t, t.dims[1] as usize, t.dims[0] as usize))
    }

    /// Whether a tensor exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The whole file memory-mapped read-only, with the byte range of tensor `name` in
    /// it; `None` for a GGUF held in memory (or off Unix).
    pub fn map_tensor(
        &self,
        name: &str,
    ) -> Result<Option<(std::sync::Arc<FileMap>, std::ops::Range<usize>)>> {
        let t = self.tensor(name)?;
        #[cfg(unix)]
        if let Source::File(f) = &self.source {
            let mut map = self.map.lock().expect("map lock");
            if map.is_none() {
                let f = f.lock().expect("file lock");
                *map = Some(std::sync::Arc::new(FileMap::new(&f)?));
            }
            let range = t.offset as usize..(t.offset + t.bytes) as usize;
            return Ok(map.clone().map(|m| (m, range)));
        }
        let _ = t;
        Ok(None)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let t = self.tensor(name)?;
        match &self.source {
            Source::Mem(b) => Ok(b[t.offset as usize..(t.offset + t.bytes) as usize].to_vec()),
            Source::File(f) => {
                let mut f = f.lock().expect("file lock");
                f.seek(SeekFrom::Start(t.offset))?;
                let mut v = vec![0u8; t.bytes as usize];
                f.read_exact(&mut v).map_err(|e| {
                    Error::Gguf(format!(
                        "reading tensor `{name}` failed (file changed?): {e}"
                    ))
                })?;
                Ok(v)
            }
        }
    }

    /// A tensor dequantized to f32 (ggml order: fastest dim first, i.e. row-major rows of
    /// `dims[0]` elements). A NaN or infinite weight (or block scale) is
    /// [`Error::NonFinite`]: a damaged file never reaches a kernel.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        let b = self.tensor_bytes(name)?;
        let v = dequantize(t.ty, &b, t.numel() as usize)
            .map_err(|e| Error::Gguf(format!("tensor `{name}`: {e}")))?;
        crate::error::check_finite(&format!("weight `{name}`"), &v, false)?;
        Ok(v)
    }
}

/// Builds GGUF v3 files in memory (for tests and fixtures): metadata and tensors given as
/// raw bytes of a type.
#[derive(Default)]
pub struct GgufBuilder {
    kv: Vec<(String, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufBuilder {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn encode(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&(*x as f32).to_le_bytes()),
            Value::Bool(b) => out.push(*b as u8),
            Value::Str(s) => Self::put_str(out, s),
            Value::Array(a) => {
                let ety = a.first().map(Self::type_id).unwrap_or(4);
                out.extend_from_slice(&ety.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for e in a {
                    Self::encode(out, e);
                }
            }
        }
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
        }
    }

    /// Adds a metadata entry (integers as u64/i64, floats as f32).
    pub fn meta(mut self, key: &str, v: Value) -> Self {
        let mut b = Self::type_id(&v).to_le_bytes().to_vec();
        Self::encode(&mut b, &v);
        self.kv.push((key.into(), b));
        self
    }

    /// Adds a tensor with ggml dims and raw data bytes.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }

    /// Adds an f32 tensor.
    pub fn tensor_f32(self, name: &str, dims: &[u64], data: &[f32]) -> Self {
        let b = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, b)
    }

    /// The file's bytes (alignment 32).
    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            Self::put_str(&mut out, k);
            out.extend_from_slice(v);
        }
        let mut off = 0u64;
        let mut offs = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            Self::put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
            offs.push(off);
            off = (off + data.len() as u64).div_ceil(32) * 32;
        }
        let data_start = out.len().div_ceil(32) * 32;
        for ((_, _, _, data), o) in self.tensors.iter().zip(offs) {
            out.resize(data_start + o as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

/// A metadata value with the exact GGUF type it is written as (llama.cpp checks types:
/// counts are `u32`, floats `f32`, token types an `i32` array).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    Str(String),
    /// Array of `string`.
    Strs(Vec<String>),
    /// Array of `int32`.
    I32s(Vec<i32>),
    /// `uint64`.
    U64(u64),
    /// Array of `float32`.
    F32s(Vec<f32>),
}

impl MetaValue {
    /// A value read from a file, in the narrowest type that holds it (integers as
    /// `uint32`/`int32` where they fit, floats as `float32`, arrays of strings, integers
    /// or floats): what a rewritten file (a cropped model) carries over.
    pub fn from_value(key: &str, v: &Value) -> Result<Self> {
        let bad = || Error::Gguf(format!("metadata `{key}`: {v:?} cannot be written back"));
        Ok(match v {
            Value::U64(x) => u32::try_from(*x).map_or(MetaValue::U64(*x), MetaValue::U32),
            Value::I64(x) => match i32::try_from(*x) {
                Ok(x) => MetaValue::I32(x),
                Err(_) => MetaValue::U64(u64::try_from(*x).map_err(|_| bad())?),
            },
            Value::F64(x) => MetaValue::F32(*x as f32),
            Value::Bool(b) => MetaValue::Bool(*b),
            Value::Str(s) => MetaValue::Str(s.clone()),
            Value::Array(a) if a.iter().all(|x| matches!(x, Value::Str(_))) && !a.is_empty() => {
                MetaValue::Strs(
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect(),
                )
            }
            Value::Array(a) if a.iter().all(|x| matches!(x, Value::F64(_))) && !a.is_empty() => {
                MetaValue::F32s(
                    a.iter()
                        .filter_map(|x| x.as_f64().map(|f| f as f32))
                        .collect(),
                )
            }
            Value::Array(a) => MetaValue::I32s(
                a.iter()
                    .map(|x| match x {
                        Value::U64(u) => i32::try_from(*u).ok(),
                        Value::I64(i) => i32::try_from(*i).ok(),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(bad)?,
            ),
        })
    }
}

/// Writes a GGUF v3 file as a stream: metadata and tensor descriptions first, then each
/// tensor's bytes from a callback, in order, so a file of any size needs one tensor's
/// bytes in memory at a time.
#[derive(Default)]
pub struct GgufWriter {
    kv: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, u64)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn meta(&mut self, key: &str, v: MetaValue) -> &mut Self {
        self.kv.push((key.into(), v));
        self
    }

    /// Adds a tensor (ggml dims, innermost first); typed error for a first dimension
    /// that is not a whole number of the type's blocks.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType) -> Result<&mut Self> {
        let row = ty.bytes_for(dims.first().copied().unwrap_or(1))?;
        let bytes = row * dims.iter().skip(1).product::<u64>();
        self.tensors.push((name.into(), dims.to_vec(), ty, bytes));
        Ok(self)
    }

    /// The tensors added: (name, dims, type, bytes).
    pub fn tensors(&self) -> &[(String, Vec<u64>, GgmlType, u64)] {
        &self.tensors
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn put_meta(out: &mut Vec<u8>, v: &MetaValue) {
        let (ty, body): (u32, Vec<u8>) = match v {
            MetaValue::U32(x) => (4, x.to_le_bytes().to_vec()),
            MetaValue::I32(x) => (5, x.to_le_bytes().to_vec()),
            MetaValue::F32(x) => (6, x.to_le_bytes().to_vec()),
            MetaValue::Bool(b) => (7, vec![*b as u8]),
            MetaValue::Str(s) => {
                let mut b = Vec::new();
                Self::put_str(&mut b, s);
                (8, b)
            }
            MetaValue::Strs(a) => {
                let mut b = 8u32.to_le_bytes().to_vec();
                b.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for s in a {
                    Self::put_str(&mut b, s);
                }
                (9, b)
            }
            MetaValue::I32s(a) => {
                let mut b = 5u32.to_le_bytes().to_vec();
                b.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    b.extend_from_slice(&x.to_le_bytes());
                }
                (9, b)
            }
            MetaValue::U64(x) => (10, x.to_le_bytes().to_vec()),
            MetaValue::F32s(a) => {
                let mut b = 6u32.to_le_bytes().to_vec();
                b.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    b.extend_from_slice(&x.to_le_bytes());
                }
                (9, b)
            }
        };
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&body);
    }

    /// Writes the file: `data(i, buf)` fills `buf` (cleared) with tensor `i`'s bytes;
    /// a typed error when it gives a wrong count. Returns the bytes written.
    pub fn write(
        &self,
        w: &mut impl std::io::Write,
        mut data: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
    ) -> Result<u64> {
        const ALIGN: u64 = 32;
        let mut head = b"GGUF".to_vec();
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            Self::put_str(&mut head, k);
            Self::put_meta(&mut head, v);
        }
        let mut off = 0u64;
        for (name, dims, ty, bytes) in &self.tensors {
            Self::put_str(&mut head, name);
            head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&ty.id().to_le_bytes());
            head.extend_from_slice(&off.to_le_bytes());
            off = (off + bytes).div_ceil(ALIGN) * ALIGN;
        }
        head.resize(
            (head.len() as u64).div_ceil(ALIGN) as usize * ALIGN as usize,
            0,
        );
        w.write_all(&head)?;
        let mut written = head.len() as u64;
        let mut buf = Vec::new();
        for (i, (name, _, _, bytes)) in self.tensors.iter().enumerate() {
            buf.clear();
            data(i, &mut buf)?;
            if buf.len() as u64 != *bytes {
                return Err(Error::Gguf(format!(
                    "tensor `{name}`: {} bytes given, {bytes} expected",
                    buf.len()
                )));
            }
            let pad = bytes.div_ceil(ALIGN) * ALIGN - bytes;
            buf.resize(buf.len() + pad as usize, 0);
            w.write_all(&buf)?;
            written += buf.len() as u64;
        }
        w.flush()?;
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        GgufBuilder::new()
            .meta("general.architecture", Value::Str("llama".into()))
            .meta("llama.block_count", Value::U64(2))
            .meta("llama.rope.freq_base", Value::F64(10000.0))
            .meta(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::Str("a".into()), Value::Str("bc".into())]),
            )
            .tensor_f32("w", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .tensor_f32("b", &[5], &[-1.0; 5])
            .build()
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let g = Gguf::from_bytes(sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.str("general.architecture").unwrap(), "llama");
        assert_eq!(g.u64("llama.block_count").unwrap(), 2);
        assert_eq!(g.f64("llama.rope.freq_base").unwrap(), 10000.0);
        let toks = g
            .require("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(toks[1].as_str(), Some("bc"));
        assert_eq!(g.tensor("w").unwrap().dims, vec![3, 2]);
        assert_eq!(
            g.tensor_f32("w").unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert_eq!(g.tensor_f32("b").unwrap(), vec![-1.0; 5]);
        assert!(matches!(g.tensor("nope"), Err(Error::Gguf(_))));
        assert!(matches!(g.u64("general.architecture"), Err(Error::Gguf(_))));
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let full = sample();
        for cut in 0..full.len() {
            match Gguf::from_bytes(full[..cut].to_vec()) {
                Err(Error::Gguf(_)) => {}
                Err(e) => panic!("cut at {cut}: wrong error {e}"),
                Ok(_) => panic!("cut at {cut}: a truncated file opened"),
            }
        }
    }

    #[test]
    fn bad_magic_version_type() {
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(Gguf::from_bytes(b), Err(Error::Gguf(_))));
        let mut b = sample();
        b[4] = 9;
        assert!(matches!(Gguf::from_bytes(b), Err(Error::Gguf(_))));
        // An unknown tensor type id.
        let b = GgufBuilder::new().tensor_f32("w", &[4], &[0.0; 4]).build();
        let mut bad = b.clone();
        // type id sits right before the 8-byte offset, after name and 1 dim
        let name_end = 24 + 8 + 1 + 4 + 8;
        bad[name_end..name_end + 4].copy_from_slice(&77u32.to_le_bytes());
        let e = Gguf::from_bytes(bad).err().expect("unknown type must fail");
        assert!(
            e.to_string().contains("unknown ggml tensor type id 77"),
            "{e}"
        );
    }

    /// A header that claims a tensor of 2^40 elements (and no data) is refused from the
    /// header alone, before anything of that size is allocated.
    #[test]
    fn a_huge_claimed_tensor_is_refused_before_allocating() {
        let b = GgufBuilder::new().tensor_f32("w", &[4], &[0.0; 4]).build();
        let mut bad = b.clone();
        // The single dim sits after the header (24 bytes), the name (8 + 1) and the rank.
        let dim_at = 24 + 8 + 1 + 4;
        bad[dim_at..dim_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = Gguf::from_bytes(bad).err().expect("must fail");
        assert!(e.to_string().contains("truncated file: tensor `w`"), "{e}");
    }

    /// A NaN or an infinity in a weight (f32 data or a Q4_0 block's f16 scale) is a
    /// typed error naming the tensor, never a silent NaN model.
    #[test]
    fn non_finite_weights_are_typed_errors() {
        let mut w = vec![0.5f32; 64];
        w[17] = f32::NAN;
        let g = Gguf::from_bytes(GgufBuilder::new().tensor_f32("w", &[64], &w).build()).unwrap();
        match g.tensor_f32("w") {
            Err(Error::NonFinite { what, index, .. }) => {
                assert!(what.contains("`w`"), "{what}");
                assert_eq!(index, 17);
            }
            other => panic!("{other:?}"),
        }
        // Q4_0: one block of 32 weights whose f16 scale is +inf.
        let mut block = vec![0u8; 18];
        block[..2].copy_from_slice(&half::f16::INFINITY.to_bits().to_le_bytes());
        block[2..].fill(0x99);
        let g = Gguf::from_bytes(
            GgufBuilder::new()
                .tensor("q", &[32], GgmlType::Q4_0, block)
                .build(),
        )
        .unwrap();
        assert!(matches!(g.tensor_f32("q"), Err(Error::NonFinite { .. })));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]
            /// Random byte changes and truncations of a valid file: the reader returns
            /// a typed error or a file, never panics (and so never allocates what a
            /// corrupt length claims: that would abort).
            #[test]
            fn mutated_files_never_panic(
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                cut in proptest::option::of(any::<prop::sample::Index>()),
            ) {
                let mut b = sample();
                for (at, v) in &edits {
                    let i = at.index(b.len());
                    b[i] = *v;
                }
                if let Some(c) = cut {
                    b.truncate(c.index(b.len()));
                }
                match Gguf::from_bytes(b) {
                    Ok(g) => {
                        // Whatever opened reads its tensors without panicking too.
                        for t in g.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>() {
                            let _ = g.tensor_f32(&t);
                        }
                    }
                    Err(e) => prop_assert!(matches!(e, Error::Gguf(_)), "{e}"),
                }
            }
        }
    }
}
