//! The wire format of Ferry's guest ABI, version 1.
//!
//! A guest (the WASM module that prepares a model's inputs and shapes its
//! outputs) and the host exchange *tensor sets*: a few named tensors plus,
//! from preprocessing, the named feature values the request carried (the
//! values drift is measured on). This crate encodes and decodes that format.
//! It has no dependencies so that it builds for `wasm32-wasip1` guests and
//! for the host alike; `docs/guest-abi.md` is the normative description,
//! for guests written in other languages.
//!
//! # Layout
//! All integers little-endian.
//!
//! ```text
//! tensor set  := magic "FTS1" u32:tensor_count tensor* features?
//! tensor      := str16:name u8:dtype u8:rank u64:dim*rank u64:byte_len bytes
//! features    := u32:feature_count (str16:name u8:kind)* u32:rows value*(rows*feature_count)
//! value       := f64 (kind 0, numeric; NaN = missing) | str16 (kind 1, categorical)
//! str16       := u16:len utf8-bytes
//! ```
//!
//! The features block is optional (absent = end of buffer after the last
//! tensor). Values are stored row by row.
//!
//! # Changing this format
//! The magic carries the version. Do not reorder or reinterpret fields;
//! a new version gets a new magic and guests declare which one they speak
//! through `ferry_abi_version`.

use std::fmt;

/// Magic bytes opening a v1 tensor set.
pub const MAGIC: &[u8; 4] = b"FTS1";
/// The ABI version a guest returns from `ferry_abi_version`.
pub const ABI_VERSION: i32 = 1;
/// Most dimensions a tensor may have. Real models use at most 6 or so;
/// the bound keeps a hostile buffer from declaring huge shape arrays.
pub const MAX_RANK: usize = 16;
/// Most tensors in one set (models have a handful of inputs and outputs).
pub const MAX_TENSORS: usize = 256;
/// Most features in one set.
pub const MAX_FEATURES: usize = 65_536;

/// Status a guest returns: success.
pub const STATUS_OK: i32 = 0;
/// Status a guest returns: the request is malformed (the caller's fault).
pub const STATUS_BAD_INPUT: i32 = 1;
/// Status a guest returns: the guest failed for another reason.
pub const STATUS_INTERNAL: i32 = 2;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 1,
    F64 = 2,
    I64 = 3,
    I32 = 4,
    U8 = 5,
    Bool = 6,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::U8 | DType::Bool => 1,
        }
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Parses a wire code.
    pub fn from_code(code: u8) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::F64,
            3 => DType::I64,
            4 => DType::I32,
            5 => DType::U8,
            6 => DType::Bool,
            _ => return None,
        })
    }

    /// The name used in manifests and JSON (`f32`, `i64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    /// NumPy's type string for it in a `.npy` header (`<f4`, `|b1`, ...).
    pub fn npy_descr(self) -> &'static str {
        match self {
            DType::F32 => "<f4",
            DType::F64 => "<f8",
            DType::I64 => "<i8",
            DType::I32 => "<i4",
            DType::U8 => "|u1",
            DType::Bool => "|b1",
        }
    }

    /// Parses a `.npy` type string as [`DType::npy_descr`] writes it (also
    /// `<u1` and `<b1`, which NumPy reads as the same types).
    pub fn from_npy_descr(descr: &str) -> Option<DType> {
        Some(match descr {
            "<f4" => DType::F32,
            "<f8" => DType::F64,
            "<i8" => DType::I64,
            "<i4" => DType::I32,
            "|u1" | "<u1" => DType::U8,
            "|b1" | "<b1" => DType::Bool,
            _ => return None,
        })
    }

    /// Parses a name as produced by [`DType::name`].
    pub fn from_name(name: &str) -> Option<DType> {
        Some(match name {
            "f32" => DType::F32,
            "f64" => DType::F64,
            "i64" => DType::I64,
            "i32" => DType::I32,
            "u8" => DType::U8,
            "bool" => DType::Bool,
            _ => return None,
        })
    }
}

