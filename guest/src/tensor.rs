//! `kind = "tensor"` preprocessing: named tensors in JSON, checked against the model and
//! passed through.
//!
//! Request: `{"inputs": {"<name>": {"shape": [..], "data": [..]}}}`, every model input and no
//! other. `data` is flat (`product(shape)` numbers, row-major) and is converted straight into
//! the input's little-endian element bytes as it is parsed, without an intermediate tree, since
//! it may hold a whole image.

use std::fmt;

use ferry_guest_abi::{DType, FeatureKind, Features, MAX_FEATURES, Tensor, TensorSet, Value};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::binary;
use crate::config::{Model, ModelIo, Section};
use crate::error::{Error, bad};
use crate::json::{Listed, Node, Quoted, Str, drain_map, drain_seq, media_type};

/// The `[preprocess]` table of `kind = "tensor"`: no keys besides `kind`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorToml {}

/// Passthrough preprocessing.
#[derive(Debug)]
pub(crate) struct TensorPre {
    inputs: Vec<ModelIo>,
    /// Feature names of the last call, reused while the inputs' widths stay the same.
    names: Vec<(String, FeatureKind)>,
    /// The (input index, width) pairs `names` was built for.
    names_key: Vec<(usize, u64)>,
    /// The last `.npy` header read.
    npy_headers: binary::HeaderCache,
}

impl TensorPre {
    pub(crate) fn from_config(section: &Section, model: &Model) -> Result<TensorPre, Error> {
        let TensorToml {} = section.parse()?;
        Ok(TensorPre {
            inputs: model.inputs.clone(),
            names: Vec::new(),
            names_key: Vec::new(),
            npy_headers: binary::HeaderCache::default(),
        })
    }

    /// Runs preprocessing: the encoded tensor set.
    pub(crate) fn run(&mut self, content_type: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
        let tensors = self.tensors(content_type, body)?;
        let features = self.features(&tensors);
        let set = TensorSet {
            tensors,
            features: Some(features),
        };
        let bytes = set.encode();
        if let Some(f) = set.features {
            self.names = f.names;
        }
        Ok(bytes)
    }

    /// The request's tensors, in model input order.
    pub(crate) fn tensors(
        &mut self,
        content_type: &str,
        body: &[u8],
    ) -> Result<Vec<Tensor>, Error> {
        let media = media_type(content_type);
        match media.as_str() {
            "" | "application/json" => {}
            binary::NPY => return binary::from_npy(&self.inputs, body, &mut self.npy_headers),
            binary::TENSOR_SET => return binary::from_tensor_set(&self.inputs, body),
            _ => {
                return Err(bad(format!(
                    "unsupported content type {} (kind \"tensor\" takes application/json, {} or {})",
                    Quoted(content_type),
                    binary::NPY,
                    binary::TENSOR_SET
                )));
            }
        }
        // Every JSON number takes at least two bytes with its separator: a bound on how many
        // elements the body can hold, so a declared shape never makes us over-allocate.
        let max_elements = body.len() / 2 + 1;
        let mut de = serde_json::Deserializer::from_slice(body);
        let parsed = RequestSeed {
            inputs: &self.inputs,
            max_elements,
        }
        .deserialize(&mut de)
        .and_then(|r| de.end().map(|()| r))
        .map_err(|e| bad(format!("the request body is not valid JSON: {e}")))??;
        Ok(parsed
            .into_iter()
            .zip(&self.inputs)
            .map(|(p, io)| Tensor {
                name: io.name.clone(),
                dtype: io.dtype,
                shape: p.shape,
                data: p.data,
            })
            .collect())
    }

