//! Postprocessing: the model's outputs (a tensor set) to the JSON response.
//!
//! The response is written straight from the tensors by [`Json`] (no `serde_json::Value` in
//! between): keys are literals, labels and output names are escaped once when the
//! configuration is read, and numbers go through serde_json's own formatter, so the bytes are
//! the ones `serde_json::to_writer` produced for the same structure.
//! Keys come in a fixed order: `"predictions"` then `"outputs"`, and within `"outputs"` the
//! model's output order. Elements keep their type: `f32` values are written at `f32`
//! precision (`0.1`, not `0.10000000149011612`), integers as JSON integers, booleans as
//! `true`/`false`, and non-finite floats as `null`.

use std::cmp::Ordering;
use std::ops::{Add, Div, Sub};

use ferry_guest_abi::{DType, Tensor, TensorSet};
use serde::Deserialize;
use serde_json::ser::{CompactFormatter, Formatter};

use crate::config::{Model, ModelIo, Section};
use crate::error::{Error, bad, internal};
use crate::json::Quoted;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorToml {}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Activation {
    #[default]
    None,
    Softmax,
    Sigmoid,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassificationToml {
    output: Option<String>,
    #[serde(default)]
    activation: Activation,
    labels: Option<Vec<String>>,
    top_k: Option<u64>,
    include_outputs: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegressionToml {
    output: Option<String>,
    include_outputs: Option<bool>,
}

#[derive(Debug)]
enum Kind {
    Tensor,
    Classification {
        output: usize,
        activation: Activation,
        /// The labels as JSON strings (quoted and escaped).
        labels: Option<Vec<String>>,
        top_k: usize,
    },
    Regression {
        output: usize,
    },
}

/// Postprocessing, ready to run.
#[derive(Debug)]
pub(crate) struct Post {
    outputs: Vec<ModelIo>,
    /// Each output's key in the response: its name as a JSON string, then `:`.
    output_keys: Vec<String>,
    kind: Kind,
    include_outputs: bool,
}

impl Post {
    pub(crate) fn from_config(section: &Section, model: &Model) -> Result<Post, Error> {
        let outputs = model.outputs.clone();
        let (kind, include_outputs) = match section.kind.as_str() {
            "tensor" => {
                let TensorToml {} = section.parse()?;
                (Kind::Tensor, true)
            }
            "classification" => {
                let t: ClassificationToml = section.parse()?;
                let (output, io) = scores_output(model, t.output.as_deref(), true)?;
                let top_k = match t.top_k {
                    None => 1,
                    Some(0) => return Err(section.error("top_k", "must be at least 1")),
                    Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
                };
                if t.labels.as_ref().is_some_and(Vec::is_empty) {
                    return Err(section.error(
                        "labels",
                        "must not be empty (leave it out for class indices)",
                    ));
                }
                if let Some(columns) = columns(&io.shape) {
                    let classes = classes(columns, t.activation);
                    if let Some(labels) = &t.labels
                        && labels.len() != classes
                    {
                        return Err(section.error(
                            "labels",
                            format!(
                                "{} labels, but the model output {} has {classes} classes",
                                labels.len(),
                                Quoted(&io.name)
                            ),
                        ));
                    }
                    if top_k > classes {
                        return Err(section.error(
                            "top_k",
                            format!("{top_k} is more than the {classes} classes"),
                        ));
                    }
                }
                let kind = Kind::Classification {
                    output,
                    activation: t.activation,
                    labels: t
                        .labels
                        .map(|labels| labels.iter().map(|l| json_string(l)).collect()),
                    top_k,
                };
                (kind, t.include_outputs.unwrap_or(true))
            }
            "regression" => {
                let t: RegressionToml = section.parse()?;
                let (output, _) = scores_output(model, t.output.as_deref(), false)?;
                (
                    Kind::Regression { output },
                    t.include_outputs.unwrap_or(true),
                )
            }
            other => {
                return Err(bad(format!(
                    "postprocess.kind: unknown kind {} (expected \"tensor\", \"classification\" or \"regression\")",
                    Quoted(other)
                )));
            }
        };
        Ok(Post {
            output_keys: outputs.iter().map(|o| json_string(&o.name) + ":").collect(),
            outputs,
            kind,
            include_outputs,
        })
    }

    /// Runs postprocessing on an encoded tensor set: the JSON response.
    pub(crate) fn run(&self, tensor_set: &[u8]) -> Result<Vec<u8>, Error> {
        let set = TensorSet::decode(tensor_set).map_err(|e| {
            internal(format!(
                "the model's outputs are not a valid tensor set: {e}"
            ))
        })?;
        self.respond(&set)
    }

    /// The JSON response for decoded outputs.
    pub(crate) fn respond(&self, set: &TensorSet) -> Result<Vec<u8>, Error> {
        let ordered = self.ordered(set)?;
        let elements: usize = ordered.iter().map(|t| t.data.len() / t.dtype.size()).sum();
        // A guess at the response's size (about 12 bytes per number), capped: it only saves
        // reallocations.
        let mut json = Json(Vec::with_capacity(
            elements.saturating_mul(12).saturating_add(64).min(1 << 24),
        ));
        json.raw("{");
        match &self.kind {
            Kind::Tensor => {}
            Kind::Classification {
                output,
                activation,
                labels,
                top_k,
            } => {
                let predictions =
                    classify(ordered[*output], *activation, labels.as_deref(), *top_k)?;
                json.raw("\"predictions\":[");
                for (i, p) in predictions.iter().enumerate() {
                    json.comma(i);
                    p.write(&mut json);
                }
                json.raw("]");
            }
            Kind::Regression { output } => {
                let predictions = regress(ordered[*output])?;
                json.raw("\"predictions\":[");
                for (i, p) in predictions.iter().enumerate() {
                    json.comma(i);
                    json.raw("{\"value\":");
                    match p {
                        RegressionValue::One(x) => json.num(*x),
                        RegressionValue::Many(xs) => {
                            json.raw("[");
                            for (j, x) in xs.iter().enumerate() {
                                json.comma(j);
                                json.num(*x);
                            }
                            json.raw("]");
                        }
                    }
                    json.raw("}");
                }
                json.raw("]");
            }
        }
        if self.include_outputs {
            if !matches!(self.kind, Kind::Tensor) {
                json.raw(",");
            }
            json.raw("\"outputs\":{");
            for (i, (t, key)) in ordered.iter().zip(&self.output_keys).enumerate() {
                json.comma(i);
                json.raw(key);
                json.raw("{\"shape\":[");
                for (j, d) in t.shape.iter().enumerate() {
                    json.comma(j);
                    json.u64(*d);
                }
                json.raw("],\"data\":[");
                let n = t.data.len() / t.dtype.size();
                for j in 0..n {
                    json.comma(j);
                    json.num(Num::at(t, j));
                }
                json.raw("]}");
            }
            json.raw("}");
        }
        json.raw("}");
        Ok(json.0)
    }

    /// The set's tensors in model output order; every model output exactly once.
    fn ordered<'a>(&self, set: &'a TensorSet) -> Result<Vec<&'a Tensor>, Error> {
        if let Some(t) = set
            .tensors
            .iter()
            .find(|t| !self.outputs.iter().any(|o| o.name == t.name))
        {
            return Err(internal(format!(
                "the model's outputs include {}, which is not a declared output",
                Quoted(&t.name)
            )));
        }
        self.outputs
            .iter()
            .map(|o| {
                let mut found = set.tensors.iter().filter(|t| t.name == o.name);
                match (found.next(), found.next()) {
                    (Some(t), None) => Ok(t),
                    (None, _) => Err(internal(format!(
                        "the model's outputs lack {}",
                        Quoted(&o.name)
                    ))),
                    (Some(_), Some(_)) => Err(internal(format!(
                        "the model's outputs have {} twice",
                        Quoted(&o.name)
                    ))),
                }
            })
            .collect()
    }
}

