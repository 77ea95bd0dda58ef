//! `ferry pack`'s engine checks: which engines can serve a model (recorded
//! in the manifest), and how fast each runs it here (printed, not recorded:
//! `auto` measures where the bundle runs; see the runtime's `engine`).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ferry_runtime as rt;

/// Model runs timed per engine at least (and at most [`TIMING_MAX_RUNS`]),
/// within [`TIMING_BUDGET`]: enough for a stable median of a model that runs
/// in microseconds, without making packing of a heavy model slow.
const TIMING_MIN_RUNS: usize = 5;
const TIMING_MAX_RUNS: usize = 2000;
const TIMING_BUDGET: Duration = Duration::from_millis(300);

/// What packing found about one engine.
pub struct EngineCheck {
    pub engine: rt::Engine,
    /// The model as this engine loaded it (dropped once its specs are read).
    pub model: Option<rt::EngineModel>,
    /// Whether the engine loaded the model.
    pub loaded: bool,
    /// `None` until known (an engine absent here stays unknown).
    pub serves: Option<bool>,
    pub reason: Option<String>,
    pub median_ns: Option<u64>,
}

/// Loads the model with each engine, the preferred one first (tract first
/// under `auto`). Fails when no engine can load it, or when the engine asked
/// for cannot.
pub fn load_each(
    onnx: &[u8],
    options: &rt::EngineOptions,
    preference: rt::EngineChoice,
) -> Result<Vec<EngineCheck>> {
    let mut order = rt::Engine::ALL.to_vec();
    if let rt::EngineChoice::Only(e) = preference {
        order.sort_by_key(|x| *x != e);
    }
    let mut checks = Vec::new();
    for engine in order {
        let mut check = EngineCheck {
            engine,
            model: None,
            loaded: false,
            serves: None,
            reason: None,
            median_ns: None,
        };
        let absent = match engine {
            rt::Engine::OnnxRuntime => options.library().err(),
            rt::Engine::Tract => None,
        };
        match absent {
            Some(why) => {
                // Not present here: what is known without it.
                let opset = rt::onnx_opset(onnx).ok().flatten();
                match opset.filter(|&v| v < rt::ONNXRUNTIME_MIN_OPSET) {
                    Some(v) => {
                        check.serves = Some(false);
                        check.reason = Some(format!(
                            "opset {v} is below {}, the oldest onnxruntime loads",
                            rt::ONNXRUNTIME_MIN_OPSET
                        ));
                    }
                    None => {
                        check.reason = Some(format!("not checked: {why}"));
                    }
                }
            }
            None => match rt::EngineModel::load(onnx, engine, options) {
                Ok(m) => {
                    check.model = Some(m);
                    check.loaded = true;
                }
                Err(e) => {
                    check.serves = Some(false);
                    check.reason = Some(e.to_string());
                }
            },
        }
        checks.push(check);
    }
    if let rt::EngineChoice::Only(e) = preference
        && !checks[0].loaded
    {
        bail!(
            "the bundle asks for {e}, which cannot serve it here: {}",
            checks[0].reason.as_deref().unwrap_or("")
        );
    }
    if !checks.iter().any(|c| c.loaded) {
        bail!(
            "no engine can serve the model: {}",
            checks
                .iter()
                .map(|c| format!("{}: {}", c.engine, c.reason.as_deref().unwrap_or("")))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(checks)
}

/// Median time of the model alone on the golden examples' tensors (zeros of
/// the inputs' shapes, batch 1, without examples).
pub fn median_run_ns(session: &rt::Session, examples: &[rt::GoldenExample]) -> u64 {
    let mut sets: Vec<Vec<rt::Tensor>> = examples
        .iter()
        .filter_map(|g| session.preprocess(&g.content_type, &g.input).ok())
        .map(|s| s.tensors)
        .collect();
    if sets.is_empty() {
        sets.push(rt::zero_tensors(&session.manifest().model.inputs));
    }
    let mut samples = Vec::new();
    // One untimed run per set: first-call work is not what `auto` compares.
    for set in &sets {
        let _ = session.run_model(set);
    }
    let start = Instant::now();
    while samples.len() < TIMING_MAX_RUNS
        && (samples.len() < TIMING_MIN_RUNS || start.elapsed() < TIMING_BUDGET)
    {
        let set = &sets[samples.len() % sets.len()];
        let t = Instant::now();
        if session.run_model(set).is_err() {
            break;
        }
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied().unwrap_or(u64::MAX)
}

/// The manifest's record of the checks.
pub fn support(preference: rt::EngineChoice, checks: &[EngineCheck]) -> rt::EngineSupport {
    rt::EngineSupport {
        preference: preference.name().into(),
        engines: checks
            .iter()
            .map(|c| rt::EngineReport {
                name: c.engine.name().into(),
                serves: c.serves,
                reason: c.reason.clone(),
            })
            .collect(),
    }
}

/// One line per engine for `ferry pack`'s summary.
pub fn describe(checks: &[EngineCheck]) -> Vec<String> {
    checks
        .iter()
        .map(|c| match (c.serves, c.median_ns) {
            (Some(true), Some(ns)) => format!(
                "engine {}: can serve the model ({:.1} µs per run here)",
                c.engine,
                ns as f64 / 1e3
            ),
            (Some(true), None) => format!("engine {}: can serve the model", c.engine),
            (Some(false), _) => format!(
                "engine {}: cannot serve the model: {}",
                c.engine,
                c.reason.as_deref().unwrap_or("")
            ),
            (None, _) => format!(
                "engine {}: unknown ({})",
                c.engine,
                c.reason.as_deref().unwrap_or("")
            ),
        })
        .collect()
}
