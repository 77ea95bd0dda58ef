//! Engines: which one serves a bundle, and the model type over both.
//!
//! tract is built in; onnxruntime is loaded at run time when its library is
//! found (see [`onnxruntime_library`]). The choice is made per device (agent
//! configuration, `ferry run --engine`) and per bundle (`[model] engine` in
//! `ferry.toml`, recorded in the manifest):
//!
//! - a device setting other than `auto` wins; otherwise the bundle's;
//! - `tract` or `onnxruntime` asked for explicitly: that engine, or a clear
//!   error (library absent, or the packager found the engine cannot serve
//!   the model);
//! - `auto`: the engines present here that the packager did not find unable
//!   to serve the model; when both are, the session measures them on its
//!   first load (the model alone on the golden examples' tensors, for
//!   [`RACE_BUDGET`] each) and keeps the faster. A bundle packed before
//!   engines were recorded is treated the same way (neither engine refused).
//!
//! Why measured at load, not at pack time: speed is a property of the
//! machine (x86 CI packs bundles that ARM boards run, and tract's NEON
//! kernels are its strength), and timings in the signed manifest would make
//! two packs of the same inputs differ. The price is paid once per load and
//! only where both engines are present and `auto` is in force: loading the
//! model twice and [`RACE_BUDGET`] per engine. A deployment that wants the
//! shortest cold start names its engine.

use std::path::{Path, PathBuf};

use ferry_format::{Manifest, TensorSpec};
use ferry_guest_abi::Tensor;

use crate::error::ModelError;
use crate::model::{self, Model};
use crate::onnxruntime::OrtModel;

/// The environment variable naming `libonnxruntime`'s path.
pub const ONNXRUNTIME_ENV: &str = "FERRY_ONNXRUNTIME";

/// File names looked for beside the running binary, in order.
const LIBRARY_NAMES: &[&str] = &["libonnxruntime.so", "libonnxruntime.dylib"];

/// The oldest ONNX opset onnxruntime loads (it refuses models below it; tract
/// runs them).
pub const ONNXRUNTIME_MIN_OPSET: i64 = 7;

/// An engine that runs models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Engine {
    Tract,
    OnnxRuntime,
}

impl Engine {
    pub const ALL: [Engine; 2] = [Engine::Tract, Engine::OnnxRuntime];

    /// The name used in manifests, configuration and output.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Tract => "tract",
            Engine::OnnxRuntime => "onnxruntime",
        }
    }

    pub fn from_name(name: &str) -> Option<Engine> {
        Engine::ALL.into_iter().find(|e| e.name() == name)
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `auto` or one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    #[default]
    Auto,
    Only(Engine),
}

impl EngineChoice {
    pub fn name(self) -> &'static str {
        match self {
            EngineChoice::Auto => "auto",
            EngineChoice::Only(e) => e.name(),
        }
    }
}

impl std::fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for EngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            other => Engine::from_name(other)
                .map(EngineChoice::Only)
                .ok_or_else(|| {
                    format!("unknown engine `{other}` (expected auto, tract or onnxruntime)")
                }),
        }
    }
}

/// How a process picks its engine: the device's choice and where
/// `libonnxruntime` is.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub choice: EngineChoice,
    /// `libonnxruntime`'s path as configured; when `None`, [`ONNXRUNTIME_ENV`]
    /// and the binary's directory are looked at.
    pub onnxruntime: Option<PathBuf>,
}

impl EngineOptions {
    /// One engine, the library looked for as usual.
    pub fn only(engine: Engine) -> EngineOptions {
        EngineOptions {
            choice: EngineChoice::Only(engine),
            onnxruntime: None,
        }
    }

    /// Where `libonnxruntime` is for these options (see [`onnxruntime_library`]).
    pub fn library(&self) -> Result<PathBuf, ModelError> {
        onnxruntime_library(self.onnxruntime.as_deref())
    }
}

/// Finds `libonnxruntime`: the configured path, else [`ONNXRUNTIME_ENV`],
/// else beside the running binary (`libonnxruntime.so`, or the
/// `libonnxruntime.so.1.*` that the PyPI wheel carries). The error says where
/// it looked.
pub fn onnxruntime_library(configured: Option<&Path>) -> Result<PathBuf, ModelError> {
    if let Some(p) = configured {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(ModelError::EngineUnavailable(format!(
                "the configured library {} does not exist",
                p.display()
            )))
        };
    }
    if let Some(p) = std::env::var_os(ONNXRUNTIME_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ModelError::EngineUnavailable(format!(
                "{ONNXRUNTIME_ENV}={} does not exist",
                p.display()
            )))
        };
    }
    let dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    if let Some(dir) = &dir {
        for name in LIBRARY_NAMES {
            if dir.join(name).is_file() {
                return Ok(dir.join(name));
            }
        }
        let mut versioned: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so.1."))
            })
            .collect();
        versioned.sort();
        if let Some(p) = versioned.pop() {
            return Ok(p);
        }
    }
    Err(ModelError::EngineUnavailable(format!(
        "no library configured, {ONNXRUNTIME_ENV} is not set, and there is no libonnxruntime.so beside the binary{}",
        dir.map(|d| format!(" ({})", d.display()))
            .unwrap_or_default()
    )))
}

/// Loads `libonnxruntime` (once per process) and returns its build
/// information: whether onnxruntime can run here.
pub fn onnxruntime_info(options: &EngineOptions) -> Result<String, ModelError> {
    crate::onnxruntime::load_library(&options.library()?)
}

/// Time spent measuring each engine when `auto` has two candidates: enough
/// for a stable median of a model that runs in microseconds, a few runs of
/// one that takes milliseconds.
pub const RACE_BUDGET: std::time::Duration = std::time::Duration::from_millis(30);