    /// One numeric feature per column of each rank-2 input, named `<input>[j]`.
    ///
    /// All rank-2 inputs must agree on the number of rows (the samples); one that does not is
    /// left out, as is any input that would take the count over [`MAX_FEATURES`].
    fn features(&mut self, tensors: &[Tensor]) -> Features {
        let mut key = Vec::new();
        let mut rows_n = None;
        let mut count = 0usize;
        for (i, t) in tensors.iter().enumerate() {
            let &[n, f] = t.shape.as_slice() else {
                continue;
            };
            if *rows_n.get_or_insert(n) != n {
                continue;
            }
            let Some(total) = usize::try_from(f).ok().and_then(|f| count.checked_add(f)) else {
                continue;
            };
            if total > MAX_FEATURES {
                continue;
            }
            count = total;
            key.push((i, f));
        }
        if key != self.names_key {
            self.names.clear();
            for &(i, f) in &key {
                for j in 0..f {
                    self.names
                        .push((format!("{}[{j}]", tensors[i].name), FeatureKind::Numeric));
                }
            }
            self.names_key = key;
        }
        let rows_n = rows_n.and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
        let mut rows = vec![Vec::with_capacity(count); if count == 0 { 0 } else { rows_n }];
        for &(i, f) in &self.names_key {
            let t = &tensors[i];
            let f = f as usize;
            let values = t.to_f64_vec();
            for (row, chunk) in rows.iter_mut().zip(values.chunks_exact(f.max(1))) {
                row.extend(chunk.iter().map(|&x| Value::Num(x)));
            }
        }
        Features {
            names: std::mem::take(&mut self.names),
            rows,
        }
    }
}

/// An empty buffer with room for a tensor of `elements` elements of `dtype`, or a bad-input
/// error if that many bytes cannot be had (the count overflows, or the guest's memory is
/// exhausted): a request must not be able to make the guest abort on allocation.
pub(crate) fn tensor_buffer(
    elements: Option<usize>,
    dtype: DType,
    what: &str,
) -> Result<Vec<u8>, Error> {
    let mut data = Vec::new();
    match elements.and_then(|n| n.checked_mul(dtype.size())) {
        Some(bytes) if data.try_reserve_exact(bytes).is_ok() => Ok(data),
        Some(bytes) => Err(bad(format!(
            "{what} make a tensor of {bytes} bytes, more than the guest can allocate"
        ))),
        None => Err(bad(format!("{what} make a tensor too large to address"))),
    }
}

/// One parsed input: its shape and element bytes.
#[derive(Debug)]
struct Parsed {
    shape: Vec<u64>,
    data: Vec<u8>,
}

/// Generates the visitor methods for JSON types a visitor does not accept: each returns
/// `Ok(Err(self.wrong_type("<type>")))`, after consuming the value so parsing can finish.
macro_rules! reject_scalars {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Err(self.wrong_type("boolean")))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Err(self.wrong_type("number")))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Err(self.wrong_type("number")))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Err(self.wrong_type("number")))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Err(self.wrong_type("string")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Err(self.wrong_type("null")))
        }
    };
}
macro_rules! reject_seq {
    () => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            drain_seq(&mut seq)?;
            Ok(Err(self.wrong_type("array")))
        }
    };
}
macro_rules! reject_map {
    () => {
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            drain_map(&mut map)?;
            Ok(Err(self.wrong_type("object")))
        }
    };
}

/// The whole request.
struct RequestSeed<'a> {
    inputs: &'a [ModelIo],
    max_elements: usize,
}

impl RequestSeed<'_> {
    fn wrong_type(&self, got: &str) -> Error {
        bad(format!(
            "the request must be a JSON object with \"inputs\", got {got}"
        ))
    }
}

impl<'de> DeserializeSeed<'de> for RequestSeed<'_> {
    type Value = Result<Vec<Parsed>, Error>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed<'_> {
    type Value = Result<Vec<Parsed>, Error>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    reject_scalars!();
    reject_seq!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
            let error = if key != "inputs" {
                bad(format!(
                    "unknown field {} in the request (expected \"inputs\")",
                    Quoted(&key)
                ))
            } else if found.is_some() {
                bad("duplicate field \"inputs\" in the request")
            } else {
                let seed = InputsSeed {
                    inputs: self.inputs,
                    max_elements: self.max_elements,
                };
                match map.next_value_seed(seed)? {
                    Ok(parsed) => {
                        found = Some(parsed);
                        continue;
                    }
                    Err(e) => {
                        drain_map(&mut map)?;
                        return Ok(Err(e));
                    }
                }
            };
            map.next_value::<IgnoredAny>()?;
            drain_map(&mut map)?;
            return Ok(Err(error));
        }
        Ok(found.ok_or_else(|| bad("missing field \"inputs\" in the request")))
    }
}