/// The output classification or regression reads: `name`, else the first floating-point one.
fn scores_output<'a>(
    model: &'a Model,
    name: Option<&str>,
    need_float: bool,
) -> Result<(usize, &'a ModelIo), Error> {
    let float = |io: &ModelIo| matches!(io.dtype, DType::F32 | DType::F64);
    match name {
        Some(name) => {
            let (i, io) = model.output(name, "postprocess.output")?;
            if need_float && !float(io) {
                return Err(bad(format!(
                    "postprocess.output: the model output {} has dtype {}; classification needs scores (f32 or f64)",
                    Quoted(&io.name),
                    io.dtype.name()
                )));
            }
            Ok((i, io))
        }
        None => model.outputs.iter().enumerate().find(|(_, io)| float(io)).ok_or_else(|| {
            bad("the model has no floating-point output: set postprocess.output to the one to read")
        }),
    }
}

/// Columns per sample of an output of this shape (everything after the first dimension), if
/// they are all fixed.
fn columns(shape: &[Option<u64>]) -> Option<usize> {
    match shape {
        [] | [_] => Some(1),
        [_, rest @ ..] => rest.iter().try_fold(1usize, |acc, d| {
            acc.checked_mul(usize::try_from((*d)?).ok()?)
        }),
    }
}

