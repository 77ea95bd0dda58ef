//! Binary tensor requests for `kind = "tensor"`: a large tensor (an image of 3x224x224 floats,
//! 600 KB) is copied, not parsed from text. Two forms (`docs/project-file.md`):
//!
//! - `application/x-npy`: one NumPy `.npy` array (format versions 1, 2 and 3, as `np.save`
//!   writes them), for a model with one input. Its element type must be the input's (`<f4`
//!   for f32, `<f8` f64, `<i8` i64, `<i4` i32, `|u1` u8, `|b1` bool): no silent conversion,
//!   since NumPy's default float64 sent to an f32 model is a mistake worth a message.
//!   C order only; little-endian only.
//! - `application/x-ferry-tensors`: a tensor set in the guest ABI's wire format (`FTS1`,
//!   `docs/guest-abi.md`), every model input once, by name; any features block is ignored.
//!
//! Every count and length is checked against the body before anything is allocated, and
//! every failure is a bad-input error naming the problem.

use ferry_guest_abi::{DType, Tensor, TensorSet};

use crate::config::ModelIo;
use crate::error::{Error, bad};
use crate::json::Quoted;

/// Media type of a `.npy` body.
pub(crate) const NPY: &str = "application/x-npy";
/// Media type of a tensor set in the ABI's wire format.
pub(crate) const TENSOR_SET: &str = "application/x-ferry-tensors";

/// Longest `.npy` header accepted. NumPy writes headers of at most a few hundred bytes
/// (padded to 64); the bound keeps a hostile length from costing a large scan.
const MAX_NPY_HEADER: usize = 64 * 1024;

/// Checks a shape against the model input's; returns the element count.
pub(crate) fn check_shape(io: &ModelIo, shape: &[u64]) -> Result<usize, Error> {
    let name = Quoted(&io.name);
    if shape.len() != io.shape.len() {
        return Err(bad(format!(
            "input {name}: shape {shape:?} has rank {}, the model expects rank {} ({})",
            shape.len(),
            io.shape.len(),
            io.shape_display()
        )));
    }
    if let Some(d) = (0..shape.len()).find(|&d| io.shape[d].is_some_and(|m| m != shape[d])) {
        return Err(bad(format!(
            "input {name}: shape {shape:?} does not match the model's {} (dimension {d} must be {})",
            io.shape_display(),
            io.shape[d].unwrap_or_default()
        )));
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
        .ok_or_else(|| bad(format!("input {name}: shape {shape:?} is too large")))
}

/// The tensors of a `.npy` body, for a model with one input. `headers` keeps the last header
/// parsed: a client sends the same header request after request.
pub(crate) fn from_npy(
    inputs: &[ModelIo],
    body: &[u8],
    headers: &mut HeaderCache,
) -> Result<Vec<Tensor>, Error> {
    let [io] = inputs else {
        let names: Vec<&str> = inputs.iter().map(|io| io.name.as_str()).collect();
        return Err(bad(format!(
            "a .npy body carries one array, the model has {} inputs ({}): send {TENSOR_SET} or JSON",
            inputs.len(),
            crate::json::Listed(&names)
        )));
    };
    let npy = parse_npy(body, headers)?;
    if npy.dtype != io.dtype {
        return Err(bad(format!(
            "input {}: the array's element type is {}, the model's input is {} (in NumPy: x.astype(np.{}))",
            Quoted(&io.name),
            npy.descr,
            io.dtype.name(),
            numpy_name(io.dtype)
        )));
    }
    let n = check_shape(io, npy.shape)?;
    if n.checked_mul(io.dtype.size()) != Some(npy.data.len()) {
        return Err(bad(format!(
            "the .npy data holds {} bytes, its shape {:?} of {} needs {}",
            npy.data.len(),
            npy.shape,
            io.dtype.name(),
            n.saturating_mul(io.dtype.size())
        )));
    }
    Ok(vec![Tensor {
        name: io.name.clone(),
        dtype: io.dtype,
        shape: npy.shape.to_vec(),
        data: npy.data.to_vec(),
    }])
}

/// The tensors of a tensor-set body, in model input order.
pub(crate) fn from_tensor_set(inputs: &[ModelIo], body: &[u8]) -> Result<Vec<Tensor>, Error> {
    let set = TensorSet::decode(body).map_err(|e| {
        bad(format!(
            "the body is not a valid {TENSOR_SET} tensor set: {e}"
        ))
    })?;
    let mut found: Vec<Option<Tensor>> = inputs.iter().map(|_| None).collect();
    for t in set.tensors {
        let Some(i) = inputs.iter().position(|io| io.name == t.name) else {
            let names: Vec<&str> = inputs.iter().map(|io| io.name.as_str()).collect();
            return Err(bad(format!(
                "unknown input {} (the model's inputs: {})",
                Quoted(&t.name),
                crate::json::Listed(&names)
            )));
        };
        let io = &inputs[i];
        if found[i].is_some() {
            return Err(bad(format!("duplicate input {}", Quoted(&t.name))));
        }
        if t.dtype != io.dtype {
            return Err(bad(format!(
                "input {}: element type {}, the model expects {}",
                Quoted(&t.name),
                t.dtype.name(),
                io.dtype.name()
            )));
        }
        // The decoder checked the data length against the shape.
        check_shape(io, &t.shape)?;
        found[i] = Some(t);
    }
    inputs
        .iter()
        .zip(found)
        .map(|(io, t)| t.ok_or_else(|| bad(format!("missing input {}", Quoted(&io.name)))))
        .collect()
}

/// A parsed `.npy` body, borrowing its data (and its header's fields from the cache).
#[derive(Debug)]
struct Npy<'a, 'h> {
    descr: &'h str,
    dtype: DType,
    shape: &'h [u64],
    data: &'a [u8],
}

/// A `.npy` header's fields.
#[derive(Debug)]
struct Header {
    descr: String,
    dtype: DType,
    shape: Vec<u64>,
}

/// The last `.npy` header that parsed, by its bytes: parsing the header (a Python dictionary
/// literal) cost more than the rest of a small request.
#[derive(Debug, Default)]
pub(crate) struct HeaderCache {
    last: Option<(Vec<u8>, Header)>,
}

fn numpy_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::I64 => "int64",
        DType::I32 => "int32",
        DType::U8 => "uint8",
        DType::Bool => "bool_",
    }
}