/// The `inputs` object.
struct InputsSeed<'a> {
    inputs: &'a [ModelIo],
    max_elements: usize,
}

impl InputsSeed<'_> {
    fn wrong_type(&self, got: &str) -> Error {
        bad(format!(
            "\"inputs\": expected an object of named tensors, got {got}"
        ))
    }
}

impl<'de> DeserializeSeed<'de> for InputsSeed<'_> {
    type Value = Result<Vec<Parsed>, Error>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for InputsSeed<'_> {
    type Value = Result<Vec<Parsed>, Error>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of named tensors")
    }
    reject_scalars!();
    reject_seq!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut parsed: Vec<Option<Parsed>> = self.inputs.iter().map(|_| None).collect();
        while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
            let error = match self.inputs.iter().position(|io| io.name == key) {
                None => {
                    let names: Vec<&str> = self.inputs.iter().map(|io| io.name.as_str()).collect();
                    bad(format!(
                        "unknown input {} (the model's inputs: {})",
                        Quoted(&key),
                        Listed(&names)
                    ))
                }
                Some(i) if parsed[i].is_some() => bad(format!("duplicate input {}", Quoted(&key))),
                Some(i) => {
                    let seed = InputSeed {
                        io: &self.inputs[i],
                        max_elements: self.max_elements,
                    };
                    match map.next_value_seed(seed)? {
                        Ok(p) => {
                            parsed[i] = Some(p);
                            continue;
                        }
                        Err(e) => {
                            drain_map(&mut map)?;
                            return Ok(Err(e));
                        }
                    }
                }
            };
            map.next_value::<IgnoredAny>()?;
            drain_map(&mut map)?;
            return Ok(Err(error));
        }
        let mut out = Vec::with_capacity(parsed.len());
        for (p, io) in parsed.into_iter().zip(self.inputs) {
            match p {
                Some(p) => out.push(p),
                None => {
                    return Ok(Err(bad(format!(
                        "missing input {} (the request must give every model input)",
                        Quoted(&io.name)
                    ))));
                }
            }
        }
        Ok(Ok(out))
    }
}

/// One `{"shape": [..], "data": [..]}` object.
struct InputSeed<'a> {
    io: &'a ModelIo,
    max_elements: usize,
}

impl InputSeed<'_> {
    fn wrong_type(&self, got: &str) -> Error {
        bad(format!(
            "input {}: expected an object with \"shape\" and \"data\", got {got}",
            Quoted(&self.io.name)
        ))
    }

    /// Checks a parsed shape against the model's; returns the element count.
    fn check_shape(&self, shape: &[u64]) -> Result<usize, Error> {
        binary::check_shape(self.io, shape)
    }
}

impl<'de> DeserializeSeed<'de> for InputSeed<'_> {
    type Value = Result<Parsed, Error>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for InputSeed<'_> {
    type Value = Result<Parsed, Error>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with shape and data")
    }
    reject_scalars!();
    reject_seq!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let name = Quoted(&self.io.name);
        let mut shape: Option<(Vec<u64>, usize)> = None;
        let mut data: Option<(Vec<u8>, usize)> = None;
        while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
            let result = match key.as_ref() {
                "shape" if shape.is_none() => {
                    let node = map.next_value::<Node<'de>>()?;
                    parse_shape(&node, &self.io.name)
                        .and_then(|s| self.check_shape(&s).map(|n| shape = Some((s, n))))
                }
                "data" if data.is_none() => {
                    let reserve = shape.as_ref().map_or(0, |s| s.1).min(self.max_elements);
                    let seed = DataSeed {
                        io: self.io,
                        reserve,
                    };
                    map.next_value_seed(seed)?.map(|d| data = Some(d))
                }
                "shape" | "data" => {
                    map.next_value::<IgnoredAny>()?;
                    Err(bad(format!(
                        "input {name}: duplicate field {}",
                        Quoted(&key)
                    )))
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    Err(bad(format!(
                        "input {name}: unknown field {} (expected \"shape\" or \"data\")",
                        Quoted(&key)
                    )))
                }
            };
            if let Err(e) = result {
                drain_map(&mut map)?;
                return Ok(Err(e));
            }
        }
        let Some((shape, expected)) = shape else {
            return Ok(Err(bad(format!("input {name}: missing field \"shape\""))));
        };
        let Some((data, count)) = data else {
            return Ok(Err(bad(format!("input {name}: missing field \"data\""))));
        };
        if count != expected {
            return Ok(Err(bad(format!(
                "input {name}: data has {count} values, shape {shape:?} needs {expected}"
            ))));
        }
        Ok(Ok(Parsed { shape, data }))
    }
}

