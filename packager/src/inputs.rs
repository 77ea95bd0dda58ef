//! Turning files into requests: JSON, images, CSV rows, directories of images.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ferry_runtime::{FeatureKind, Manifest, TensorSet, Value};
use serde_json::{Map, json};

/// Rows sent to the guest per request when extracting features from a CSV.
const CSV_BATCH: usize = 256;

/// A request body and its content type.
pub struct Request {
    pub content_type: String,
    pub body: Vec<u8>,
}

/// Content type of a file, from its extension.
pub fn content_type_for(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "csv" => "text/csv",
        "npy" => "application/x-npy",
        _ => return None,
    })
}

fn sniff(body: &[u8]) -> &'static str {
    if body.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if body.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if body.starts_with(b"\x93NUMPY") {
        "application/x-npy"
    } else if body.starts_with(b"FTS1") {
        "application/x-ferry-tensors"
    } else {
        "application/json"
    }
}

/// Reads a request from a file (or `-` for standard input).
pub fn read_request(path: &Path, content_type: Option<&str>) -> Result<Request> {
    let body = if path.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::stdin()
            .read_to_end(&mut b)
            .context("cannot read standard input")?;
        b
    } else {
        std::fs::read(path).with_context(|| format!("cannot read input {}", path.display()))?
    };
    let ct = match content_type {
        Some(ct) => ct.to_string(),
        None if path.as_os_str() == "-" => sniff(&body).to_string(),
        None => content_type_for(path)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "cannot tell the content type of {} from its extension (.json, .png, .jpg, .csv, .npy): pass --content-type",
                    path.display()
                )
            })?
            .to_string(),
    };
    if ct == "text/csv" {
        let records = csv_records(path)?;
        return Ok(Request {
            content_type: "application/json".into(),
            body: serde_json::to_vec(&json!({ "records": records }))?,
        });
    }
    Ok(Request {
        content_type: ct,
        body,
    })
}

/// A CSV file: the header and the cells of every row.
pub struct Csv {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<serde_json::Value>>,
}

impl Csv {
    /// Reads a CSV file: the header names the fields; an empty cell is a
    /// missing value (null); a cell that parses as a finite number is a
    /// number; anything else is a string.
    pub fn read(path: &Path) -> Result<Csv> {
        let mut reader = csv::Reader::from_path(path)
            .with_context(|| format!("cannot read CSV {}", path.display()))?;
        let headers: Vec<String> = reader
            .headers()
            .with_context(|| format!("{}: no header row", path.display()))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let mut rows = Vec::new();
        for (i, row) in reader.records().enumerate() {
            let row =
                row.with_context(|| format!("{}: row {} is not valid CSV", path.display(), i + 2))?;
            rows.push(
                row.iter()
                    .map(|cell| {
                        let cell = cell.trim();
                        if cell.is_empty() {
                            return serde_json::Value::Null;
                        }
                        match cell.parse::<f64>() {
                            Ok(x) if x.is_finite() => json!(x),
                            Ok(_) => serde_json::Value::Null,
                            Err(_) => json!(cell),
                        }
                    })
                    .collect(),
            );
        }
        if rows.is_empty() {
            bail!("{} has a header but no data rows", path.display());
        }
        Ok(Csv { headers, rows })
    }

    /// Rows as JSON records.
    pub fn records(&self, rows: &[Vec<serde_json::Value>]) -> Vec<Map<String, serde_json::Value>> {
        rows.iter()
            .map(|r| {
                self.headers
                    .iter()
                    .cloned()
                    .zip(r.iter().cloned())
                    .collect()
            })
            .collect()
    }
}

/// Reads a CSV file as JSON records.
pub fn csv_records(path: &Path) -> Result<Vec<Map<String, serde_json::Value>>> {
    let csv = Csv::read(path)?;
    Ok(csv.records(&csv.rows))
}

/// Feature rows extracted from a data set.
#[derive(Default)]
pub struct FeatureRows {
    pub names: Vec<(String, FeatureKind)>,
    pub rows: Vec<Vec<Value>>,
}

