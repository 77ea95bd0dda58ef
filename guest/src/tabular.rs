//! `kind = "tabular"` preprocessing: JSON records to one standardised, one-hot encoded matrix.
//!
//! The configuration is compiled at init into a [`Tabular`]: each feature's column offset,
//! its standardisation, its categories in a sorted lookup table, the feature names for the
//! tensor set. A call then walks each record once.

use std::fmt;

use ferry_guest_abi::{DType, FeatureKind, Features, Tensor, TensorSet, Value};
use serde::Deserialize;

use crate::config::{Model, Section, parse_entry};
use crate::error::{Error, bad};
use crate::json::{self, Listed, Node, OneOf, Quoted, media_type};
use crate::tensor::tensor_buffer;

/// The `[preprocess]` table of `kind = "tabular"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TabularToml {
    input: Option<String>,
    #[serde(default)]
    strict: bool,
    features: Vec<serde_json::Value>,
}

/// One entry of `features`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureToml {
    name: String,
    mean: Option<f64>,
    std: Option<f64>,
    default: Option<serde_json::Value>,
    categories: Option<Vec<String>>,
    handle_unknown: Option<HandleUnknown>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum HandleUnknown {
    Error,
    Ignore,
}

/// Strings to indices: a sorted table searched by bisection (no hashing, so no WASI random
/// seed, and faster than a hash map for the few dozen names a model has).
#[derive(Debug, Clone, Default)]
struct Lookup {
    sorted: Vec<(Box<str>, u32)>,
}

impl Lookup {
    fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Lookup {
        let mut sorted: Vec<(Box<str>, u32)> = names
            .into_iter()
            .enumerate()
            .map(|(i, n)| (n.into(), i as u32))
            .collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Lookup { sorted }
    }

    fn get(&self, name: &str) -> Option<usize> {
        self.sorted
            .binary_search_by(|(n, _)| n.as_ref().cmp(name))
            .ok()
            .map(|i| self.sorted[i].1 as usize)
    }
}

#[derive(Debug)]
enum Spec {
    Numeric {
        mean: f64,
        std: f64,
        default: Option<f64>,
    },
    Categorical {
        categories: Vec<String>,
        lookup: Lookup,
        default: Option<usize>,
        ignore_unknown: bool,
    },
}

#[derive(Debug)]
struct Feature {
    name: String,
    spec: Spec,
}

/// Tabular preprocessing, ready to run.
#[derive(Debug)]
pub(crate) struct Tabular {
    input: String,
    /// The element type of the output tensor: f64 if the model input is f64, else f32.
    dtype: DType,
    /// The model input's batch size, if it is fixed.
    batch: Option<u64>,
    strict: bool,
    features: Vec<Feature>,
    lookup: Lookup,
    /// Columns of the output: one per numeric feature, one per category.
    width: usize,
    /// The features block's names, kept between calls (the encoder borrows them).
    names: Vec<(String, FeatureKind)>,
}

impl Tabular {
    pub(crate) fn from_config(section: &Section, model: &Model) -> Result<Tabular, Error> {
        let toml: TabularToml = section.parse()?;
        let (_, io) = model.input(toml.input.as_deref(), "preprocess.input")?;
        let dtype = match io.dtype {
            DType::F64 => DType::F64,
            DType::F32 => DType::F32,
            other => {
                return Err(bad(format!(
                    "the model input {} has dtype {}; kind \"tabular\" needs f32 or f64",
                    Quoted(&io.name),
                    other.name()
                )));
            }
        };
        if toml.features.is_empty() {
            return Err(section.error("features", "list at least one feature"));
        }
        let mut features: Vec<Feature> = Vec::with_capacity(toml.features.len());
        for (i, value) in toml.features.iter().enumerate() {
            let path = format!("preprocess.features[{i}]");
            let raw: FeatureToml = parse_entry(value, &path)?;
            if features.iter().any(|f| f.name == raw.name) {
                return Err(bad(format!(
                    "{path}: duplicate feature name {}",
                    Quoted(&raw.name)
                )));
            }
            features.push(feature(raw, &path)?);
        }
        let width = features
            .iter()
            .map(|f| match &f.spec {
                Spec::Numeric { .. } => 1,
                Spec::Categorical { categories, .. } => categories.len(),
            })
            .sum();
        match io.shape.as_slice() {
            [_, Some(w)] if *w != width as u64 => {
                return Err(bad(format!(
                    "the model input {} takes {w} columns, but the features make {width} \
                     (one per numeric feature, one per category)",
                    Quoted(&io.name)
                )));
            }
            [_, _] => {}
            _ => {
                return Err(bad(format!(
                    "the model input {} has shape {}; kind \"tabular\" needs rank 2 ([batch, {width}])",
                    Quoted(&io.name),
                    io.shape_display()
                )));
            }
        }
        let names = features
            .iter()
            .map(|f| {
                let kind = match f.spec {
                    Spec::Numeric { .. } => FeatureKind::Numeric,
                    Spec::Categorical { .. } => FeatureKind::Categorical,
                };
                (f.name.clone(), kind)
            })
            .collect();
        Ok(Tabular {
            input: io.name.clone(),
            dtype,
            batch: io.shape[0],
            strict: toml.strict,
            lookup: Lookup::new(features.iter().map(|f| f.name.as_str())),
            features,
            width,
            names,
        })
    }