fn parse_shape(node: &Node<'_>, input: &str) -> Result<Vec<u64>, Error> {
    let name = Quoted(input);
    let Node::Array(dims) = node else {
        return Err(bad(format!(
            "input {name}: \"shape\": expected an array of non-negative integers, got {}",
            node.kind()
        )));
    };
    if dims.len() > ferry_guest_abi::MAX_RANK {
        return Err(bad(format!(
            "input {name}: \"shape\" has {} dimensions, at most {} are supported",
            dims.len(),
            ferry_guest_abi::MAX_RANK
        )));
    }
    dims.iter()
        .enumerate()
        .map(|(i, d)| match d {
            Node::U64(n) => Ok(*n),
            other => Err(bad(format!(
                "input {name}: shape[{i}]: expected a non-negative integer, got {}",
                describe(other)
            ))),
        })
        .collect()
}

/// `number -1`, `number 2.5`, `string`: what a value is, for messages about numbers.
fn describe(node: &Node<'_>) -> String {
    match node {
        Node::I64(n) => format!("{n}"),
        Node::F64(x) => format!("{x:?}"),
        other => other.kind().to_owned(),
    }
}

/// The `data` array, converted to the input's element bytes as it is read.
struct DataSeed<'a> {
    io: &'a ModelIo,
    /// Elements to reserve room for (bounded by the body's size).
    reserve: usize,
}

impl DataSeed<'_> {
    fn wrong_type(&self, got: &str) -> Error {
        bad(format!(
            "input {}: \"data\": expected an array of numbers, got {got}",
            Quoted(&self.io.name)
        ))
    }
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = Result<(Vec<u8>, usize), Error>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataSeed<'_> {
    type Value = Result<(Vec<u8>, usize), Error>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers")
    }
    reject_scalars!();
    reject_map!();

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let dtype = self.io.dtype;
        let mut out = Vec::with_capacity(self.reserve * dtype.size());
        let mut count = 0usize;
        while let Some(node) = seq.next_element::<Node<'de>>()? {
            if let Err(problem) = push_element(&mut out, dtype, &node) {
                drain_seq(&mut seq)?;
                return Ok(Err(bad(format!(
                    "input {}: data[{count}]: {problem}",
                    Quoted(&self.io.name)
                ))));
            }
            count += 1;
        }
        Ok(Ok((out, count)))
    }
}

/// Appends one JSON value as an element of `dtype`, or says what is wrong with it.
pub(crate) fn push_element(out: &mut Vec<u8>, dtype: DType, node: &Node<'_>) -> Result<(), String> {
    if dtype == DType::Bool {
        let b = match node {
            Node::Bool(b) => *b,
            Node::U64(0) => false,
            Node::U64(1) => true,
            other => {
                return Err(format!(
                    "expected a boolean (or 0 or 1), got {}",
                    describe_value(other)
                ));
            }
        };
        out.push(u8::from(b));
        return Ok(());
    }
    if !matches!(node, Node::U64(_) | Node::I64(_) | Node::F64(_)) {
        let hint = if matches!(node, Node::Array(_)) {
            " (data is flat: product(shape) numbers)"
        } else {
            ""
        };
        return Err(format!("expected a number, got {}{hint}", node.kind()));
    }
    match dtype {
        DType::F64 => out.extend_from_slice(&node.as_f64().unwrap_or_default().to_le_bytes()),
        DType::F32 => {
            let x = node.as_f64().unwrap_or_default();
            if x.abs() > f64::from(f32::MAX) {
                return Err(format!("{} is out of range for f32", describe_value(node)));
            }
            out.extend_from_slice(&(x as f32).to_le_bytes());
        }
        DType::I64 | DType::I32 | DType::U8 => {
            let int = match *node {
                Node::U64(n) => i64::try_from(n).ok(),
                Node::I64(n) => Some(n),
                // 2^63 is exactly representable; every f64 below it in magnitude that is
                // integral converts exactly.
                Node::F64(x)
                    if x.fract() == 0.0
                        && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&x) =>
                {
                    Some(x as i64)
                }
                Node::F64(x) if x.fract() != 0.0 => {
                    return Err(format!(
                        "{x:?} is not an integer (the input is {})",
                        dtype.name()
                    ));
                }
                _ => None,
            };
            let range_error = || {
                format!(
                    "{} is out of range for {}",
                    describe_value(node),
                    dtype.name()
                )
            };
            let int = int.ok_or_else(range_error)?;
            match dtype {
                DType::I64 => out.extend_from_slice(&int.to_le_bytes()),
                DType::I32 => out.extend_from_slice(
                    &i32::try_from(int).map_err(|_| range_error())?.to_le_bytes(),
                ),
                _ => out.push(u8::try_from(int).map_err(|_| range_error())?),
            }
        }
        DType::Bool => unreachable!("handled above"),
    }
    Ok(())
}