/// A named tensor with little-endian element bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Raw little-endian element bytes; `len == product(shape) * dtype.size()`.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor of `f32` values.
    pub fn from_f32(name: impl Into<String>, shape: Vec<u64>, values: &[f32]) -> Tensor {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape,
            data,
        }
    }

    /// Number of elements the shape declares.
    pub fn element_count(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
    }

    /// The tensor as a NumPy `.npy` file, byte for byte as `np.save` writes
    /// it (NumPy 2's `format.write_array`): format 1.0 (2.0 for a header
    /// over 64 KiB, which only a tensor of thousands of dimensions needs),
    /// little-endian elements in C order, the header's spare room to grow
    /// the first axis in place, then spaces to a multiple of 64 bytes and a
    /// newline. `np.load` reads it back with this dtype and shape.
    pub fn to_npy(&self) -> Vec<u8> {
        let dims: Vec<String> = self.shape.iter().map(u64::to_string).collect();
        let shape = match dims.len() {
            1 => format!("({},)", dims[0]),
            _ => format!("({})", dims.join(", ")),
        };
        let mut header = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
            self.dtype.npy_descr()
        );
        // NumPy's GROWTH_AXIS_MAX_DIGITS (21) less the first axis's digits.
        if let Some(first) = dims.first() {
            header.extend(std::iter::repeat_n(
                ' ',
                21usize.saturating_sub(first.len()),
            ));
        }
        // The header and its newline, padded so the data starts 64-byte aligned
        // (a whole 64 bytes more when it already would be, as NumPy does); the
        // preamble is the magic, the version and the header's length (2 bytes
        // in 1.0, 4 in 2.0).
        let with_newline = header.len() + 1;
        let padded = |preamble: usize| with_newline + 64 - (preamble + with_newline) % 64;
        let v1 = padded(10) <= usize::from(u16::MAX);
        let total = if v1 { padded(10) } else { padded(12) };
        header.extend(std::iter::repeat_n(' ', total - with_newline));
        header.push('\n');
        let mut out = Vec::with_capacity(12 + total + self.data.len());
        out.extend_from_slice(b"\x93NUMPY");
        if v1 {
            out.extend_from_slice(&[1, 0]);
            out.extend_from_slice(&(total as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&[2, 0]);
            out.extend_from_slice(&(total as u32).to_le_bytes());
        }
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// The elements converted to `f64` (booleans as 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let n = self.dtype.size();
        self.data
            .chunks_exact(n)
            .map(|c| match self.dtype {
                DType::F32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
                DType::F64 => f64::from_le_bytes(c.try_into().unwrap()),
                DType::I64 => i64::from_le_bytes(c.try_into().unwrap()) as f64,
                DType::I32 => i32::from_le_bytes(c.try_into().unwrap()) as f64,
                DType::U8 | DType::Bool => c[0] as f64,
            })
            .collect()
    }
}

/// Kind of a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    Numeric,
    Categorical,
}

/// A feature value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number; NaN means missing.
    Num(f64),
    /// A category.
    Cat(String),
}

/// Named feature values, one row per sample in the request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Features {
    pub names: Vec<(String, FeatureKind)>,
    /// `rows[i][j]` is sample i's value of feature j.
    pub rows: Vec<Vec<Value>>,
}

/// Tensors plus optional features.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TensorSet {
    pub tensors: Vec<Tensor>,
    pub features: Option<Features>,
}