/// The engines that may serve a bundle under `options` (see the module's
/// header): one, or two for `auto` to measure, tract first.
pub fn engine_candidates(
    options: &EngineOptions,
    manifest: &Manifest,
) -> Result<Vec<Engine>, ModelError> {
    let recorded = manifest.model.engines.as_ref();
    let bundle_choice = recorded
        .and_then(|e| e.preference.parse::<EngineChoice>().ok())
        .unwrap_or_default();
    let choice = match options.choice {
        EngineChoice::Auto => bundle_choice,
        device => device,
    };
    let refusal = |engine: Engine| -> Option<String> {
        let r = recorded?.engines.iter().find(|r| r.name == engine.name())?;
        (r.serves == Some(false)).then(|| r.reason.clone().unwrap_or_default())
    };
    match choice {
        EngineChoice::Only(engine) => {
            if let Some(reason) = refusal(engine) {
                return Err(ModelError::EngineRefused(format!(
                    "{engine} was asked for and cannot serve this model (found when it was packed: {reason})"
                )));
            }
            if engine == Engine::OnnxRuntime {
                options.library()?;
            }
            Ok(vec![engine])
        }
        EngineChoice::Auto => {
            let tract = refusal(Engine::Tract);
            let ort = match (refusal(Engine::OnnxRuntime), options.library()) {
                (Some(reason), _) => Err(format!("cannot serve this model ({reason})")),
                (None, Err(e)) => Err(e.to_string()),
                (None, Ok(_)) => Ok(()),
            };
            match (tract, ort) {
                (None, Ok(())) => Ok(vec![Engine::Tract, Engine::OnnxRuntime]),
                (None, Err(_)) => Ok(vec![Engine::Tract]),
                (Some(_), Ok(())) => Ok(vec![Engine::OnnxRuntime]),
                (Some(tract), Err(ort)) => Err(ModelError::EngineRefused(format!(
                    "no engine here can serve this model: tract cannot ({tract}); onnxruntime: {ort}"
                ))),
            }
        }
    }
}

/// Median time of `model` on `sets` (each once untimed, then in turn for
/// `budget`, at least 3 runs); `None` when a run fails.
pub fn median_run(
    model: &EngineModel,
    sets: &[Vec<Tensor>],
    budget: std::time::Duration,
) -> Option<std::time::Duration> {
    for set in sets {
        model.run(set).ok()?;
    }
    let mut samples = Vec::new();
    let start = std::time::Instant::now();
    while samples.len() < 3 || (start.elapsed() < budget && samples.len() < 100_000) {
        let set = &sets[samples.len() % sets.len()];
        let t = std::time::Instant::now();
        model.run(set).ok()?;
        samples.push(t.elapsed());
    }
    samples.sort_unstable();
    Some(samples[samples.len() / 2])
}

/// Zeros of the inputs' shapes (batch 1): what `auto` measures with when a
/// bundle has no golden examples.
pub fn zero_tensors(specs: &[TensorSpec]) -> Vec<Tensor> {
    specs
        .iter()
        .filter_map(|s| {
            let dtype = ferry_guest_abi::DType::from_name(&s.dtype)?;
            let shape: Vec<u64> = s.shape.iter().map(|d| d.unwrap_or(1)).collect();
            let n: u64 = shape.iter().product();
            Some(Tensor {
                name: s.name.clone(),
                dtype,
                shape,
                data: vec![0; n as usize * dtype.size()],
            })
        })
        .collect()
}

/// A model loaded into one engine: what the pipeline runs.
// One per session, made once and never moved on a hot path: the size
// difference of the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum EngineModel {
    Tract(Model),
    OnnxRuntime(OrtModel),
}

impl EngineModel {
    /// Loads a model into `engine` (onnxruntime from the library `options`
    /// find).
    pub fn load(
        onnx: &[u8],
        engine: Engine,
        options: &EngineOptions,
    ) -> Result<EngineModel, ModelError> {
        match engine {
            Engine::Tract => Ok(EngineModel::Tract(Model::load(onnx)?)),
            Engine::OnnxRuntime => {
                let library = options.library()?;
                let description = model::describe(onnx)?;
                if let Some(opset) = description.opset
                    && opset < ONNXRUNTIME_MIN_OPSET
                {
                    return Err(ModelError::Load(format!(
                        "onnxruntime does not load opset {opset} (below {ONNXRUNTIME_MIN_OPSET})"
                    )));
                }
                Ok(EngineModel::OnnxRuntime(OrtModel::load(
                    &library,
                    onnx,
                    description,
                )?))
            }
        }
    }

    pub fn engine(&self) -> Engine {
        match self {
            EngineModel::Tract(_) => Engine::Tract,
            EngineModel::OnnxRuntime(_) => Engine::OnnxRuntime,
        }
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        match self {
            EngineModel::Tract(m) => m.inputs(),
            EngineModel::OnnxRuntime(m) => m.inputs(),
        }
    }

    pub fn outputs(&self) -> &[TensorSpec] {
        match self {
            EngineModel::Tract(m) => m.outputs(),
            EngineModel::OnnxRuntime(m) => m.outputs(),
        }
    }

    pub fn dropped_outputs(&self) -> &[String] {
        match self {
            EngineModel::Tract(m) => m.dropped_outputs(),
            EngineModel::OnnxRuntime(m) => m.dropped_outputs(),
        }
    }

    pub fn run(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        match self {
            EngineModel::Tract(m) => m.run(tensors),
            EngineModel::OnnxRuntime(m) => m.run(tensors),
        }
    }
}

/// The ONNX opset of a model's default domain, read without an engine.
pub fn onnx_opset(onnx: &[u8]) -> Result<Option<i64>, ModelError> {
    Ok(model::describe(onnx)?.opset)
}