fn describe_value(node: &Node<'_>) -> String {
    match node {
        Node::U64(n) => format!("{n}"),
        Node::I64(n) => format!("{n}"),
        Node::F64(x) => format!("{x:?}"),
        other => other.kind().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::config::tests::config_json;

    fn pre(inputs: &str) -> TensorPre {
        let c = parse(config_json("{}", "{}", inputs, "[]").as_bytes()).unwrap();
        TensorPre::from_config(&c.preprocess, &c.model).unwrap()
    }

    fn iris() -> TensorPre {
        pre(r#"[{"name": "x", "dtype": "f32", "shape": [null, 4]}]"#)
    }

    fn err(p: &mut TensorPre, body: &str) -> String {
        let e = p.run("application/json", body.as_bytes()).unwrap_err();
        assert_eq!(e.status(), 1, "{e}");
        e.message().to_owned()
    }

    #[test]
    fn passes_tensors_through_with_features() {
        let mut p = iris();
        let body = r#"{"inputs": {"x": {"data": [1, 2, 3, 4.5, 5, 6, 7, 8], "shape": [2, 4]}}}"#;
        for _ in 0..2 {
            let set = TensorSet::decode(
                &p.run("application/json; charset=utf-8", body.as_bytes())
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(set.tensors.len(), 1);
            let t = &set.tensors[0];
            assert_eq!(
                (t.name.as_str(), t.dtype, t.shape.as_slice()),
                ("x", DType::F32, &[2u64, 4][..])
            );
            assert_eq!(t.to_f64_vec(), [1.0, 2.0, 3.0, 4.5, 5.0, 6.0, 7.0, 8.0]);
            let f = set.features.unwrap();
            let names: Vec<&str> = f.names.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["x[0]", "x[1]", "x[2]", "x[3]"]);
            assert_eq!(f.rows.len(), 2);
            assert_eq!(f.rows[1][3], Value::Num(8.0));
        }
    }

    #[test]
    fn converts_to_every_dtype() {
        let mut p = pre(
            r#"[{"name": "a", "dtype": "i64", "shape": [2]}, {"name": "b", "dtype": "i32", "shape": [2]},
                {"name": "c", "dtype": "u8", "shape": [2]}, {"name": "d", "dtype": "bool", "shape": [3]},
                {"name": "e", "dtype": "f64", "shape": []}]"#,
        );
        let body = r#"{"inputs": {"e": {"shape": [], "data": [0.1]}, "a": {"shape": [2], "data": [-3, 4.0]},
            "b": {"shape": [2], "data": [2147483647, -1]}, "c": {"shape": [2], "data": [0, 255]},
            "d": {"shape": [3], "data": [true, 0, 1]}}}"#;
        let set = TensorSet::decode(&p.run("", body.as_bytes()).unwrap()).unwrap();
        let names: Vec<&str> = set.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["a", "b", "c", "d", "e"],
            "model order, not request order"
        );
        assert_eq!(
            set.tensors[0].data,
            [(-3i64).to_le_bytes(), 4i64.to_le_bytes()].concat()
        );
        assert_eq!(set.tensors[1].to_f64_vec(), [2147483647.0, -1.0]);
        assert_eq!(set.tensors[2].data, [0, 255]);
        assert_eq!(set.tensors[3].data, [1, 0, 1]);
        assert_eq!(set.tensors[4].data, 0.1f64.to_le_bytes());
        // No rank-2 input: an empty features block.
        assert_eq!(set.features.unwrap(), Features::default());
    }

    #[test]
    fn rejects_bad_requests_precisely() {
        let mut p = iris();
        let cases = [
            (
                r#"[1]"#,
                r#"the request must be a JSON object with "inputs", got array"#,
            ),
            (r#"{}"#, r#"missing field "inputs" in the request"#),
            (
                r#"{"input": {}}"#,
                r#"unknown field "input" in the request (expected "inputs")"#,
            ),
            (
                r#"{"inputs": []}"#,
                r#""inputs": expected an object of named tensors, got array"#,
            ),
            (
                r#"{"inputs": {}}"#,
                r#"missing input "x" (the request must give every model input)"#,
            ),
            (
                r#"{"inputs": {"y": 1}}"#,
                r#"unknown input "y" (the model's inputs: "x")"#,
            ),
            (
                r#"{"inputs": {"x": [1, 2, 3, 4]}}"#,
                r#"input "x": expected an object with "shape" and "data", got array"#,
            ),
            (
                r#"{"inputs": {"x": {"data": [1, 2, 3, 4]}}}"#,
                r#"input "x": missing field "shape""#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1, 4]}}}"#,
                r#"input "x": missing field "data""#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1, 4], "data": [], "dtype": "f32"}}}"#,
                r#"input "x": unknown field "dtype" (expected "shape" or "data")"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1, 4], "shape": [1, 4]}}}"#,
                r#"input "x": duplicate field "shape""#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [4], "data": [1, 2, 3, 4]}}}"#,
                r#"input "x": shape [4] has rank 1, the model expects rank 2 ([?, 4])"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1, 5], "data": [1, 2, 3, 4, 5]}}}"#,
                r#"input "x": shape [1, 5] does not match the model's [?, 4] (dimension 1 must be 4)"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1, -4], "data": []}}}"#,
                r#"input "x": shape[1]: expected a non-negative integer, got -4"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1.5, 4], "data": []}}}"#,
                r#"input "x": shape[0]: expected a non-negative integer, got 1.5"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": "1,4", "data": []}}}"#,
                r#"input "x": "shape": expected an array of non-negative integers, got string"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [2, 4], "data": [1, 2, 3, 4]}}}"#,
                r#"input "x": data has 4 values, shape [2, 4] needs 8"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1, 4], "data": [1, 2, "3", 4]}}}"#,
                r#"input "x": data[2]: expected a number, got string"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1, 4], "data": [[1, 2, 3, 4]]}}}"#,
                r#"input "x": data[0]: expected a number, got array (data is flat: product(shape) numbers)"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1, 4], "data": [1, 2, 3, null]}}}"#,
                r#"input "x": data[3]: expected a number, got null"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1, 4], "data": [1, 2, 3, 1e39]}}}"#,
                r#"input "x": data[3]: 1e39 is out of range for f32"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [1, 4], "data": {"0": 1}}}}"#,
                r#"input "x": "data": expected an array of numbers, got object"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [4294967296, 4294967296, 4294967296], "data": []}}}"#,
                r#"input "x": shape [4294967296, 4294967296, 4294967296] has rank 3"#,
            ),
            (
                r#"{"inputs": {"x": {"shape": [18446744073709551615, 4], "data": []}}}"#,
                r#"input "x": shape [18446744073709551615, 4] is too large"#,
            ),
        ];
        for (body, expected) in cases {
            let msg = err(&mut p, body);
            assert!(
                msg.starts_with(expected),
                "{body}\n  got:  {msg}\n  want: {expected}"
            );
        }
        assert!(
            err(
                &mut p,
                r#"{"inputs": {"x": {"shape": [1, 4], "data": [1, 2, 3, 4]}}"#
            )
            .starts_with("the request body is not valid JSON")
        );
        let e = p.run("text/csv", b"1,2,3,4").unwrap_err();
        assert_eq!(
            e.message(),
            r#"unsupported content type "text/csv" (kind "tensor" takes application/json, application/x-npy or application/x-ferry-tensors)"#
        );
    }

    #[test]
    fn rejects_bad_integers_and_booleans() {
        let mut p = pre(
            r#"[{"name": "i", "dtype": "i64", "shape": [null]}, {"name": "u", "dtype": "u8", "shape": [null]},
                {"name": "b", "dtype": "bool", "shape": [null]}, {"name": "s", "dtype": "i32", "shape": [null]}]"#,
        );
        let ok = r#""u": {"shape": [0], "data": []}, "b": {"shape": [0], "data": []}, "s": {"shape": [0], "data": []}"#;
        let cases = [
            (
                "[2.5]",
                r#"input "i": data[0]: 2.5 is not an integer (the input is i64)"#,
            ),
            (
                "[9223372036854775808]",
                r#"input "i": data[0]: 9223372036854775808 is out of range for i64"#,
            ),
            (
                "[1e300]",
                r#"input "i": data[0]: 1e300 is out of range for i64"#,
            ),
        ];
        for (data, expected) in cases {
            let body = format!(r#"{{"inputs": {{"i": {{"shape": [1], "data": {data}}}, {ok}}}}}"#);
            assert_eq!(err(&mut p, &body), expected);
        }
        let body =
            r#"{"inputs": {"i": {"shape": [0], "data": []}, "u": {"shape": [1], "data": [256]}}}"#;
        assert_eq!(
            err(&mut p, body),
            r#"input "u": data[0]: 256 is out of range for u8"#
        );
        let body =
            r#"{"inputs": {"i": {"shape": [0], "data": []}, "u": {"shape": [1], "data": [-1]}}}"#;
        assert_eq!(
            err(&mut p, body),
            r#"input "u": data[0]: -1 is out of range for u8"#
        );
        let body = r#"{"inputs": {"b": {"shape": [1], "data": [2]}}}"#;
        assert_eq!(
            err(&mut p, body),
            r#"input "b": data[0]: expected a boolean (or 0 or 1), got 2"#
        );
        let body = r#"{"inputs": {"s": {"shape": [1], "data": [2147483648]}}}"#;
        assert_eq!(
            err(&mut p, body),
            r#"input "s": data[0]: 2147483648 is out of range for i32"#
        );
    }

    #[test]
    fn huge_tensors_are_bad_input_not_an_abort() {
        assert_eq!(
            tensor_buffer(Some(3), DType::F64, "x").unwrap().capacity(),
            24
        );
        let e = tensor_buffer(None, DType::F32, "9 records").unwrap_err();
        assert_eq!(
            (e.status(), e.message()),
            (1, "9 records make a tensor too large to address")
        );
        let e = tensor_buffer(Some(usize::MAX / 2), DType::F32, "9 records").unwrap_err();
        assert_eq!(e.message(), "9 records make a tensor too large to address");
        let e = tensor_buffer(Some(1 << 60), DType::F32, "7000 image(s)").unwrap_err();
        assert_eq!(
            e.message(),
            format!(
                "7000 image(s) make a tensor of {} bytes, more than the guest can allocate",
                1u64 << 62
            )
        );
    }

    #[test]
    fn features_skip_inputs_with_other_row_counts() {
        let mut p = pre(
            r#"[{"name": "a", "dtype": "f32", "shape": [null, 2]}, {"name": "b", "dtype": "i64", "shape": [null, 1]},
                {"name": "c", "dtype": "f32", "shape": [null, 1]}]"#,
        );
        let body = r#"{"inputs": {"a": {"shape": [2, 2], "data": [1, 2, 3, 4]}, "b": {"shape": [2, 1], "data": [5, 6]},
            "c": {"shape": [3, 1], "data": [7, 8, 9]}}}"#;
        let f = TensorSet::decode(&p.run("", body.as_bytes()).unwrap())
            .unwrap()
            .features
            .unwrap();
        let names: Vec<&str> = f.names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a[0]", "a[1]", "b[0]"]);
        assert_eq!(
            f.rows,
            [[1.0, 2.0, 5.0], [3.0, 4.0, 6.0]].map(|r| r.map(Value::Num).to_vec())
        );
    }
}