/// Classes a row of `columns` scores stands for: a single sigmoid column is binary.
fn classes(columns: usize, activation: Activation) -> usize {
    if columns == 1 && activation == Activation::Sigmoid {
        2
    } else {
        columns
    }
}

/// The samples of an output: `(rows, columns)`. A scalar is one sample, `[N]` is N samples of
/// one column, `[N, ...]` is N samples of the product of the other dimensions.
fn rows(t: &Tensor) -> Result<(usize, usize), Error> {
    let elements = t.data.len() / t.dtype.size();
    let n = match t.shape.first() {
        None => 1,
        Some(&n) => usize::try_from(n).map_err(|_| internal("output too large"))?,
    };
    if n == 0 {
        return Ok((0, 0));
    }
    let columns = elements / n;
    if columns == 0 {
        return Err(internal(format!(
            "the model output {} has shape {:?}: no values per sample",
            Quoted(&t.name),
            t.shape
        )));
    }
    Ok((n, columns))
}

/// One element, keeping its type.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    F32(f32),
    F64(f64),
    I64(i64),
    Bool(bool),
}

impl Num {
    fn at(t: &Tensor, i: usize) -> Num {
        let size = t.dtype.size();
        let Some(b) = t.data.get(i * size..(i + 1) * size) else {
            return Num::F64(f64::NAN);
        };
        let mut buf = [0u8; 8];
        buf[..size].copy_from_slice(b);
        match t.dtype {
            DType::F32 => Num::F32(f32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]])),
            DType::F64 => Num::F64(f64::from_le_bytes(buf)),
            DType::I64 => Num::I64(i64::from_le_bytes(buf)),
            DType::I32 => Num::I64(i64::from(i32::from_le_bytes([
                buf[0], buf[1], buf[2], buf[3],
            ]))),
            DType::U8 => Num::I64(i64::from(buf[0])),
            DType::Bool => Num::Bool(buf[0] != 0),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::F32(x) => f64::from(x),
            Num::F64(x) => x,
            Num::I64(n) => n as f64,
            Num::Bool(b) => f64::from(u8::from(b)),
        }
    }
}

/// A JSON string literal for `s` (quoted and escaped), as serde_json writes it.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// The response being written.
struct Json(Vec<u8>);

impl Json {
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A comma before every element but the first.
    fn comma(&mut self, index: usize) {
        if index > 0 {
            self.0.push(b',');
        }
    }

    /// A number as `serde_json` writes it: the shortest representation that reads back as
    /// the same value, integers as integers, and non-finite floats as `null`.
    fn num(&mut self, n: Num) {
        let out = &mut self.0;
        // Writing to a Vec cannot fail.
        let _ = match n {
            Num::F32(x) if x.is_finite() => CompactFormatter.write_f32(out, x),
            Num::F64(x) if x.is_finite() => CompactFormatter.write_f64(out, x),
            Num::F32(_) | Num::F64(_) => CompactFormatter.write_null(out),
            Num::I64(v) => CompactFormatter.write_i64(out, v),
            Num::Bool(b) => CompactFormatter.write_bool(out, b),
        };
    }

    fn u64(&mut self, n: u64) {
        let _ = CompactFormatter.write_u64(&mut self.0, n);
    }

    fn label(&mut self, label: Label<'_>) {
        match label {
            Label::Given(quoted) => self.raw(quoted),
            Label::Index(i) => {
                self.raw("\"");
                self.u64(i as u64);
                self.raw("\"");
            }
        }
    }
}

/// A class's label: the configured one (already a JSON string), or its index as a string.
#[derive(Clone, Copy)]
enum Label<'a> {
    Given(&'a str),
    Index(usize),
}

struct Scored<'a> {
    label: Label<'a>,
    class: usize,
    score: Num,
}

