//! The configuration `ferry_init` receives, and the helpers each kind uses to read its table.
//!
//! ```json
//! {"abi": 1, "preprocess": {"kind": "tabular", ...}, "postprocess": {...},
//!  "model": {"inputs": [{"name": "x", "dtype": "f32", "shape": [null, 4]}], "outputs": [...]}}
//! ```
//! The top level may carry keys this guest does not know (the host may add some); everything
//! below it is checked strictly, so a typo in `ferry.toml` fails `ferry pack` instead of
//! silently changing what a bundle does.

use std::fmt;

use ferry_guest_abi::{ABI_VERSION, DType};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Error, bad};
use crate::json::{Listed, Quoted};

/// One model input or output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelIo {
    pub name: String,
    pub dtype: DType,
    /// `None` is a symbolic (batch) dimension.
    pub shape: Vec<Option<u64>>,
}

impl ModelIo {
    /// `[?, 4]`, for messages.
    pub(crate) fn shape_display(&self) -> ShapeDisplay<'_> {
        ShapeDisplay(&self.shape)
    }
}

/// The model's signature.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Model {
    pub inputs: Vec<ModelIo>,
    pub outputs: Vec<ModelIo>,
}

impl Model {
    /// The input a kind works on: `name`, or the model's only input. `key` is the table key
    /// that names it (for messages), e.g. `preprocess.input`.
    pub(crate) fn input(&self, name: Option<&str>, key: &str) -> Result<(usize, &ModelIo), Error> {
        pick(&self.inputs, name, key, "input")
    }

    /// The output named `name` (`key` names the table key, for messages).
    pub(crate) fn output(&self, name: &str, key: &str) -> Result<(usize, &ModelIo), Error> {
        pick(&self.outputs, Some(name), key, "output")
    }
}

fn pick<'a>(
    ios: &'a [ModelIo],
    name: Option<&str>,
    key: &str,
    what: &str,
) -> Result<(usize, &'a ModelIo), Error> {
    let names: Vec<&str> = ios.iter().map(|io| io.name.as_str()).collect();
    match name {
        Some(name) => ios
            .iter()
            .enumerate()
            .find(|(_, io)| io.name == name)
            .ok_or_else(|| {
                bad(format!(
                    "{key}: the model has no {what} {} (its {what}s: {})",
                    Quoted(name),
                    Listed(&names)
                ))
            }),
        None if ios.len() == 1 => Ok((0, &ios[0])),
        None if ios.is_empty() => Err(bad(format!("the model has no {what}s"))),
        None => Err(bad(format!(
            "the model has {} {what}s ({}): set {key} to choose one",
            ios.len(),
            Listed(&names)
        ))),
    }
}

/// Displays a model shape: `[?, 4]`.
pub(crate) struct ShapeDisplay<'a>(pub &'a [Option<u64>]);

impl fmt::Display for ShapeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match d {
                Some(d) => write!(f, "{d}")?,
                None => f.write_str("?")?,
            }
        }
        f.write_str("]")
    }
}

/// A `[preprocess]` or `[postprocess]` table: its kind and its other keys.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Section {
    /// `preprocess` or `postprocess`, for messages.
    pub name: &'static str,
    pub kind: String,
    pub rest: Map<String, Value>,
}

impl Section {
    /// Deserializes the keys other than `kind` into `T` (which denies unknown fields).
    pub(crate) fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_value(Value::Object(self.rest.clone()))
            .map_err(|e| bad(format!("{} (kind \"{}\"): {e}", self.name, self.kind)))
    }

    /// An error about key `key` of this table: `preprocess.width: must be at least 1`.
    pub(crate) fn error(&self, key: &str, message: impl fmt::Display) -> Error {
        bad(format!("{}.{key}: {message}", self.name))
    }
}

/// The whole configuration, split into its parts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Config {
    pub model: Model,
    pub preprocess: Section,
    pub postprocess: Section,
}

// The wire forms. The top level has no `deny_unknown_fields`: see the module docs.
#[derive(Deserialize)]
struct RawConfig {
    abi: i64,
    #[serde(default)]
    preprocess: Value,
    #[serde(default)]
    postprocess: Value,
    model: RawModel,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    inputs: Vec<RawIo>,
    outputs: Vec<RawIo>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIo {
    name: String,
    dtype: String,
    shape: Vec<Option<u64>>,
}

/// Parses the configuration JSON.
pub(crate) fn parse(bytes: &[u8]) -> Result<Config, Error> {
    let raw: RawConfig = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("invalid guest configuration: {e}")))?;
    if raw.abi != i64::from(ABI_VERSION) {
        return Err(bad(format!(
            "the configuration is for guest ABI {}, this guest speaks ABI {ABI_VERSION}",
            raw.abi
        )));
    }
    let model = Model {
        inputs: ios(raw.model.inputs, "inputs")?,
        outputs: ios(raw.model.outputs, "outputs")?,
    };
    Ok(Config {
        model,
        preprocess: section(raw.preprocess, "preprocess")?,
        postprocess: section(raw.postprocess, "postprocess")?,
    })
}