    /// Runs preprocessing: the encoded tensor set.
    pub(crate) fn run(&mut self, content_type: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
        let (tensor, rows) = self.tensor(content_type, body)?;
        let features = Features {
            names: std::mem::take(&mut self.names),
            rows,
        };
        let set = TensorSet {
            tensors: vec![tensor],
            features: Some(features),
        };
        let bytes = set.encode();
        if let Some(f) = set.features {
            self.names = f.names;
        }
        Ok(bytes)
    }

    /// The model input tensor and the feature rows of a request.
    fn tensor(&self, content_type: &str, body: &[u8]) -> Result<(Tensor, Vec<Vec<Value>>), Error> {
        let media = media_type(content_type);
        if !(media.is_empty() || media == "application/json") {
            return Err(bad(format!(
                "unsupported content type {} (kind \"tabular\" takes application/json)",
                Quoted(content_type)
            )));
        }
        let node = json::parse(body)?;
        let [records, record] = json::top_level(&node, ["records", "record"])?;
        let (records, single) = match (records, record) {
            (Some(Node::Array(records)), None) => (records.as_slice(), false),
            (Some(other), None) => {
                return Err(bad(format!(
                    "\"records\": expected an array of objects, got {}",
                    other.kind()
                )));
            }
            (None, Some(record)) => (std::slice::from_ref(record), true),
            (Some(_), Some(_)) => {
                return Err(bad("give either \"records\" or \"record\", not both"));
            }
            (None, None) => {
                return Err(bad(
                    "missing field \"records\" (or \"record\") in the request",
                ));
            }
        };
        if records.is_empty() {
            return Err(bad("\"records\" is empty: give at least one record"));
        }
        if let Some(batch) = self.batch
            && batch != records.len() as u64
        {
            return Err(bad(format!(
                "the model takes exactly {batch} record(s) per request, got {}",
                records.len()
            )));
        }
        let what = format!("{} record(s) of {} columns", records.len(), self.width);
        let mut data = tensor_buffer(records.len().checked_mul(self.width), self.dtype, &what)?;
        let mut rows = Vec::with_capacity(records.len());
        let mut slots = Vec::with_capacity(self.features.len());
        for (i, record) in records.iter().enumerate() {
            let label = if single {
                Label::Single
            } else {
                Label::Index(i)
            };
            rows.push(self.record(record, label, &mut slots, &mut data)?);
        }
        let tensor = Tensor {
            name: self.input.clone(),
            dtype: self.dtype,
            shape: vec![records.len() as u64, self.width as u64],
            data,
        };
        Ok((tensor, rows))
    }