impl Scored<'_> {
    /// `"label":..,"class":..,"score":..` (the fields, without braces).
    fn write_fields(&self, json: &mut Json) {
        json.raw("\"label\":");
        json.label(self.label);
        json.raw(",\"class\":");
        json.u64(self.class as u64);
        json.raw(",\"score\":");
        json.num(self.score);
    }
}

struct ClassPrediction<'a> {
    best: Scored<'a>,
    top_k: Option<Vec<Scored<'a>>>,
}

impl ClassPrediction<'_> {
    fn write(&self, json: &mut Json) {
        json.raw("{");
        self.best.write_fields(json);
        if let Some(top) = &self.top_k {
            json.raw(",\"top_k\":[");
            for (i, s) in top.iter().enumerate() {
                json.comma(i);
                json.raw("{");
                s.write_fields(json);
                json.raw("}");
            }
            json.raw("]");
        }
        json.raw("}");
    }
}

/// Ranks `NaN` below every number, so a broken score is never the prediction.
fn rank_key(x: f64) -> f64 {
    if x.is_nan() { f64::NEG_INFINITY } else { x }
}

fn classify<'a>(
    t: &Tensor,
    activation: Activation,
    labels: Option<&'a [String]>,
    top_k: usize,
) -> Result<Vec<ClassPrediction<'a>>, Error> {
    let (n, columns) = rows(t)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let classes = classes(columns, activation);
    if let Some(labels) = labels
        && labels.len() != classes
    {
        return Err(internal(format!(
            "postprocess.labels has {} labels, but the model output {} has {classes} classes",
            labels.len(),
            Quoted(&t.name)
        )));
    }
    let label = |k: usize| labels.map_or(Label::Index(k), |l| Label::Given(&l[k]));
    let as_num = |x: f64| {
        if t.dtype == DType::F32 {
            Num::F32(x as f32)
        } else {
            Num::F64(x)
        }
    };
    let k = top_k.min(classes);
    let mut scores = Vec::with_capacity(classes);
    let mut order: Vec<usize> = Vec::with_capacity(classes);
    let mut predictions = Vec::with_capacity(n);
    for row in 0..n {
        scores.clear();
        scores.extend((row * columns..(row + 1) * columns).map(|i| Num::at(t, i).as_f64()));
        activate(&mut scores, activation, t.dtype);
        order.clear();
        order.extend(0..classes);
        // Highest score first; ties go to the lower class index (the sort is stable).
        order.sort_by(|&a, &b| {
            rank_key(scores[b])
                .partial_cmp(&rank_key(scores[a]))
                .unwrap_or(Ordering::Equal)
        });
        let scored = |c: usize| Scored {
            label: label(c),
            class: c,
            score: as_num(scores[c]),
        };
        predictions.push(ClassPrediction {
            best: scored(order[0]),
            top_k: (top_k > 1).then(|| order[..k].iter().map(|&c| scored(c)).collect()),
        });
    }
    Ok(predictions)
}

/// Applies the activation to one row's scores in place (a single sigmoid column becomes
/// `[1 - p, p]`), computing in the output's precision: `f32` for an `f32` output, as a float32
/// framework would (the values are `f64` here only as storage; `f32` converts exactly).
fn activate(scores: &mut Vec<f64>, activation: Activation, dtype: DType) {
    if dtype == DType::F32 {
        activate_in::<f32>(scores, activation);
    } else {
        activate_in::<f64>(scores, activation);
    }
}

