//! `ferry init`: a `ferry.toml` scaffolded from a model, an ONNX file or a
//! local MLflow model directory. With an MLflow column-based signature and a
//! model with one rank-2 input of that width, the pipeline is tabular with
//! the signature's column names (requests are records by name); otherwise
//! tensors in, tensors out. Everything written is a starting point to edit:
//! standardisation, labels, golden examples.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_runtime as rt;

use crate::mlflow::{MlflowModel, is_model_dir};

#[derive(Args)]
pub struct InitArgs {
    /// The model: an ONNX file or an MLflow model directory (onnx flavor).
    model: PathBuf,
    /// The project directory to write ferry.toml into (created if missing).
    #[arg(short, long, value_name = "DIR")]
    out: PathBuf,
    /// The bundle name (default: the registered model name, else the file or directory name).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "default")]
    fleet: String,
    /// Overwrite an existing ferry.toml.
    #[arg(long)]
    force: bool,
    /// libonnxruntime's path, to check whether onnxruntime can serve the model (else
    /// FERRY_ONNXRUNTIME, else a libonnxruntime.so beside the binary; without it, tract alone).
    #[arg(long, value_name = "LIB")]
    onnxruntime: Option<PathBuf>,
}

impl InitArgs {
    pub fn run(self) -> Result<()> {
        let target = self.out.join("ferry.toml");
        if target.exists() && !self.force {
            bail!("{} exists: pass --force to overwrite it", target.display());
        }
        let (onnx_path, mlflow) = if is_model_dir(&self.model) {
            let m = MlflowModel::open(&self.model)?;
            (m.model_file.clone(), Some(m))
        } else {
            (self.model.clone(), None)
        };
        let onnx = std::fs::read(&onnx_path)
            .with_context(|| format!("cannot read model {}", onnx_path.display()))?;
        let dir = onnx_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let onnx = rt::inline_external_data(&onnx, &|l| std::fs::read(dir.join(l)))
            .map_err(anyhow::Error::msg)?
            .unwrap_or(onnx);
        // Every engine present is tried, as `ferry pack` does: a model tract
        // refuses may still be served by onnxruntime.
        let options = rt::EngineOptions {
            choice: rt::EngineChoice::Auto,
            onnxruntime: self.onnxruntime.clone(),
        };
        let checks = crate::engines::load_each(&onnx, &options, rt::EngineChoice::Auto)
            .with_context(|| format!("{} cannot be loaded", onnx_path.display()))?;
        let model = checks
            .iter()
            .find_map(|c| c.model.as_ref())
            .expect("load_each returns an engine that loaded");
        let name = self.name.clone().unwrap_or_else(|| {
            self.model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        let path = std::fs::canonicalize(&self.model)
            .with_context(|| format!("cannot resolve {}", self.model.display()))?;
        let columns = mlflow
            .as_ref()
            .map(|m| m.input_columns())
            .unwrap_or_default();
        let tabular_input = match model.inputs() {
            [only]
                if only.shape.len() == 2
                    && !columns.is_empty()
                    && only.shape[1] == Some(columns.len() as u64) =>
            {
                Some(only.name.clone())
            }
            _ => None,
        };
        let mut t = String::new();
        writeln!(
            t,
            "# Scaffolded by `ferry init` from {}.",
            self.model.display()
        )?;
        writeln!(
            t,
            "# Edit, then: ferry pack {} --key KEY -o {name}.ferry",
            self.out.display()
        )?;
        writeln!(t, "# Reference: docs/project-file.md\n")?;
        writeln!(
            t,
            "[model]\nname = {}\nversion = \"0.1.0\"",
            toml_str(&name)
        )?;
        writeln!(t, "path = {}\n", toml_str(&path.display().to_string()))?;
        writeln!(
            t,
            "[release]\nfleet = {}\nchannel = \"stable\"\nsequence = 1\n",
            toml_str(&self.fleet)
        )?;
        match &tabular_input {
            Some(input) => {
                writeln!(
                    t,
                    "[preprocess]\n# Columns of the MLflow signature; requests are records by name.\n\
                     # Add mean/std per feature if the model expects standardised inputs.\n\
                     kind = \"tabular\"\ninput = {}\nfeatures = [",
                    toml_str(input)
                )?;
                for c in &columns {
                    writeln!(t, "  {{ name = {} }},", toml_str(c))?;
                }
                writeln!(t, "]\n")?;
            }
            None => writeln!(
                t,
                "# No [preprocess]: requests are tensors by input name ({}).\n",
                model
                    .inputs()
                    .iter()
                    .map(|i| format!("{} {} {}", i.name, i.dtype, rt::fmt_shape(&i.shape)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?,
        }
        writeln!(
            t,
            "# Outputs: {}. A [postprocess] (kind = \"classification\", labels) names classes.",
            model
                .outputs()
                .iter()
                .map(|o| format!("{} {} {}", o.name, o.dtype, rt::fmt_shape(&o.shape)))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        ferry_host::write_durably(&target, t.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", target.display()))?;
        eprintln!(
            "wrote {} ({})",
            target.display(),
            if tabular_input.is_some() {
                format!(
                    "tabular pipeline, {} columns from the MLflow signature",
                    columns.len()
                )
            } else {
                "tensors in, tensors out".to_string()
            }
        );
        for c in &checks {
            let why = c.reason.as_deref().unwrap_or("");
            match (c.loaded, c.serves) {
                (true, _) => eprintln!(
                    "  engine {}: loads the model (`ferry pack` checks it on the golden examples)",
                    c.engine
                ),
                (false, Some(false)) => {
                    eprintln!("  engine {}: cannot serve the model: {why}", c.engine)
                }
                (false, _) => eprintln!("  engine {}: unknown ({why})", c.engine),
            }
        }
        Ok(())
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