    /// Appends one record's row to `data`; returns its feature values.
    fn record<'a>(
        &self,
        record: &'a Node<'a>,
        label: Label,
        slots: &mut Vec<Option<&'a Node<'a>>>,
        data: &mut Vec<u8>,
    ) -> Result<Vec<Value>, Error> {
        let Node::Object(members) = record else {
            return Err(bad(format!(
                "{label}: expected an object, got {}",
                record.kind()
            )));
        };
        slots.clear();
        slots.resize(self.features.len(), None);
        for (pos, (key, value)) in members.iter().enumerate() {
            // Records usually list fields in the configured order: try that first.
            let index = match self.features.get(pos) {
                Some(f) if f.name == *key => Some(pos),
                _ => self.lookup.get(key),
            };
            match index {
                Some(j) if slots[j].is_some() => {
                    return Err(bad(format!("{label}: duplicate field {}", Quoted(key))));
                }
                Some(j) => slots[j] = Some(value),
                None if self.strict => {
                    return Err(bad(format!(
                        "{label}: unknown field {} (strict = true; the features are {})",
                        Quoted(key),
                        Listed(
                            &self
                                .features
                                .iter()
                                .map(|f| f.name.as_str())
                                .collect::<Vec<_>>()
                        )
                    )));
                }
                None => {}
            }
        }
        let f64_out = self.dtype == DType::F64;
        // In the output's precision, as `(f32(x) - f32(mean)) / f32(std)` for f32 (what a
        // float32 pipeline computes, e.g. scikit-learn's scaler on float32 data).
        let mut put_scaled = |x: f64, mean: f64, std: f64| {
            if f64_out {
                data.extend_from_slice(&((x - mean) / std).to_le_bytes());
            } else {
                data.extend_from_slice(&((x as f32 - mean as f32) / std as f32).to_le_bytes());
            }
        };
        let mut values = Vec::with_capacity(self.features.len());
        for (feature, slot) in self.features.iter().zip(slots.iter()) {
            let name = Quoted(&feature.name);
            let given = slot.filter(|n| !matches!(n, Node::Null));
            let absent = || {
                let how = if slot.is_some() { "null" } else { "missing" };
                bad(format!("{label}: field {name} is {how} and has no default"))
            };
            match &feature.spec {
                Spec::Numeric { mean, std, default } => {
                    let raw = match given {
                        Some(node) => Some(node.as_f64().ok_or_else(|| {
                            bad(format!(
                                "{label}: field {name}: expected a number, got {}",
                                node.kind()
                            ))
                        })?),
                        None => None,
                    };
                    let x = match raw {
                        Some(x) => x,
                        None => default.ok_or_else(absent)?,
                    };
                    put_scaled(x, *mean, *std);
                    values.push(Value::Num(raw.unwrap_or(f64::NAN)));
                }
                Spec::Categorical {
                    categories,
                    lookup,
                    default,
                    ignore_unknown,
                } => {
                    let (hot, value) = match given {
                        Some(Node::Str(s)) => match lookup.get(s) {
                            Some(k) => (Some(k), categories[k].clone()),
                            None if *ignore_unknown => (None, s.clone().into_owned()),
                            None => {
                                return Err(bad(format!(
                                    "{label}: field {name}: unknown category {} (expected {})",
                                    Quoted(s),
                                    OneOf(categories)
                                )));
                            }
                        },
                        Some(node) => {
                            return Err(bad(format!(
                                "{label}: field {name}: expected a string, got {}",
                                node.kind()
                            )));
                        }
                        None => {
                            let k = default.ok_or_else(absent)?;
                            (Some(k), categories[k].clone())
                        }
                    };
                    for k in 0..categories.len() {
                        put_scaled(if hot == Some(k) { 1.0 } else { 0.0 }, 0.0, 1.0);
                    }
                    values.push(Value::Cat(value));
                }
            }
        }
        Ok(values)
    }
}

/// Which record a message is about.
#[derive(Clone, Copy)]
enum Label {
    /// The `{"record": ..}` form.
    Single,
    /// Index in `records`.
    Index(usize),
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Label::Single => f.write_str("record"),
            Label::Index(i) => write!(f, "record {i}"),
        }
    }
}