impl FeatureRows {
    /// For each feature of `wanted` (the baseline's order), its index in
    /// these rows.
    pub fn order_for(&self, wanted: &[(String, ferry_runtime::DriftKind)]) -> Result<Vec<usize>> {
        wanted
            .iter()
            .map(|(name, _)| {
                self.names
                    .iter()
                    .position(|(n, _)| n == name)
                    .ok_or_else(|| {
                        anyhow::anyhow!("the data has no feature `{name}`, which the baseline has")
                    })
            })
            .collect()
    }

    fn absorb(&mut self, set: TensorSet, source: &str) -> Result<()> {
        let Some(f) = set.features else {
            bail!(
                "the guest returned no features for {source}: drift needs features (see docs/guest-abi.md)"
            );
        };
        if self.names.is_empty() {
            self.names = f.names;
        } else if self.names != f.names {
            bail!("the guest returned different features for {source} than for earlier inputs");
        }
        self.rows.extend(f.rows);
        Ok(())
    }
}

/// The pipeline's preprocessing kind: `tensor`, `tabular`, `image` or `custom`.
pub fn pipeline_kind(m: &Manifest) -> String {
    if m.pipeline.guest.starts_with("custom") {
        return "custom".into();
    }
    serde_json::from_str::<serde_json::Value>(&m.pipeline.config_json)
        .ok()
        .and_then(|v| {
            v.pointer("/preprocess/kind")
                .and_then(|k| k.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "tensor".into())
}

/// Preprocessing of one request (a session's or a bare guest's).
pub type PreprocessFn<'a> = dyn Fn(&str, &[u8]) -> Result<TensorSet, ferry_runtime::Error> + 'a;

/// Runs every sample of a data set (a CSV file, or a directory of images)
/// through preprocessing and collects the features.
pub fn collect_features(
    preprocess: &PreprocessFn<'_>,
    data: &Path,
    kind: &str,
    manifest: &Manifest,
) -> Result<FeatureRows> {
    let mut out = FeatureRows::default();
    if data.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(data)
            .with_context(|| format!("cannot list {}", data.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        for file in &files {
            let Some(ct) = content_type_for(file).filter(|ct| ct.starts_with("image/")) else {
                bail!(
                    "{}: only .png, .jpg and .jpeg files are read from a data directory",
                    file.display()
                );
            };
            let body =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let set =
                preprocess(ct, &body).with_context(|| format!("{} refused", file.display()))?;
            out.absorb(set, &file.display().to_string())?;
        }
        if out.rows.is_empty() {
            bail!("{} holds no images", data.display());
        }
        return Ok(out);
    }
    if kind == "image" {
        bail!("the bundle's pipeline reads images: --data must be a directory of .png/.jpg files");
    }
    let csv = Csv::read(data)?;
    for (n, chunk) in csv.rows.chunks(CSV_BATCH).enumerate() {
        let body = if kind == "tensor" {
            tensor_request(chunk, manifest)?
        } else {
            serde_json::to_vec(&json!({ "records": csv.records(chunk) }))?
        };
        let first = n * CSV_BATCH + 2;
        let set = preprocess("application/json", &body).with_context(|| {
            format!(
                "{}: rows {first}..{} refused",
                data.display(),
                first + chunk.len() - 1
            )
        })?;
        out.absorb(set, &data.display().to_string())?;
    }
    Ok(out)
}

/// CSV rows as a tensor request for a model with one rank-2 input: each row
/// is one sample, columns in file order.
fn tensor_request(rows: &[Vec<serde_json::Value>], m: &Manifest) -> Result<Vec<u8>> {
    let [input] = m.model.inputs.as_slice() else {
        bail!(
            "CSV data needs a model with exactly one input; this one has {}",
            m.model.inputs.len()
        );
    };
    if input.shape.len() != 2 {
        bail!(
            "CSV data needs a model input of rank 2 ([batch, features]); `{}` has rank {}",
            input.name,
            input.shape.len()
        );
    }
    let width = rows[0].len();
    let mut data = Vec::with_capacity(rows.len() * width);
    for (i, row) in rows.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            data.push(v.as_f64().ok_or_else(|| {
                anyhow::anyhow!("row {}: column {} is not a number", i + 2, j + 1)
            })?);
        }
    }
    Ok(serde_json::to_vec(
        &json!({"inputs": {input.name.clone(): {"shape": [rows.len(), width], "data": data}}}),
    )?)
}