/// The float operations the activations need.
trait Real: Copy + PartialOrd + Add<Output = Self> + Sub<Output = Self> + Div<Output = Self> {
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
real!(f32);
real!(f64);

fn activate_in<T: Real>(scores: &mut Vec<f64>, activation: Activation) {
    match activation {
        Activation::None => {}
        Activation::Sigmoid => {
            for x in scores.iter_mut() {
                let v = T::from_f64(*x);
                *x = (T::ONE / (T::ONE + (T::ZERO - v).exp())).to_f64();
            }
            if scores.len() == 1 {
                let p = T::from_f64(scores[0]);
                scores.clear();
                scores.extend([(T::ONE - p).to_f64(), p.to_f64()]);
            }
        }
        Activation::Softmax => {
            // Subtract the row's maximum, exponentiate, divide by the sum (summed in order).
            let max = scores
                .iter()
                .fold(T::NEG_INFINITY, |m, &x| m.max(T::from_f64(x)));
            let mut sum = T::ZERO;
            for x in scores.iter_mut() {
                let e = (T::from_f64(*x) - max).exp();
                sum = sum + e;
                *x = e.to_f64();
            }
            for x in scores.iter_mut() {
                *x = (T::from_f64(*x) / sum).to_f64();
            }
        }
    }
}

enum RegressionValue {
    One(Num),
    Many(Vec<Num>),
}

fn regress(t: &Tensor) -> Result<Vec<RegressionValue>, Error> {
    let (n, columns) = rows(t)?;
    Ok((0..n)
        .map(|row| {
            if columns == 1 {
                RegressionValue::One(Num::at(t, row))
            } else {
                RegressionValue::Many(
                    (row * columns..(row + 1) * columns)
                        .map(|i| Num::at(t, i))
                        .collect(),
                )
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::config::tests::config_json;

    const OUTPUTS: &str = r#"[{"name": "label", "dtype": "i64", "shape": [null]},
                             {"name": "probabilities", "dtype": "f32", "shape": [null, 3]}]"#;

    fn build(post: &str, outputs: &str) -> Result<Post, Error> {
        let c = parse(config_json("{}", post, "[]", outputs).as_bytes()).unwrap();
        Post::from_config(&c.postprocess, &c.model)
    }

    fn i64s(name: &str, shape: Vec<u64>, v: &[i64]) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: DType::I64,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn f64s(name: &str, shape: Vec<u64>, v: &[f64]) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: DType::F64,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn iris_outputs() -> TensorSet {
        TensorSet {
            tensors: vec![
                Tensor::from_f32(
                    "probabilities",
                    vec![2, 3],
                    &[0.1, 0.7, 0.2, 0.5, 0.25, 0.25],
                ),
                i64s("label", vec![2], &[1, 0]),
            ],
            features: None,
        }
    }

    fn respond(p: &Post, set: &TensorSet) -> String {
        String::from_utf8(p.run(&set.encode()).unwrap()).unwrap()
    }

    #[test]
    fn numbers_are_written_as_serde_json_writes_them() {
        let f32s = [
            0.0f32,
            -0.0,
            1.0,
            -1.5,
            0.1,
            1e-8,
            3.4028235e38,
            f32::MIN_POSITIVE,
            1.0e-45,
            16_777_217.0,
            123_456.79,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let f64s = [
            0.0f64,
            -0.0,
            0.1,
            1e300,
            5e-324,
            2.0f64.powi(60),
            f64::NAN,
            f64::NEG_INFINITY,
        ];
        let mut cases: Vec<(Num, String)> = Vec::new();
        // A deterministic spread of bit patterns besides the edge cases.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f32::from_bits(x as u32);
            let d = f64::from_bits(x);
            cases.push((Num::F32(f), serde_json::to_string(&f).unwrap()));
            cases.push((Num::F64(d), serde_json::to_string(&d).unwrap()));
            cases.push((
                Num::I64(x as i64),
                serde_json::to_string(&(x as i64)).unwrap(),
            ));
        }
        cases.extend(f32s.map(|f| (Num::F32(f), serde_json::to_string(&f).unwrap())));
        cases.extend(f64s.map(|f| (Num::F64(f), serde_json::to_string(&f).unwrap())));
        cases.extend([i64::MIN, i64::MAX, 0].map(|n| (Num::I64(n), n.to_string())));
        cases.extend([true, false].map(|b| (Num::Bool(b), b.to_string())));
        for (n, want) in cases {
            let mut json = Json(Vec::new());
            json.num(n);
            assert_eq!(String::from_utf8(json.0).unwrap(), want, "{n:?}");
        }
    }

    #[test]
    fn labels_and_output_names_are_escaped_once_and_read_back() {
        let outputs = r#"[{"name": "sc\"ores\n", "dtype": "f32", "shape": [null, 3]}]"#;
        let p = build(
            r#"{"kind": "classification", "labels": ["a\"b", "ü\\", "tab\there"], "top_k": 3}"#,
            outputs,
        )
        .unwrap();
        let set = TensorSet {
            tensors: vec![Tensor::from_f32("sc\"ores\n", vec![1, 3], &[0.1, 0.2, 0.7])],
            features: None,
        };
        let json = respond(&p, &set);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["predictions"][0]["label"], "tab\there", "{json}");
        assert_eq!(v["predictions"][0]["top_k"][1]["label"], "ü\\");
        assert_eq!(v["predictions"][0]["top_k"][2]["label"], "a\"b");
        assert_eq!(
            v["outputs"]["sc\"ores\n"]["shape"],
            serde_json::json!([1, 3])
        );
        assert!(json.contains(r#""sc\"ores\n":{"shape""#), "{json}");
    }

    #[test]
    fn tensor_passthrough_in_model_order_with_types_kept() {
        let p = build("{}", OUTPUTS).unwrap();
        assert_eq!(
            respond(&p, &iris_outputs()),
            r#"{"outputs":{"label":{"shape":[2],"data":[1,0]},"probabilities":{"shape":[2,3],"data":[0.1,0.7,0.2,0.5,0.25,0.25]}}}"#
        );
        let outputs = r#"[{"name": "a", "dtype": "f32", "shape": [3]}, {"name": "b", "dtype": "bool", "shape": [2]},
                          {"name": "c", "dtype": "u8", "shape": []}, {"name": "d", "dtype": "i32", "shape": [1]}]"#;
        let p = build(r#"{"kind": "tensor"}"#, outputs).unwrap();
        let set = TensorSet {
            tensors: vec![
                Tensor::from_f32("a", vec![3], &[f32::NAN, f32::INFINITY, -0.5]),
                Tensor {
                    name: "b".into(),
                    dtype: DType::Bool,
                    shape: vec![2],
                    data: vec![0, 1],
                },
                Tensor {
                    name: "c".into(),
                    dtype: DType::U8,
                    shape: vec![],
                    data: vec![255],
                },
                Tensor {
                    name: "d".into(),
                    dtype: DType::I32,
                    shape: vec![1],
                    data: (-7i32).to_le_bytes().to_vec(),
                },
            ],
            features: None,
        };
        assert_eq!(
            respond(&p, &set),
            r#"{"outputs":{"a":{"shape":[3],"data":[null,null,-0.5]},"b":{"shape":[2],"data":[false,true]},"c":{"shape":[],"data":[255]},"d":{"shape":[1],"data":[-7]}}}"#
        );
    }

    #[test]
    fn classification_with_labels_and_top_k() {
        let post = r#"{"kind": "classification", "labels": ["setosa", "versicolor", "virginica"], "top_k": 2}"#;
        let p = build(post, OUTPUTS).unwrap();
        let json = respond(&p, &iris_outputs());
        assert_eq!(
            json,
            concat!(
                r#"{"predictions":["#,
                r#"{"label":"versicolor","class":1,"score":0.7,"top_k":[{"label":"versicolor","class":1,"score":0.7},{"label":"virginica","class":2,"score":0.2}]},"#,
                r#"{"label":"setosa","class":0,"score":0.5,"top_k":[{"label":"setosa","class":0,"score":0.5},{"label":"versicolor","class":1,"score":0.25}]}],"#,
                r#""outputs":{"label":{"shape":[2],"data":[1,0]},"probabilities":{"shape":[2,3],"data":[0.1,0.7,0.2,0.5,0.25,0.25]}}}"#
            ),
            "ties go to the lower class"
        );
        let p = build(
            r#"{"kind": "classification", "include_outputs": false}"#,
            OUTPUTS,
        )
        .unwrap();
        assert_eq!(
            respond(&p, &iris_outputs()),
            r#"{"predictions":[{"label":"1","class":1,"score":0.7},{"label":"0","class":0,"score":0.5}]}"#
        );
    }

    #[test]
    fn softmax_and_sigmoid() {
        let outputs = r#"[{"name": "logits", "dtype": "f64", "shape": [null, 2]}]"#;
        let p = build(
            r#"{"kind": "classification", "activation": "softmax", "include_outputs": false}"#,
            outputs,
        )
        .unwrap();
        let set = TensorSet {
            tensors: vec![f64s("logits", vec![1, 2], &[0.0, 2f64.ln()])],
            features: None,
        };
        let json = respond(&p, &set);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["predictions"][0]["class"], 1);
        assert!((v["predictions"][0]["score"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);

        // A single sigmoid column is binary: [1 - p, p].
        let outputs = r#"[{"name": "logit", "dtype": "f32", "shape": [null, 1]}]"#;
        let post = r#"{"kind": "classification", "activation": "sigmoid", "labels": ["no", "yes"], "top_k": 2, "include_outputs": false}"#;
        let p = build(post, outputs).unwrap();
        let set = TensorSet {
            tensors: vec![Tensor::from_f32("logit", vec![2, 1], &[0.0, -3.0])],
            features: None,
        };
        let v: serde_json::Value = serde_json::from_str(&respond(&p, &set)).unwrap();
        assert_eq!(v["predictions"][0]["label"], "no", "0.5 ties go to class 0");
        assert_eq!(v["predictions"][1]["label"], "no");
        let p1 = v["predictions"][1]["top_k"][1]["score"].as_f64().unwrap();
        assert!((p1 - 1.0 / (1.0 + 3f64.exp())).abs() < 1e-7);

        // Multi-column sigmoid: independent scores; NaN is never the prediction.
        let outputs = r#"[{"name": "y", "dtype": "f64", "shape": [null, 3]}]"#;
        let p = build(
            r#"{"kind": "classification", "activation": "sigmoid", "include_outputs": false}"#,
            outputs,
        )
        .unwrap();
        let set = TensorSet {
            tensors: vec![f64s("y", vec![1, 3], &[f64::NAN, -1.0, 1.0])],
            features: None,
        };
        assert_eq!(
            respond(&p, &set),
            r#"{"predictions":[{"label":"2","class":2,"score":0.7310585786300049}]}"#
        );
    }

    #[test]
    fn regression_scalar_and_vector() {
        let outputs = r#"[{"name": "y", "dtype": "f32", "shape": [null, 1]}, {"name": "z", "dtype": "i64", "shape": [null, 2]}]"#;
        let p = build(
            r#"{"kind": "regression", "include_outputs": false}"#,
            outputs,
        )
        .unwrap();
        let set = TensorSet {
            tensors: vec![
                Tensor::from_f32("y", vec![2, 1], &[3.2, -1.0]),
                i64s("z", vec![2, 2], &[1, 2, 3, 4]),
            ],
            features: None,
        };
        assert_eq!(
            respond(&p, &set),
            r#"{"predictions":[{"value":3.2},{"value":-1.0}]}"#
        );
        let p = build(r#"{"kind": "regression", "output": "z"}"#, outputs).unwrap();
        assert_eq!(
            respond(&p, &set),
            r#"{"predictions":[{"value":[1,2]},{"value":[3,4]}],"outputs":{"y":{"shape":[2,1],"data":[3.2,-1.0]},"z":{"shape":[2,2],"data":[1,2,3,4]}}}"#
        );
        // A rank-1 output is one value per sample; an empty batch gives no predictions.
        let outputs = r#"[{"name": "y", "dtype": "f64", "shape": [null]}]"#;
        let p = build(
            r#"{"kind": "regression", "include_outputs": false}"#,
            outputs,
        )
        .unwrap();
        let set = TensorSet {
            tensors: vec![f64s("y", vec![2], &[0.5, 1.5])],
            features: None,
        };
        assert_eq!(
            respond(&p, &set),
            r#"{"predictions":[{"value":0.5},{"value":1.5}]}"#
        );
        let set = TensorSet {
            tensors: vec![f64s("y", vec![0], &[])],
            features: None,
        };
        assert_eq!(respond(&p, &set), r#"{"predictions":[]}"#);
    }

    #[test]
    fn rejects_bad_configurations() {
        let cases = [
            (
                r#"{"kind": "clasification"}"#,
                OUTPUTS,
                r#"postprocess.kind: unknown kind "clasification" (expected "tensor", "classification" or "regression")"#,
            ),
            (
                r#"{"kind": "tensor", "output": "x"}"#,
                OUTPUTS,
                r#"postprocess (kind "tensor"): unknown field `output`"#,
            ),
            (
                r#"{"kind": "classification", "output": "nope"}"#,
                OUTPUTS,
                r#"postprocess.output: the model has no output "nope" (its outputs: "label", "probabilities")"#,
            ),
            (
                r#"{"kind": "classification", "output": "label"}"#,
                OUTPUTS,
                r#"postprocess.output: the model output "label" has dtype i64; classification needs scores (f32 or f64)"#,
            ),
            (
                r#"{"kind": "classification", "labels": ["a", "b"]}"#,
                OUTPUTS,
                r#"postprocess.labels: 2 labels, but the model output "probabilities" has 3 classes"#,
            ),
            (
                r#"{"kind": "classification", "labels": []}"#,
                OUTPUTS,
                "postprocess.labels: must not be empty",
            ),
            (
                r#"{"kind": "classification", "top_k": 0}"#,
                OUTPUTS,
                "postprocess.top_k: must be at least 1",
            ),
            (
                r#"{"kind": "classification", "top_k": 4}"#,
                OUTPUTS,
                "postprocess.top_k: 4 is more than the 3 classes",
            ),
            (
                r#"{"kind": "classification", "activation": "relu"}"#,
                OUTPUTS,
                "unknown variant `relu`, expected one of `none`, `softmax`, `sigmoid`",
            ),
            (
                r#"{"kind": "classification", "topk": 2}"#,
                OUTPUTS,
                "unknown field `topk`",
            ),
            (
                r#"{"kind": "regression"}"#,
                r#"[{"name": "l", "dtype": "i64", "shape": [null]}]"#,
                "the model has no floating-point output: set postprocess.output",
            ),
            (
                r#"{"kind": "regression", "labels": []}"#,
                OUTPUTS,
                "unknown field `labels`",
            ),
        ];
        for (post, outputs, expected) in cases {
            let e = build(post, outputs).unwrap_err();
            assert_eq!(e.status(), 1);
            assert!(
                e.message().contains(expected),
                "{post}\n  got:  {e}\n  want: {expected}"
            );
        }
        // Binary sigmoid takes two labels for one column.
        let outputs = r#"[{"name": "p", "dtype": "f32", "shape": [null, 1]}]"#;
        assert!(
            build(
                r#"{"kind": "classification", "activation": "sigmoid", "labels": ["n", "y"]}"#,
                outputs
            )
            .is_ok()
        );
    }

    #[test]
    fn malformed_outputs_are_internal_errors() {
        let p = build(r#"{"kind": "classification"}"#, OUTPUTS).unwrap();
        let cases = [
            (
                b"nope".to_vec(),
                "the model's outputs are not a valid tensor set: not a tensor set (magic is not FTS1)",
            ),
            (
                TensorSet {
                    tensors: vec![iris_outputs().tensors[0].clone()],
                    features: None,
                }
                .encode(),
                r#"the model's outputs lack "label""#,
            ),
            (
                TensorSet {
                    tensors: [iris_outputs().tensors, vec![i64s("extra", vec![], &[1])]].concat(),
                    features: None,
                }
                .encode(),
                r#"the model's outputs include "extra", which is not a declared output"#,
            ),
            (
                TensorSet {
                    tensors: vec![
                        Tensor::from_f32("probabilities", vec![1, 4], &[0.0; 4]),
                        i64s("label", vec![1], &[0]),
                    ],
                    features: None,
                }
                .encode(),
                "", // labels unset: 4 classes are fine
            ),
            (
                TensorSet {
                    tensors: vec![
                        Tensor::from_f32("probabilities", vec![3, 0], &[]),
                        i64s("label", vec![1], &[0]),
                    ],
                    features: None,
                }
                .encode(),
                r#"the model output "probabilities" has shape [3, 0]: no values per sample"#,
            ),
        ];
        for (bytes, expected) in cases {
            match p.run(&bytes) {
                Ok(_) => assert_eq!(expected, ""),
                Err(e) => assert_eq!((e.status(), e.message()), (2, expected)),
            }
        }
        let p = build(
            r#"{"kind": "classification", "labels": ["a", "b", "c"]}"#,
            &OUTPUTS.replace("3]", "null]"),
        )
        .unwrap();
        let empty = TensorSet {
            tensors: vec![
                Tensor::from_f32("probabilities", vec![0, 3], &[]),
                i64s("label", vec![0], &[]),
            ],
            features: None,
        };
        let json = String::from_utf8(p.run(&empty.encode()).unwrap()).unwrap();
        assert!(json.starts_with(r#"{"predictions":[],"#), "{json}");
        let set = TensorSet {
            tensors: vec![
                Tensor::from_f32("probabilities", vec![1, 2], &[0.0; 2]),
                i64s("label", vec![1], &[0]),
            ],
            features: None,
        };
        assert_eq!(
            p.run(&set.encode()).unwrap_err().message(),
            r#"postprocess.labels has 3 labels, but the model output "probabilities" has 2 classes"#
        );
    }
}