fn parse_npy<'a, 'h>(body: &'a [u8], cache: &'h mut HeaderCache) -> Result<Npy<'a, 'h>, Error> {
    let not_npy = |why: &str| bad(format!("the body is not a .npy array: {why}"));
    let rest = body
        .strip_prefix(b"\x93NUMPY")
        .ok_or_else(|| not_npy("it does not start with \\x93NUMPY"))?;
    let (&[major, _minor], rest) = rest
        .split_first_chunk::<2>()
        .ok_or_else(|| not_npy("truncated"))?;
    let (len, rest) = match major {
        1 => {
            let (l, r) = rest
                .split_first_chunk::<2>()
                .ok_or_else(|| not_npy("truncated"))?;
            (u16::from_le_bytes(*l) as usize, r)
        }
        2 | 3 => {
            let (l, r) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| not_npy("truncated"))?;
            (u32::from_le_bytes(*l) as usize, r)
        }
        v => {
            return Err(not_npy(&format!(
                "format version {v} (1, 2 and 3 are read)"
            )));
        }
    };
    if len > MAX_NPY_HEADER {
        return Err(not_npy(&format!(
            "header of {len} bytes (at most {MAX_NPY_HEADER})"
        )));
    }
    if rest.len() < len {
        return Err(not_npy("truncated header"));
    }
    let (header, data) = rest.split_at(len);
    if cache
        .last
        .as_ref()
        .is_none_or(|(bytes, _)| bytes.as_slice() != header)
    {
        cache.last = None;
        let parsed = parse_header_bytes(header)?;
        cache.last = Some((header.to_vec(), parsed));
    }
    let Some((_, h)) = &cache.last else {
        unreachable!("the header was just stored")
    };
    if h.dtype == DType::Bool && data.iter().any(|&b| b > 1) {
        return Err(bad("the .npy bool array holds a byte other than 0 or 1"));
    }
    Ok(Npy {
        descr: &h.descr,
        dtype: h.dtype,
        shape: &h.shape,
        data,
    })
}