fn ios(raw: Vec<RawIo>, what: &str) -> Result<Vec<ModelIo>, Error> {
    let mut out: Vec<ModelIo> = Vec::with_capacity(raw.len());
    for io in raw {
        let dtype = DType::from_name(&io.dtype).ok_or_else(|| {
            bad(format!(
                "model.{what}: {} has dtype {}, which the standard guest does not support \
                 (f32, f64, i64, i32, u8, bool)",
                Quoted(&io.name),
                Quoted(&io.dtype)
            ))
        })?;
        if out.iter().any(|o| o.name == io.name) {
            return Err(bad(format!(
                "model.{what}: duplicate name {}",
                Quoted(&io.name)
            )));
        }
        out.push(ModelIo {
            name: io.name,
            dtype,
            shape: io.shape,
        });
    }
    Ok(out)
}

fn section(value: Value, name: &'static str) -> Result<Section, Error> {
    let mut rest = match value {
        Value::Null => Map::new(),
        Value::Object(m) => m,
        other => {
            return Err(bad(format!(
                "{name}: expected a table, got {}",
                value_kind(&other)
            )));
        }
    };
    let kind = match rest.remove("kind") {
        None => "tensor".to_owned(),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(bad(format!(
                "{name}.kind: expected a string, got {}",
                value_kind(&other)
            )));
        }
    };
    Ok(Section { name, kind, rest })
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Parses one entry of a list of tables (e.g. `features[2]`), naming it in errors.
pub(crate) fn parse_entry<T: DeserializeOwned>(
    value: &Value,
    path: impl fmt::Display,
) -> Result<T, Error> {
    T::deserialize(value).map_err(|e| bad(format!("{path}: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A configuration JSON for tests: the given tables and model.
    pub(crate) fn config_json(pre: &str, post: &str, inputs: &str, outputs: &str) -> String {
        format!(
            r#"{{"abi": 1, "preprocess": {pre}, "postprocess": {post},
                "model": {{"inputs": {inputs}, "outputs": {outputs}}}, "extra": "ok"}}"#
        )
    }

    #[test]
    fn parses_model_and_sections() {
        let json = config_json(
            r#"{"kind": "tabular", "x": 1}"#,
            "null",
            r#"[{"name": "x", "dtype": "f32", "shape": [null, 4]}]"#,
            r#"[{"name": "y", "dtype": "i64", "shape": [null]}]"#,
        );
        let c = parse(json.as_bytes()).unwrap();
        assert_eq!(c.model.inputs[0].shape, vec![None, Some(4)]);
        assert_eq!(c.model.inputs[0].shape_display().to_string(), "[?, 4]");
        assert_eq!(c.model.outputs[0].dtype, DType::I64);
        assert_eq!(c.preprocess.kind, "tabular");
        assert!(c.preprocess.rest.contains_key("x"));
        assert_eq!(c.postprocess.kind, "tensor");
    }

    #[test]
    fn rejects_bad_configurations() {
        let io = r#"[{"name": "x", "dtype": "f32", "shape": [1]}]"#;
        let cases = [
            (
                config_json("{}", "{}", io, io).replace("\"abi\": 1", "\"abi\": 2"),
                "for guest ABI 2",
            ),
            (
                config_json("{}", "{}", io, io).replace("\"abi\": 1,", ""),
                "missing field `abi`",
            ),
            (
                config_json(
                    "{}",
                    "{}",
                    r#"[{"name": "x", "dtype": "f16", "shape": [1]}]"#,
                    io,
                ),
                "dtype \"f16\"",
            ),
            (
                config_json(
                    "{}",
                    "{}",
                    r#"[{"name": "x", "dtype": "f32", "shape": [1], "z": 0}]"#,
                    io,
                ),
                "unknown field `z`",
            ),
            (
                config_json(
                    "{}",
                    "{}",
                    r#"[{"name": "x", "dtype": "f32", "shape": [-1]}]"#,
                    io,
                ),
                "invalid value",
            ),
            (
                config_json("[]", "{}", io, io),
                "preprocess: expected a table, got array",
            ),
            (
                config_json(r#"{"kind": 3}"#, "{}", io, io),
                "preprocess.kind: expected a string, got number",
            ),
            (
                config_json(
                    "{}",
                    "{}",
                    r#"[{"name": "x", "dtype": "f32", "shape": []}, {"name": "x", "dtype": "f32", "shape": []}]"#,
                    io,
                ),
                "model.inputs: duplicate name \"x\"",
            ),
            ("not json".to_owned(), "invalid guest configuration"),
        ];
        for (json, needle) in cases {
            let err = parse(json.as_bytes()).unwrap_err();
            assert_eq!(err.status(), 1);
            assert!(err.message().contains(needle), "{needle:?} not in {err}");
        }
    }

    #[test]
    fn picks_inputs_by_name_or_uniqueness() {
        let io = |n: &str| ModelIo {
            name: n.into(),
            dtype: DType::F32,
            shape: vec![],
        };
        let m = Model {
            inputs: vec![io("a"), io("b")],
            outputs: vec![],
        };
        assert_eq!(m.input(Some("b"), "preprocess.input").unwrap().0, 1);
        assert_eq!(
            m.input(Some("c"), "preprocess.input")
                .unwrap_err()
                .message(),
            r#"preprocess.input: the model has no input "c" (its inputs: "a", "b")"#
        );
        assert_eq!(
            m.input(None, "preprocess.input").unwrap_err().message(),
            r#"the model has 2 inputs ("a", "b"): set preprocess.input to choose one"#
        );
        let one = Model {
            inputs: vec![io("a")],
            outputs: vec![],
        };
        assert_eq!(one.input(None, "preprocess.input").unwrap().1.name, "a");
    }
}
