//! [`Guest`]: the configuration parsed once, and the three calls of the ABI.

use crate::config;
use crate::error::{Error, bad};
use crate::image::ImagePre;
use crate::json::Quoted;
use crate::post::Post;
use crate::tabular::Tabular;
use crate::tensor::TensorPre;

#[derive(Debug)]
enum Pre {
    Tensor(TensorPre),
    Tabular(Tabular),
    Image(Box<ImagePre>),
}

/// The standard guest, configured: what one WASM instance holds after `ferry_init`.
///
/// ```
/// # use ferry_std_guest::Guest;
/// let config = r#"{"abi": 1, "preprocess": {"kind": "tabular", "features": [{"name": "a"}]},
///     "model": {"inputs": [{"name": "x", "dtype": "f32", "shape": [null, 1]}],
///               "outputs": [{"name": "y", "dtype": "f32", "shape": [null, 1]}]}}"#;
/// let mut guest = Guest::from_config(config.as_bytes()).unwrap();
/// let tensors = guest.preprocess("application/json", br#"{"record": {"a": 1.5}}"#).unwrap();
/// let err = guest.preprocess("application/json", br#"{"record": {"a": "x"}}"#).unwrap_err();
/// assert_eq!(err.message(), r#"record: field "a": expected a number, got string"#);
/// ```
#[derive(Debug)]
pub struct Guest {
    pre: Pre,
    post: Post,
}

impl Guest {
    /// Parses and checks the configuration JSON of `ferry_init` (see `docs/guest-abi.md`).
    /// Every problem is an [`Error::BadInput`] naming the key.
    pub fn from_config(json: &[u8]) -> Result<Guest, Error> {
        let config = config::parse(json)?;
        let section = &config.preprocess;
        let pre = match section.kind.as_str() {
            "tensor" => Pre::Tensor(TensorPre::from_config(section, &config.model)?),
            "tabular" => Pre::Tabular(Tabular::from_config(section, &config.model)?),
            "image" => Pre::Image(Box::new(ImagePre::from_config(section, &config.model)?)),
            other => {
                return Err(bad(format!(
                    "preprocess.kind: unknown kind {} (expected \"tensor\", \"tabular\" or \"image\")",
                    Quoted(other)
                )));
            }
        };
        let post = Post::from_config(&config.postprocess, &config.model)?;
        Ok(Guest { pre, post })
    }

    /// `ferry_preprocess`: a request (content type and body) to the encoded tensor set of the
    /// model's inputs plus the request's features.
    pub fn preprocess(&mut self, content_type: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
        match &mut self.pre {
            Pre::Tensor(p) => p.run(content_type, body),
            Pre::Tabular(p) => p.run(content_type, body),
            Pre::Image(p) => p.run(content_type, body),
        }
    }

    /// `ferry_postprocess`: the encoded tensor set of the model's outputs to the JSON response.
    pub fn postprocess(&mut self, tensor_set: &[u8]) -> Result<Vec<u8>, Error> {
        self.post.run(tensor_set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_guest_abi::TensorSet;

    const IRIS: &str = r#"{"abi": 1,
        "preprocess": {"kind": "tabular", "features": [
            {"name": "sepal_length"}, {"name": "sepal_width"}, {"name": "petal_length"}, {"name": "petal_width"}]},
        "postprocess": {"kind": "classification", "labels": ["setosa", "versicolor", "virginica"]},
        "model": {"inputs": [{"name": "float_input", "dtype": "f32", "shape": [null, 4]}],
                  "outputs": [{"name": "probabilities", "dtype": "f32", "shape": [null, 3]}]}}"#;

    #[test]
    fn end_to_end_tabular_classification() {
        let mut g = Guest::from_config(IRIS.as_bytes()).unwrap();
        let body = br#"{"records": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]}"#;
        let set = TensorSet::decode(&g.preprocess("application/json", body).unwrap()).unwrap();
        assert_eq!(set.tensors[0].shape, [1, 4]);
        let outputs = TensorSet {
            tensors: vec![ferry_guest_abi::Tensor::from_f32(
                "probabilities",
                vec![1, 3],
                &[0.97, 0.02, 0.01],
            )],
            features: None,
        };
        let json = String::from_utf8(g.postprocess(&outputs.encode()).unwrap()).unwrap();
        assert!(
            json.starts_with(
                r#"{"predictions":[{"label":"setosa","class":0,"score":0.97}],"outputs":"#
            ),
            "{json}"
        );
    }

    #[test]
    fn unknown_preprocess_kind() {
        let e = Guest::from_config(
            IRIS.replace(r#""kind": "tabular""#, r#""kind": "csv""#)
                .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(
            e.message(),
            r#"preprocess.kind: unknown kind "csv" (expected "tensor", "tabular" or "image")"#
        );
        assert_eq!(e.status(), 1);
    }

    #[test]
    fn defaults_are_tensor_in_and_out() {
        let config = r#"{"abi": 1, "model": {"inputs": [{"name": "x", "dtype": "f32", "shape": [1]}],
            "outputs": [{"name": "y", "dtype": "f32", "shape": [1]}]}}"#;
        let mut g = Guest::from_config(config.as_bytes()).unwrap();
        let set = g
            .preprocess(
                "application/json",
                br#"{"inputs": {"x": {"shape": [1], "data": [2]}}}"#,
            )
            .unwrap();
        assert_eq!(
            TensorSet::decode(&set).unwrap().tensors[0].to_f64_vec(),
            [2.0]
        );
        let outputs = TensorSet {
            tensors: vec![ferry_guest_abi::Tensor::from_f32("y", vec![1], &[4.0])],
            features: None,
        };
        assert_eq!(
            g.postprocess(&outputs.encode()).unwrap(),
            br#"{"outputs":{"y":{"shape":[1],"data":[4.0]}}}"#
        );
    }
}