/// A header's fields, or why the body is not a `.npy` array this guest reads.
fn parse_header_bytes(header: &[u8]) -> Result<Header, Error> {
    let not_npy = |why: &str| bad(format!("the body is not a .npy array: {why}"));
    let header = std::str::from_utf8(header).map_err(|_| not_npy("header is not text"))?;
    let (descr, fortran, shape) = parse_header(header).map_err(|e| not_npy(&e))?;
    if fortran {
        return Err(bad(
            "the .npy array is in Fortran order: send a C-ordered array (np.ascontiguousarray)",
        ));
    }
    let Some(dtype) = DType::from_npy_descr(&descr) else {
        return Err(bad(format!(
            "the .npy element type {} is not supported (little-endian f4 f8 i8 i4 u1 b1 are)",
            Quoted(&descr)
        )));
    };
    Ok(Header {
        descr,
        dtype,
        shape,
    })
}

/// The header dictionary, `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3), }`:
/// exactly these three keys, in any order, as Python's `repr` writes them.
fn parse_header(header: &str) -> Result<(String, bool, Vec<u64>), String> {
    let mut p = Cursor {
        s: header.trim_end_matches(['\n', ' ', '\0']).as_bytes(),
        pos: 0,
    };
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.skip_ws();
        p.expect(b':')?;
        p.skip_ws();
        match key.as_str() {
            "descr" if descr.is_none() => descr = Some(p.string()?),
            "fortran_order" if fortran.is_none() => fortran = Some(p.boolean()?),
            "shape" if shape.is_none() => shape = Some(p.tuple()?),
            _ => return Err(format!("unexpected or repeated key '{key}' in the header")),
        }
        p.skip_ws();
        if !p.eat(b',') {
            p.skip_ws();
            p.expect(b'}')?;
            break;
        }
    }
    p.skip_ws();
    if p.pos != p.s.len() {
        return Err("text after the header's dictionary".into());
    }
    match (descr, fortran, shape) {
        (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
        _ => Err("the header lacks descr, fortran_order or shape".into()),
    }
}

struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn skip_ws(&mut self) {
        while self
            .s
            .get(self.pos)
            .is_some_and(|c| c.is_ascii_whitespace())
        {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.pos) == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "expected '{}' at byte {} of the header",
                c as char, self.pos
            ))
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = match self.s.get(self.pos) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(format!(
                    "expected a string at byte {} of the header",
                    self.pos
                ));
            }
        };
        self.pos += 1;
        let start = self.pos;
        while self
            .s
            .get(self.pos)
            .is_some_and(|&c| c != quote && c != b'\\')
        {
            self.pos += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.pos])
            .map_err(|_| "a string in the header is not UTF-8".to_string())?
            .to_string();
        self.expect(quote)?;
        Ok(text)
    }

    fn boolean(&mut self) -> Result<bool, String> {
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.pos..].starts_with(word) {
                self.pos += word.len();
                return Ok(v);
            }
        }
        Err("fortran_order is not True or False".into())
    }

    fn tuple(&mut self) -> Result<Vec<u64>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            if dims.len() == ferry_guest_abi::MAX_RANK {
                return Err(format!(
                    "the shape has more than {} dimensions",
                    ferry_guest_abi::MAX_RANK
                ));
            }
            let start = self.pos;
            while self.s.get(self.pos).is_some_and(u8::is_ascii_digit) {
                self.pos += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
            dims.push(
                digits
                    .parse::<u64>()
                    .map_err(|_| format!("bad dimension at byte {start} of the header"))?,
            );
            self.skip_ws();
            if !self.eat(b',') {
                self.skip_ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`super::from_npy`] with nothing cached.
    fn from_npy(inputs: &[ModelIo], body: &[u8]) -> Result<Vec<Tensor>, Error> {
        super::from_npy(inputs, body, &mut HeaderCache::default())
    }

    fn io(dtype: DType, shape: &[Option<u64>]) -> ModelIo {
        ModelIo {
            name: "x".into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// A `.npy` file as NumPy 2 writes it (version 1.0, header padded to 64 with a newline).
    pub(crate) fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// One cache across requests: a new header is parsed (not the cached one reused), a
    /// refused header is refused again and leaves nothing behind.
    #[test]
    fn the_header_cache_never_answers_for_another_header() {
        let model = [io(DType::F32, &[None, Some(2)])];
        let mut cache = HeaderCache::default();
        let mut read = |body: &[u8]| super::from_npy(&model, body, &mut cache);
        let one = npy("<f4", "(1, 2)", &f32s(&[1., 2.]));
        let two = npy("<f4", "(2, 2)", &f32s(&[1., 2., 3., 4.]));
        let f8 = npy("<f8", "(1, 2)", &[0; 16]);
        let mut fortran = one.clone();
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran[at..at + 5].copy_from_slice(b"True ");
        for _ in 0..2 {
            assert_eq!(read(&one).unwrap()[0].shape, [1, 2]);
            assert_eq!(read(&two).unwrap()[0].shape, [2, 2]);
            // The same header with too little data: the cached header, the data checked.
            let e = read(&two[..two.len() - 4]).unwrap_err();
            assert!(e.message().contains("holds 12 bytes"), "{}", e.message());
            let e = read(&f8).unwrap_err();
            assert!(
                e.message().contains("element type is <f8"),
                "{}",
                e.message()
            );
            let e = read(&fortran).unwrap_err();
            assert!(e.message().contains("Fortran order"), "{}", e.message());
            assert_eq!(read(&one).unwrap()[0].to_f64_vec(), [1., 2.]);
        }
    }

    #[test]
    fn reads_what_numpy_writes() {
        let body = npy("<f4", "(2, 4)", &f32s(&[1., 2., 3., 4., 5., 6., 7., 8.]));
        let t = from_npy(&[io(DType::F32, &[None, Some(4)])], &body).unwrap();
        assert_eq!(t[0].shape, vec![2, 4]);
        assert_eq!(t[0].to_f64_vec(), vec![1., 2., 3., 4., 5., 6., 7., 8.]);
        // A one-dimensional array and a scalar.
        let t = from_npy(
            &[io(DType::F32, &[Some(3)])],
            &npy("<f4", "(3,)", &f32s(&[1., 2., 3.])),
        );
        assert_eq!(t.unwrap()[0].shape, vec![3]);
        let t = from_npy(
            &[io(DType::I64, &[])],
            &npy("<i8", "()", &7i64.to_le_bytes()),
        );
        assert_eq!(t.unwrap()[0].shape, Vec::<u64>::new());
        // Version 2 (a u32 header length).
        let mut v2 = npy("|u1", "(2,)", &[1, 2]);
        v2[6] = 2;
        let len = u16::from_le_bytes([v2[8], v2[9]]) as u32;
        v2.splice(8..10, len.to_le_bytes());
        let t = from_npy(&[io(DType::U8, &[Some(2)])], &v2).unwrap();
        assert_eq!(t[0].data, vec![1, 2]);
    }

    #[test]
    fn refuses_malformed_arrays_precisely() {
        let model = [io(DType::F32, &[None, Some(4)])];
        let four = f32s(&[0.; 4]);
        let good = npy("<f4", "(1, 4)", &four);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "does not start with"),
            (b"{\"inputs\": {}}".to_vec(), "does not start with"),
            (good[..8].to_vec(), "truncated"),
            (good[..20].to_vec(), "truncated header"),
            (good[..good.len() - 1].to_vec(), "holds 15 bytes"),
            ([good.clone(), vec![0]].concat(), "holds 17 bytes"),
            (npy("<f8", "(1, 4)", &[0; 32]), "x.astype(np.float32)"),
            (npy(">f4", "(1, 4)", &four), "not supported"),
            (npy("<f4", "(1, 5)", &[0; 20]), "dimension 1 must be 4"),
            (npy("<f4", "(4,)", &four), "rank 1"),
            (npy("<f4", "(1, x)", &four), "bad dimension"),
            (npy("<f4", "(18446744073709551615, 4)", &four), "too large"),
            (
                npy("<f4", "(1, 99999999999999999999)", &four),
                "bad dimension",
            ),
            (
                good.iter()
                    .map(|&b| if b == b'F' { b'T' } else { b })
                    .collect(),
                "fortran_order is not",
            ),
        ];
        for (body, want) in cases {
            let e = from_npy(&model, &body).unwrap_err();
            assert_eq!(e.status(), 1, "{e}");
            assert!(e.message().contains(want), "{want}: {}", e.message());
        }
        // Fortran order, a huge declared header, an unknown version, a bad bool.
        let at = good.windows(5).position(|w| w == b"False").unwrap();
        let mut fortran = good.clone();
        fortran.splice(at..at + 5, *b"True ");
        let e = from_npy(&model, &fortran).unwrap_err();
        assert!(e.message().contains("Fortran order"), "{}", e.message());
        let mut huge = good.clone();
        huge[6] = 2;
        huge.splice(8..10, u32::MAX.to_le_bytes());
        let e = from_npy(&model, &huge).unwrap_err();
        assert!(e.message().contains("at most"), "{}", e.message());
        let mut v9 = good.clone();
        v9[6] = 9;
        assert!(
            from_npy(&model, &v9)
                .unwrap_err()
                .message()
                .contains("version 9")
        );
        let e = from_npy(&[io(DType::Bool, &[Some(1)])], &npy("|b1", "(1,)", &[2])).unwrap_err();
        assert!(e.message().contains("0 or 1"), "{}", e.message());
        // Two inputs: a .npy cannot say which.
        let two = [io(DType::F32, &[Some(1)]), io(DType::F32, &[Some(1)])];
        let e = from_npy(&two, &npy("<f4", "(1,)", &f32s(&[1.]))).unwrap_err();
        assert!(
            e.message().contains("application/x-ferry-tensors"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn tensor_sets_name_every_input_once() {
        let model = [
            io(DType::F32, &[None, Some(2)]),
            ModelIo {
                name: "y".into(),
                dtype: DType::I64,
                shape: vec![Some(1)],
            },
        ];
        let x = Tensor::from_f32("x", vec![1, 2], &[1., 2.]);
        let y = Tensor {
            name: "y".into(),
            dtype: DType::I64,
            shape: vec![1],
            data: 5i64.to_le_bytes().to_vec(),
        };
        let set = |tensors: Vec<Tensor>| {
            TensorSet {
                tensors,
                features: None,
            }
            .encode()
        };
        // Any order; returned in the model's.
        let got = from_tensor_set(&model, &set(vec![y.clone(), x.clone()])).unwrap();
        assert_eq!((got[0].name.as_str(), got[1].name.as_str()), ("x", "y"));
        let bad_cases: Vec<(Vec<u8>, &str)> = vec![
            (set(vec![x.clone()]), "missing input \"y\""),
            (
                set(vec![x.clone(), x.clone(), y.clone()]),
                "duplicate input",
            ),
            (
                set(vec![
                    x.clone(),
                    y.clone(),
                    Tensor::from_f32("z", vec![1], &[1.]),
                ]),
                "unknown input \"z\"",
            ),
            (
                set(vec![Tensor::from_f32("y", vec![1], &[1.]), x.clone()]),
                "element type f32",
            ),
            (
                set(vec![Tensor::from_f32("x", vec![1, 3], &[1.; 3]), y.clone()]),
                "dimension 1",
            ),
            (b"FTS1\xff\xff\xff\xff".to_vec(), "not a valid"),
            (
                set(vec![x.clone(), y.clone()])[..30].to_vec(),
                "not a valid",
            ),
            (b"garbage".to_vec(), "not a valid"),
        ];
        for (body, want) in bad_cases {
            let e = from_tensor_set(&model, &body).unwrap_err();
            assert_eq!(e.status(), 1, "{e}");
            assert!(e.message().contains(want), "{want}: {}", e.message());
        }
    }
}
