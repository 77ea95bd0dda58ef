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
//!   first load (the model alone on the golden examples' tensors, runs of
//!   the two interleaved, for at most [`RACE_BUDGET`]) and keeps tract
//!   unless onnxruntime is faster by a clear margin ([`AUTO_MARGIN`], see
//!   [`auto_pick`]): two engines within noise of each other must not flip
//!   from one load to the next. A bundle packed before engines were recorded
//!   is treated the same way (neither engine refused).
//! - a caller that remembers an earlier `auto` decision for the same release
//!   on the same machine (the edge agent keeps one per release in its state
//!   directory) passes it in: when it is still among the candidates, only
//!   that engine is loaded and nothing is measured
//!   ([`EngineDecision::Remembered`]).
//!
//! Why measured at load, not at pack time: speed is a property of the
//! machine (x86 CI packs bundles that ARM boards run, and tract's NEON
//! kernels are its strength), and timings in the signed manifest would make
//! two packs of the same inputs differ. The price is paid on a first load
//! where both engines are present and `auto` is in force: loading the model
//! into both (in parallel threads) and at most [`RACE_BUDGET`] of runs. A
//! deployment that wants the shortest cold start names its engine.

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

/// Most time spent measuring the two engines under `auto` (both together,
/// runs interleaved), after one untimed run of each on each tensor set: a
/// stable median for a model that runs in microseconds, a few runs of one
/// that takes milliseconds. The measurement stops earlier once the outcome
/// is clear (see [`race`]).
pub const RACE_BUDGET: std::time::Duration = std::time::Duration::from_millis(30);

/// Runs of each engine measured at least, whatever the budget.
pub const RACE_MIN_RUNS: usize = 3;

/// Time measured at least before the race may stop early on a clear
/// outcome: fast models get tens of runs, not three.
pub const RACE_MIN_TIME: std::time::Duration = std::time::Duration::from_millis(2);

/// `auto` leaves tract for onnxruntime only when onnxruntime's median run
/// is at most this fraction of tract's (onnxruntime 1.25x faster or more).
/// tract is the default because it is built in: no library to load, no
/// second copy of the weights; and a fixed preference means two engines
/// within noise of each other (tabular models: equal within 5% on x86_64)
/// give the same answer on every load instead of flipping on a 30 ms race.
pub const AUTO_MARGIN: f64 = 0.8;

/// The outcome is clear, and the race may stop early, when the ratio of the
/// medians is this factor away from [`AUTO_MARGIN`] on either side (a
/// further 25% of noise would not change it).
const CLEAR_FACTOR: f64 = 1.25;

/// How a session's engine was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineDecision {
    /// One engine could serve (asked for by name, or the only one present
    /// and able).
    Only,
    /// `auto` measured the two engines on this load ([`auto_pick`]).
    Measured,
    /// `auto` reused a decision the caller remembered for this release.
    Remembered,
}

impl EngineDecision {
    pub fn name(self) -> &'static str {
        match self {
            EngineDecision::Only => "only",
            EngineDecision::Measured => "measured",
            EngineDecision::Remembered => "remembered",
        }
    }
}

/// `auto`'s rule over two median runs (`None`: that engine failed to run):
/// tract, unless onnxruntime ran and tract did not, or onnxruntime's median
/// is at most [`AUTO_MARGIN`] of tract's.
pub fn auto_pick(
    tract: Option<std::time::Duration>,
    onnxruntime: Option<std::time::Duration>,
) -> Engine {
    match (tract, onnxruntime) {
        (_, None) => Engine::Tract,
        (None, Some(_)) => Engine::OnnxRuntime,
        (Some(t), Some(o)) if o.as_secs_f64() <= t.as_secs_f64() * AUTO_MARGIN => {
            Engine::OnnxRuntime
        }
        (Some(_), Some(_)) => Engine::Tract,
    }
}

/// Whether two medians are far enough from the [`AUTO_MARGIN`] line that a
/// further 25% of noise on their ratio would not change [`auto_pick`].
fn clear_outcome(tract: std::time::Duration, onnxruntime: std::time::Duration) -> bool {
    let ratio = onnxruntime.as_secs_f64() / tract.as_secs_f64().max(1e-12);
    ratio <= AUTO_MARGIN / CLEAR_FACTOR || ratio >= AUTO_MARGIN * CLEAR_FACTOR
}