/// Checks one feature entry.
fn feature(raw: FeatureToml, path: &str) -> Result<Feature, Error> {
    let at = format!("{path} ({})", Quoted(&raw.name));
    if raw.name.is_empty() {
        return Err(bad(format!("{path}: name must not be empty")));
    }
    let spec = match raw.categories {
        Some(categories) => {
            if raw.mean.is_some() || raw.std.is_some() {
                return Err(bad(format!(
                    "{at}: mean and std apply to numeric features, not categorical ones"
                )));
            }
            if categories.is_empty() {
                return Err(bad(format!("{at}: categories must not be empty")));
            }
            if let Some((i, c)) = categories
                .iter()
                .enumerate()
                .find(|(i, c)| categories[..*i].contains(c))
            {
                return Err(bad(format!(
                    "{at}: categories[{i}]: duplicate category {}",
                    Quoted(c)
                )));
            }
            let default = match raw.default {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(d)) => match categories.iter().position(|c| *c == d)
                {
                    Some(k) => Some(k),
                    None => {
                        return Err(bad(format!(
                            "{at}: default {} is not among the categories ({})",
                            Quoted(&d),
                            Listed(&categories)
                        )));
                    }
                },
                Some(_) => {
                    return Err(bad(format!(
                        "{at}: default must be a string (one of the categories)"
                    )));
                }
            };
            Spec::Categorical {
                lookup: Lookup::new(categories.iter().map(String::as_str)),
                categories,
                default,
                ignore_unknown: raw.handle_unknown == Some(HandleUnknown::Ignore),
            }
        }
        None => {
            if raw.handle_unknown.is_some() {
                return Err(bad(format!(
                    "{at}: handle_unknown applies to categorical features (with categories)"
                )));
            }
            let std = raw.std.unwrap_or(1.0);
            if !(std > 0.0 && std.is_finite()) {
                return Err(bad(format!(
                    "{at}: std must be a positive number, got {std}"
                )));
            }
            let default = match raw.default {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::Number(n)) => n.as_f64(),
                Some(_) => {
                    return Err(bad(format!(
                        "{at}: default must be a number (this feature has no categories, so it is numeric)"
                    )));
                }
            };
            Spec::Numeric {
                mean: raw.mean.unwrap_or(0.0),
                std,
                default,
            }
        }
    };
    Ok(Feature {
        name: raw.name,
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::config::tests::config_json;

    const FEATURES: &str = r#"[
        {"name": "sepal_length", "mean": 5.0, "std": 2.0},
        {"name": "age", "default": 40.0},
        {"name": "color", "categories": ["red", "green", "blue"], "default": "red"},
        {"name": "city", "categories": ["a", "b"], "handle_unknown": "ignore"}]"#;

    fn build(pre: &str, shape: &str, dtype: &str) -> Result<Tabular, Error> {
        let inputs = format!(r#"[{{"name": "x", "dtype": "{dtype}", "shape": {shape}}}]"#);
        let c = parse(config_json(pre, "{}", &inputs, "[]").as_bytes()).unwrap();
        Tabular::from_config(&c.preprocess, &c.model)
    }

    fn tabular() -> Tabular {
        build(
            &format!(r#"{{"kind": "tabular", "features": {FEATURES}}}"#),
            "[null, 7]",
            "f32",
        )
        .unwrap()
    }

    fn run(t: &mut Tabular, body: &str) -> Result<TensorSet, Error> {
        t.run("application/json", body.as_bytes())
            .map(|b| TensorSet::decode(&b).unwrap())
    }

    #[test]
    fn standardises_one_hot_encodes_and_reports_raw_features() {
        let mut t = tabular();
        let body = r#"{"records": [
            {"sepal_length": 7, "age": 30, "color": "blue", "city": "b"},
            {"city": "zzz", "sepal_length": 3.0, "extra": [1], "age": null}]}"#;
        for _ in 0..2 {
            let set = run(&mut t, body).unwrap();
            let x = &set.tensors[0];
            assert_eq!(
                (x.name.as_str(), x.dtype, x.shape.as_slice()),
                ("x", DType::F32, &[2u64, 7][..])
            );
            #[rustfmt::skip]
            assert_eq!(x.to_f64_vec(), [
                1.0, 30.0, 0.0, 0.0, 1.0, 0.0, 1.0,
                -1.0, 40.0, 1.0, 0.0, 0.0, 0.0, 0.0,
            ]);
            let f = set.features.unwrap();
            assert_eq!(
                f.names,
                [
                    ("sepal_length", FeatureKind::Numeric),
                    ("age", FeatureKind::Numeric),
                    ("color", FeatureKind::Categorical),
                    ("city", FeatureKind::Categorical)
                ]
                .map(|(n, k)| (n.to_owned(), k))
            );
            assert_eq!(
                f.rows[0],
                [
                    Value::Num(7.0),
                    Value::Num(30.0),
                    Value::Cat("blue".into()),
                    Value::Cat("b".into())
                ]
            );
            assert!(
                matches!(f.rows[1][1], Value::Num(x) if x.is_nan()),
                "a missing number is NaN"
            );
            assert_eq!(
                f.rows[1][2],
                Value::Cat("red".into()),
                "a missing category is its default"
            );
            assert_eq!(
                f.rows[1][3],
                Value::Cat("zzz".into()),
                "an ignored unknown category is kept"
            );
        }
        let set = run(&mut t, r#"{"record": {"sepal_length": 5, "city": "a"}}"#).unwrap();
        assert_eq!(set.tensors[0].shape, [1, 7]);
    }

    #[test]
    fn emits_f64_for_an_f64_input_and_checks_a_fixed_batch() {
        let pre = r#"{"kind": "tabular", "input": "x", "strict": true, "features": [{"name": "a", "mean": 1}]}"#;
        let mut t = build(pre, "[1, 1]", "f64").unwrap();
        let set = run(&mut t, r#"{"record": {"a": 0.5}}"#).unwrap();
        assert_eq!(set.tensors[0].dtype, DType::F64);
        assert_eq!(set.tensors[0].data, (-0.5f64).to_le_bytes());
        let e = run(&mut t, r#"{"records": [{"a": 1}, {"a": 2}]}"#).unwrap_err();
        assert_eq!(
            e.message(),
            "the model takes exactly 1 record(s) per request, got 2"
        );
        let e = run(&mut t, r#"{"record": {"a": 1, "b": 2}}"#).unwrap_err();
        assert_eq!(
            e.message(),
            r#"record: unknown field "b" (strict = true; the features are "a")"#
        );
    }

    #[test]
    fn rejects_bad_records_precisely() {
        let mut t = tabular();
        let ok = r#""sepal_length": 1, "city": "a""#;
        let cases = [
            (
                "[]".to_owned(),
                "the request must be a JSON object, got array",
            ),
            (
                "{}".to_owned(),
                r#"missing field "records" (or "record") in the request"#,
            ),
            (
                r#"{"records": []}"#.to_owned(),
                r#""records" is empty: give at least one record"#,
            ),
            (
                r#"{"records": {}}"#.to_owned(),
                r#""records": expected an array of objects, got object"#,
            ),
            (
                r#"{"records": [], "record": {}}"#.to_owned(),
                r#"give either "records" or "record", not both"#,
            ),
            (
                r#"{"rows": []}"#.to_owned(),
                r#"unknown field "rows" in the request (expected "records" or "record")"#,
            ),
            (
                format!(r#"{{"records": [{{{ok}}}, 5]}}"#),
                "record 1: expected an object, got number",
            ),
            (
                format!(r#"{{"records": [{{{ok}}}, {{{ok}}}, {{"sepal_length": "5.1"}}]}}"#),
                r#"record 2: field "sepal_length": expected a number, got string"#,
            ),
            (
                r#"{"record": {"city": "a"}}"#.to_owned(),
                r#"record: field "sepal_length" is missing and has no default"#,
            ),
            (
                r#"{"record": {"sepal_length": null, "city": "a"}}"#.to_owned(),
                r#"record: field "sepal_length" is null and has no default"#,
            ),
            (
                format!(r#"{{"record": {{{ok}, "sepal_length": 2}}}}"#),
                r#"record: duplicate field "sepal_length""#,
            ),
            (
                format!(r#"{{"record": {{{ok}, "color": "purple"}}}}"#),
                r#"record: field "color": unknown category "purple" (expected "red", "green" or "blue")"#,
            ),
            (
                format!(r#"{{"record": {{{ok}, "color": 1}}}}"#),
                r#"record: field "color": expected a string, got number"#,
            ),
            (
                format!(r#"{{"record": {{{ok}, "age": true}}}}"#),
                r#"record: field "age": expected a number, got boolean"#,
            ),
            (
                r#"{"record": {"sepal_length": 1}}"#.to_owned(),
                r#"record: field "city" is missing and has no default"#,
            ),
            (
                r#"{"record": {"sepal_length": 1, "city": ["a"]}}"#.to_owned(),
                r#"record: field "city": expected a string, got array"#,
            ),
        ];
        for (body, expected) in cases {
            let e = run(&mut t, &body).unwrap_err();
            assert_eq!(e.status(), 1);
            assert_eq!(e.message(), expected, "{body}");
        }
        let e = t.run("text/csv", b"a,b").unwrap_err();
        assert_eq!(
            e.message(),
            r#"unsupported content type "text/csv" (kind "tabular" takes application/json)"#
        );
    }

    #[test]
    fn rejects_bad_configurations() {
        let with = |features: &str| format!(r#"{{"kind": "tabular", "features": {features}}}"#);
        let cases = [
            (
                with("[]"),
                "[null, 1]",
                "f32",
                "preprocess.features: list at least one feature",
            ),
            (
                with(r#"[{"name": "a", "std": 0}]"#),
                "[null, 1]",
                "f32",
                r#"preprocess.features[0] ("a"): std must be a positive number, got 0"#,
            ),
            (
                with(r#"[{"name": "a", "std": -1}]"#),
                "[null, 1]",
                "f32",
                "std must be a positive number, got -1",
            ),
            (
                with(r#"[{"name": "a", "default": "x"}]"#),
                "[null, 1]",
                "f32",
                "default must be a number",
            ),
            (
                with(r#"[{"name": "a", "handle_unknown": "ignore"}]"#),
                "[null, 1]",
                "f32",
                "handle_unknown applies to categorical features",
            ),
            (
                with(r#"[{"name": "a", "handle_unknown": "drop", "categories": ["x"]}]"#),
                "[null, 1]",
                "f32",
                "unknown variant `drop`, expected `error` or `ignore`",
            ),
            (
                with(r#"[{"name": "c", "categories": ["x", "y"], "default": "z"}]"#),
                "[null, 2]",
                "f32",
                r#"preprocess.features[0] ("c"): default "z" is not among the categories ("x", "y")"#,
            ),
            (
                with(r#"[{"name": "c", "categories": ["x", "y"], "default": 1}]"#),
                "[null, 2]",
                "f32",
                "default must be a string (one of the categories)",
            ),
            (
                with(r#"[{"name": "c", "categories": []}]"#),
                "[null, 0]",
                "f32",
                "categories must not be empty",
            ),
            (
                with(r#"[{"name": "c", "categories": ["x", "x"]}]"#),
                "[null, 2]",
                "f32",
                r#"categories[1]: duplicate category "x""#,
            ),
            (
                with(r#"[{"name": "c", "categories": ["x"], "mean": 1}]"#),
                "[null, 1]",
                "f32",
                "mean and std apply to numeric features",
            ),
            (
                with(r#"[{"name": "a"}, {"name": "a"}]"#),
                "[null, 2]",
                "f32",
                r#"preprocess.features[1]: duplicate feature name "a""#,
            ),
            (
                with(r#"[{"name": ""}]"#),
                "[null, 1]",
                "f32",
                "preprocess.features[0]: name must not be empty",
            ),
            (
                with(r#"[{"name": "a", "scale": 2}]"#),
                "[null, 1]",
                "f32",
                "preprocess.features[0]: unknown field `scale`",
            ),
            (
                with(r#"[{"mean": 2}]"#),
                "[null, 1]",
                "f32",
                "preprocess.features[0]: missing field `name`",
            ),
            (
                with(r#"[{"name": "a"}]"#),
                "[null, 2]",
                "f32",
                r#"the model input "x" takes 2 columns, but the features make 1"#,
            ),
            (
                with(r#"[{"name": "a"}]"#),
                "[null]",
                "f32",
                r#"the model input "x" has shape [?]; kind "tabular" needs rank 2 ([batch, 1])"#,
            ),
            (
                with(r#"[{"name": "a"}]"#),
                "[null, 1]",
                "i64",
                r#"the model input "x" has dtype i64; kind "tabular" needs f32 or f64"#,
            ),
            (
                r#"{"kind": "tabular"}"#.to_owned(),
                "[null, 1]",
                "f32",
                "missing field `features`",
            ),
            (
                r#"{"kind": "tabular", "features": [], "strcit": true}"#.to_owned(),
                "[null, 1]",
                "f32",
                "preprocess (kind \"tabular\"): unknown field `strcit`",
            ),
            (
                r#"{"kind": "tabular", "input": "y", "features": [{"name": "a"}]}"#.to_owned(),
                "[null, 1]",
                "f32",
                r#"preprocess.input: the model has no input "y""#,
            ),
        ];
        for (pre, shape, dtype, expected) in cases {
            let e = build(&pre, shape, dtype).unwrap_err();
            assert_eq!(e.status(), 1);
            assert!(
                e.message().contains(expected),
                "{pre}\n  got:  {e}\n  want: {expected}"
            );
        }
    }

    #[test]
    fn lookup_finds_every_name() {
        let l = Lookup::new(["b", "a", "c"]);
        assert_eq!(
            (l.get("a"), l.get("b"), l.get("c"), l.get("d")),
            (Some(1), Some(0), Some(2), None)
        );
    }
}
