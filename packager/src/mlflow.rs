//! MLflow models in: a local MLflow model directory (an `MLmodel` file with
//! the `onnx` flavor, as `mlflow.onnx.log_model`/`save_model` write it, and
//! `mlflow artifacts download` fetches it) packs like an ONNX file, and its
//! lineage (run id, model uuid/id, signature, registered name and version)
//! goes into the signed manifest (`lineage.training_json`, key `mlflow`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Whether `path` is an MLflow model directory.
pub fn is_model_dir(path: &Path) -> bool {
    path.is_dir() && path.join("MLmodel").is_file()
}

/// What Ferry reads of an `MLmodel` file.
#[derive(Debug, Clone)]
pub struct MlflowModel {
    /// The ONNX file (the onnx flavor's `data`), inside the directory.
    pub model_file: PathBuf,
    pub run_id: Option<String>,
    pub model_uuid: Option<String>,
    pub model_id: Option<String>,
    pub utc_time_created: Option<String>,
    pub mlflow_version: Option<String>,
    pub onnx_version: Option<String>,
    /// The signature's inputs and outputs as MLflow writes them (JSON text).
    pub signature_inputs: Option<String>,
    pub signature_outputs: Option<String>,
}

impl MlflowModel {
    /// Reads `dir/MLmodel`. Refuses a model without the onnx flavor (with
    /// the flavors it has) and a `data` path that leaves the directory.
    pub fn open(dir: &Path) -> Result<MlflowModel> {
        let path = dir.join("MLmodel");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{} is not valid YAML", path.display()))?;
        let s = |v: &serde_yaml_ng::Value| v.as_str().map(str::to_string);
        let flavors = doc
            .get("flavors")
            .and_then(|f| f.as_mapping())
            .with_context(|| format!("{} has no `flavors`", path.display()))?;
        let Some(onnx) = doc.get("flavors").and_then(|f| f.get("onnx")) else {
            let names: Vec<String> = flavors.keys().filter_map(s).collect();
            bail!(
                "{} has no onnx flavor (it has: {}): log the model with mlflow.onnx.log_model, or convert it to ONNX first (skl2onnx, torch.onnx.export)",
                path.display(),
                names.join(", ")
            );
        };
        let data = onnx
            .get("data")
            .and_then(s)
            .unwrap_or_else(|| "model.onnx".into());
        let inside = Path::new(&data)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            bail!(
                "{}: the onnx flavor's data {data:?} is not a file inside the model directory",
                path.display()
            );
        }
        let top = |k: &str| doc.get(k).and_then(s);
        let sig = |k: &str| doc.get("signature").and_then(|g| g.get(k)).and_then(s);
        Ok(MlflowModel {
            model_file: dir.join(data),
            run_id: top("run_id"),
            model_uuid: top("model_uuid"),
            model_id: top("model_id"),
            utc_time_created: top("utc_time_created"),
            mlflow_version: top("mlflow_version"),
            onnx_version: onnx.get("onnx_version").and_then(s),
            signature_inputs: sig("inputs"),
            signature_outputs: sig("outputs"),
        })
    }

    /// Column names of a column-based signature (`[{"name": ..., "type":
    /// "double"}, ...]`); empty for a tensor signature or none.
    pub fn input_columns(&self) -> Vec<String> {
        let Some(text) = &self.signature_inputs else {
            return Vec::new();
        };
        let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text) else {
            return Vec::new();
        };
        let columns: Vec<String> = items
            .iter()
            .filter(|i| i["type"] != "tensor")
            .filter_map(|i| i["name"].as_str().map(str::to_string))
            .collect();
        if columns.len() == items.len() {
            columns
        } else {
            Vec::new()
        }
    }

    /// The lineage recorded in the manifest.
    pub fn lineage(
        &self,
        registered_name: Option<&str>,
        registered_version: Option<&str>,
    ) -> Value {
        let parse = |t: &Option<String>| {
            t.as_deref()
                .map(|t| serde_json::from_str::<Value>(t).unwrap_or(Value::String(t.into())))
        };
        json!({
            "run_id": self.run_id,
            "model_uuid": self.model_uuid,
            "model_id": self.model_id,
            "utc_time_created": self.utc_time_created,
            "mlflow_version": self.mlflow_version,
            "onnx_version": self.onnx_version,
            "signature": {
                "inputs": parse(&self.signature_inputs),
                "outputs": parse(&self.signature_outputs),
            },
            "registered_model": registered_name,
            "registered_version": registered_version,
        })
    }
}