/// Measures `models` (tract first, then onnxruntime) on `sets`: one untimed
/// run of each on each set, then runs interleaved (each model in turn on
/// the next set, so machine noise hits both) until [`RACE_BUDGET`] has
/// passed, or earlier once each has [`RACE_MIN_RUNS`] runs, [`RACE_MIN_TIME`]
/// has passed and the outcome is clear (judged after rounds 4, 8, 16, ...).
/// Returns each model's median run
/// (`None`: a run failed).
pub fn race(models: &[&EngineModel], sets: &[Vec<Tensor>]) -> Vec<Option<std::time::Duration>> {
    use std::time::{Duration, Instant};
    let mut alive: Vec<bool> = models
        .iter()
        .map(|m| sets.iter().all(|set| m.run(set).is_ok()))
        .collect();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); models.len()];
    let median = |s: &mut Vec<Duration>| {
        s.sort_unstable();
        s[s.len() / 2]
    };
    let start = Instant::now();
    let mut round = 0usize;
    while alive.iter().any(|&a| a) && round < 100_000 {
        let set = &sets[round % sets.len()];
        for (i, m) in models.iter().enumerate() {
            if !alive[i] {
                continue;
            }
            let t = Instant::now();
            match m.run(set) {
                Ok(_) => samples[i].push(t.elapsed()),
                Err(_) => alive[i] = false,
            }
        }
        round += 1;
        if round < RACE_MIN_RUNS {
            continue;
        }
        let elapsed = start.elapsed();
        if elapsed >= RACE_BUDGET {
            break;
        }
        // Judged at doubling round counts: sorting every sample after every
        // round would spend the budget on sorting (thousands of rounds for a
        // model that runs in microseconds).
        if round.is_power_of_two()
            && elapsed >= RACE_MIN_TIME
            && models.len() == 2
            && alive.iter().all(|&a| a)
        {
            let (mut a, mut b) = (samples[0].clone(), samples[1].clone());
            if clear_outcome(median(&mut a), median(&mut b)) {
                break;
            }
        }
    }
    samples
        .iter_mut()
        .zip(&alive)
        .map(|(s, &ok)| (ok && !s.is_empty()).then(|| median(s)))
        .collect()
}

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

/// `libonnxruntime` loading on a background thread ([`preload`]); dropping
/// it waits for the load to finish, so no process exits in the middle of it.
#[derive(Debug)]
pub struct Preload(Option<std::thread::JoinHandle<()>>);

impl Drop for Preload {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// Starts loading `libonnxruntime` (the library and its environment: 15-30
/// ms) on a background thread when `options` may run a model on it
/// (`onnxruntime`, or `auto` with the library found), so a cold start
/// overlaps it with reading and verifying the bundle instead of paying it
/// after. A model load that needs the library waits for this one; an error
/// is left for it to report. Keep the guard alive until the session is
/// loaded.
pub fn preload(options: &EngineOptions) -> Preload {
    let may_use = match options.choice {
        EngineChoice::Only(Engine::Tract) => false,
        EngineChoice::Only(Engine::OnnxRuntime) | EngineChoice::Auto => true,
    };
    let Some(path) = may_use.then(|| options.library().ok()).flatten() else {
        return Preload(None);
    };
    Preload(
        std::thread::Builder::new()
            .name("ferry-ort-load".into())
            .spawn(move || {
                let _ = crate::onnxruntime::load_library(&path);
            })
            .ok(),
    )
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
                // Reading the model's declared inputs and outputs (a parse of
                // the whole protobuf) and onnxruntime's own load are
                // independent: for mobilenet each takes 15-25 ms.
                let describe = || {
                    let description = model::describe(onnx)?;
                    if let Some(opset) = description.opset
                        && opset < ONNXRUNTIME_MIN_OPSET
                    {
                        return Err(ModelError::Load(format!(
                            "onnxruntime does not load opset {opset} (below {ONNXRUNTIME_MIN_OPSET})"
                        )));
                    }
                    Ok(description)
                };
                Ok(EngineModel::OnnxRuntime(OrtModel::load(
                    &library, onnx, describe,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn us(n: u64) -> Option<Duration> {
        Some(Duration::from_micros(n))
    }

    #[test]
    fn auto_keeps_tract_unless_onnxruntime_wins_by_the_margin() {
        use Engine::{OnnxRuntime, Tract};
        // Within noise (tabular models): tract, whichever is ahead.
        assert_eq!(auto_pick(us(100), us(99)), Tract);
        assert_eq!(auto_pick(us(100), us(81)), Tract);
        assert_eq!(auto_pick(us(100), us(120)), Tract);
        // At the margin and beyond (convolutions): onnxruntime.
        assert_eq!(auto_pick(us(100), us(80)), OnnxRuntime);
        assert_eq!(auto_pick(us(14_800), us(8_500)), OnnxRuntime);
        // An engine that failed to run loses.
        assert_eq!(auto_pick(None, us(100)), OnnxRuntime);
        assert_eq!(auto_pick(us(100), None), Tract);
        assert_eq!(auto_pick(None, None), Tract);
    }

    #[test]
    fn the_race_stops_early_only_far_from_the_margin() {
        let d = |n| Duration::from_micros(n);
        assert!(clear_outcome(d(100), d(50)));
        assert!(clear_outcome(d(100), d(100)));
        assert!(!clear_outcome(d(100), d(80)));
        assert!(!clear_outcome(d(100), d(70)));
        assert!(!clear_outcome(d(100), d(90)));
    }
}