/// Why a buffer is not a valid tensor set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer does not start with `FTS1`.
    BadMagic,
    /// The buffer ends inside a field.
    Truncated,
    /// A count or size is over its limit or inconsistent.
    Invalid(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadMagic => write!(f, "not a tensor set (magic is not FTS1)"),
            DecodeError::Truncated => write!(f, "tensor set is truncated"),
            DecodeError::Invalid(what) => write!(f, "invalid tensor set: {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let len = bytes.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&bytes[..len]);
}

impl TensorSet {
    /// Encodes the set.
    pub fn encode(&self) -> Vec<u8> {
        // Room for everything but categorical values, so a set is written
        // with one allocation (this runs on every request, in the guest).
        let features = self.features.as_ref().map_or(0, |f| {
            8 + f.names.iter().map(|(n, _)| n.len() + 3).sum::<usize>()
                + f.rows.iter().map(|r| 8 * r.len()).sum::<usize>()
        });
        let mut out = Vec::with_capacity(
            8 + features
                + self
                    .tensors
                    .iter()
                    .map(|t| t.data.len() + t.name.len() + 12 + 8 * t.shape.len())
                    .sum::<usize>(),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.tensors.len() as u32).to_le_bytes());
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.push(t.dtype.code());
            out.push(t.shape.len() as u8);
            for d in &t.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&(t.data.len() as u64).to_le_bytes());
            out.extend_from_slice(&t.data);
        }
        if let Some(f) = &self.features {
            out.extend_from_slice(&(f.names.len() as u32).to_le_bytes());
            for (name, kind) in &f.names {
                put_str(&mut out, name);
                out.push(match kind {
                    FeatureKind::Numeric => 0,
                    FeatureKind::Categorical => 1,
                });
            }
            out.extend_from_slice(&(f.rows.len() as u32).to_le_bytes());
            for row in &f.rows {
                for v in row {
                    match v {
                        Value::Num(x) => out.extend_from_slice(&x.to_le_bytes()),
                        Value::Cat(s) => put_str(&mut out, s),
                    }
                }
            }
        }
        out
    }

    /// Decodes a set, checking every count and size against the buffer
    /// before allocating for it.
    pub fn decode(buf: &[u8]) -> Result<TensorSet, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let count = r.u32()? as usize;
        if count > MAX_TENSORS {
            return Err(DecodeError::Invalid("too many tensors"));
        }
        let mut tensors = Vec::with_capacity(count);
        for _ in 0..count {
            let name = r.str16()?;
            let dtype = DType::from_code(r.u8()?).ok_or(DecodeError::Invalid("unknown dtype"))?;
            let rank = r.u8()? as usize;
            if rank > MAX_RANK {
                return Err(DecodeError::Invalid("rank over 16"));
            }
            let mut shape = Vec::with_capacity(rank);
            for _ in 0..rank {
                shape.push(r.u64()?);
            }
            let byte_len = usize::try_from(r.u64()?).map_err(|_| DecodeError::Truncated)?;
            let data = r.take(byte_len)?.to_vec();
            let t = Tensor {
                name,
                dtype,
                shape,
                data,
            };
            match t.element_count() {
                Some(n) if n.checked_mul(dtype.size()) == Some(byte_len) => {}
                _ => return Err(DecodeError::Invalid("data length does not match shape")),
            }
            tensors.push(t);
        }
        let features = if r.pos == buf.len() {
            None
        } else {
            let n = r.u32()? as usize;
            if n > MAX_FEATURES {
                return Err(DecodeError::Invalid("too many features"));
            }
            let mut names = Vec::with_capacity(n);
            for _ in 0..n {
                let name = r.str16()?;
                let kind = match r.u8()? {
                    0 => FeatureKind::Numeric,
                    1 => FeatureKind::Categorical,
                    _ => return Err(DecodeError::Invalid("unknown feature kind")),
                };
                names.push((name, kind));
            }
            let rows_n = r.u32()? as usize;
            // Every value takes at least 2 bytes: bound the row count by the buffer.
            if n > 0 && rows_n.saturating_mul(n).saturating_mul(2) > buf.len() - r.pos {
                return Err(DecodeError::Truncated);
            }
            let mut rows = Vec::with_capacity(rows_n);
            for _ in 0..rows_n {
                let mut row = Vec::with_capacity(n);
                for (_, kind) in &names {
                    row.push(match kind {
                        FeatureKind::Numeric => {
                            Value::Num(f64::from_le_bytes(r.take(8)?.try_into().unwrap()))
                        }
                        FeatureKind::Categorical => Value::Cat(r.str16()?),
                    });
                }
                rows.push(row);
            }
            if r.pos != buf.len() {
                return Err(DecodeError::Invalid("trailing bytes"));
            }
            Some(Features { names, rows })
        };
        Ok(TensorSet { tensors, features })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn str16(&mut self) -> Result<String, DecodeError> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as usize;
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| DecodeError::Invalid("name is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TensorSet {
        TensorSet {
            tensors: vec![
                Tensor::from_f32("x", vec![2, 2], &[1.0, 2.0, 3.0, 4.0]),
                Tensor {
                    name: "label".into(),
                    dtype: DType::I64,
                    shape: vec![1],
                    data: 7i64.to_le_bytes().to_vec(),
                },
            ],
            features: Some(Features {
                names: vec![
                    ("a".into(), FeatureKind::Numeric),
                    ("c".into(), FeatureKind::Categorical),
                ],
                rows: vec![
                    vec![Value::Num(1.5), Value::Cat("red".into())],
                    vec![Value::Num(f64::NAN), Value::Cat("".into())],
                ],
            }),
        }
    }

    #[test]
    fn round_trip_with_and_without_features() {
        let s = sample();
        let back = TensorSet::decode(&s.encode()).unwrap();
        assert_eq!(back.tensors, s.tensors);
        let f = back.features.unwrap();
        assert_eq!(f.names, s.features.as_ref().unwrap().names);
        assert!(matches!(f.rows[1][0], Value::Num(x) if x.is_nan()));
        let plain = TensorSet {
            tensors: s.tensors.clone(),
            features: None,
        };
        assert_eq!(TensorSet::decode(&plain.encode()).unwrap(), plain);
        assert_eq!(back.tensors[0].to_f64_vec(), vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn every_truncation_and_flip_is_an_error_or_valid_never_a_panic() {
        let bytes = sample().encode();
        let without_features = TensorSet {
            features: None,
            ..sample()
        }
        .encode()
        .len();
        for cut in 0..bytes.len() {
            match TensorSet::decode(&bytes[..cut]) {
                Err(_) => {}
                // The features block is optional: a buffer cut right before it
                // is the same tensors without features, and nothing else is valid.
                Ok(set) => {
                    assert_eq!(cut, without_features, "cut at {cut} accepted");
                    assert!(set.features.is_none());
                }
            }
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let _ = TensorSet::decode(&b);
            }
        }
    }

    #[test]
    fn shape_and_length_must_agree() {
        let mut s = sample();
        s.tensors[0].shape = vec![3, 2];
        assert_eq!(
            TensorSet::decode(&s.encode()),
            Err(DecodeError::Invalid("data length does not match shape"))
        );
        assert_eq!(TensorSet::decode(b"XXXX"), Err(DecodeError::BadMagic));
    }
}
