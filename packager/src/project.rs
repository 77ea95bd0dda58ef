//! `ferry.toml` and `ferry pack`: check a model and its pipeline, compute the
//! drift baseline, run the golden examples, and write a signed bundle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_runtime as rt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::engines;
use crate::inputs::{self, content_type_for};
use crate::{exit, fail, keyfile};

/// The standard guest, built from `guest/` for wasm32-wasip1 by build.rs.
pub const STD_GUEST: &[u8] = include_bytes!(env!("FERRY_STD_GUEST_WASM"));

/// Default cap on the guest's memory: the standard guest needs a few MiB
/// for tabular data and about 4 bytes per pixel for images; 64 MiB fits a
/// 2048x2048 RGB image decode with room to spare.
pub const DEFAULT_GUEST_MEMORY_MB: u64 = 64;
/// Default deadline for one guest call; preprocessing takes microseconds
/// to milliseconds, so a second means the guest is stuck.
pub const DEFAULT_GUEST_TIMEOUT_MS: u64 = 1000;
/// Default zstd level: packing happens once, in CI; 19 is close to the best
/// ratio and still decompresses at full speed.
pub const DEFAULT_ZSTD_LEVEL: i32 = 19;

#[derive(Args)]
pub struct PackArgs {
    /// Project directory holding ferry.toml.
    #[arg(
        value_name = "DIR",
        required_unless_present = "model",
        conflicts_with = "model"
    )]
    dir: Option<PathBuf>,
    /// Pack a bare ONNX model (or a local MLflow model directory with the
    /// onnx flavor) instead of a project: tensors in, tensors out.
    #[arg(long, value_name = "FILE|DIR")]
    model: Option<PathBuf>,
    /// The MLflow registered model name, recorded in the lineage.
    #[arg(long, value_name = "NAME")]
    registered_model: Option<String>,
    /// The MLflow registered model version, recorded in the lineage.
    #[arg(long, value_name = "VERSION", requires = "registered_model")]
    registered_version: Option<String>,
    /// With --model: bundle name (default: the file name).
    #[arg(long, requires = "model")]
    name: Option<String>,
    /// With --model: bundle version.
    #[arg(long = "model-version", requires = "model", default_value = "0.0.0")]
    model_version: String,
    /// With --model: a CSV of baseline data for drift (one column per feature of the single rank-2 input).
    #[arg(long, requires = "model")]
    baseline: Option<PathBuf>,
    /// Signing key file (PKCS#8 PEM, from `ferry keygen`). Repeatable for multiple signatures.
    #[arg(long, value_name = "FILE", required_unless_present = "key_env")]
    key: Vec<PathBuf>,
    /// Name of an environment variable holding the signing key (PEM, or base64 of it): how CI secrets arrive.
    #[arg(long, value_name = "NAME")]
    key_env: Option<String>,
    /// Output bundle file.
    #[arg(short, long, value_name = "FILE")]
    out: PathBuf,
    /// Override [release] sequence.
    #[arg(long)]
    sequence: Option<u64>,
    /// Override [release] fleet.
    #[arg(long)]
    fleet: Option<String>,
    /// Override [release] channel.
    #[arg(long)]
    channel: Option<String>,
    /// Store the guest precompiled for these targets: x86_64, aarch64 (native code), armv7 or
    /// pulley32, pulley64 (Pulley bytecode), full target triples, or `none`. Default: x86_64,
    /// aarch64, pulley32, so the bundle runs on every supported device without compiling
    /// (docs/devices.md); a runtime with a compiler compiles the portable module where none fits.
    #[arg(long, value_delimiter = ',', value_name = "TARGETS")]
    precompile: Option<Vec<String>>,
    /// zstd compression level (1-22).
    #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
    /// `--engine`: the bundle's engine preference (overrides `[model] engine`);
    /// `--onnxruntime`: the library to check the model with.
    #[command(flatten)]
    engine: crate::EngineArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectFile {
    model: ModelSection,
    #[serde(default)]
    release: ReleaseSection,
    #[serde(default)]
    preprocess: toml::Table,
    #[serde(default)]
    postprocess: toml::Table,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    drift: DriftSection,
    #[serde(default)]
    golden: Vec<GoldenSection>,
    #[serde(default)]
    lineage: LineageSection,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    name: String,
    version: String,
    path: PathBuf,
    description: Option<String>,
    /// The engine this bundle prefers: `auto` (default), `tract` or
    /// `onnxruntime`.
    #[serde(default)]
    engine: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ReleaseSection {
    fleet: String,
    channel: String,
    sequence: u64,
    min_runtime: Option<String>,
}

impl Default for ReleaseSection {
    fn default() -> Self {
        ReleaseSection {
            fleet: "default".into(),
            channel: "stable".into(),
            sequence: 1,
            min_runtime: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsSection {
    memory_mb: u64,
    timeout_ms: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            memory_mb: DEFAULT_GUEST_MEMORY_MB,
            timeout_ms: DEFAULT_GUEST_TIMEOUT_MS,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DriftSection {
    baseline: Option<PathBuf>,
    #[serde(default)]
    features: BTreeMap<String, rt::DriftRule>,
    drift_share: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldenSection {
    name: String,
    input: PathBuf,
    expected: PathBuf,
    #[serde(default = "default_tolerance")]
    tolerance: f64,
}

fn default_tolerance() -> f64 {
    1e-5
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LineageSection {
    source_commit: Option<String>,
    dataset: Option<PathBuf>,
    #[serde(default)]
    training: BTreeMap<String, serde_json::Value>,
}

/// Everything a bundle is made from, resolved from a project or `--model`.
struct Plan {
    dir: PathBuf,
    file: ProjectFile,
    custom_wasm: Option<(PathBuf, toml::Table)>,
}

fn load_project(dir: &Path) -> Result<Plan> {
    let path = dir.join("ferry.toml");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (a project directory needs a ferry.toml; or use --model FILE)",
            path.display()
        )
    })?;
    let mut file: ProjectFile = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid project file", path.display()))?;
    let custom_wasm = match file.preprocess.remove("wasm") {
        None => None,
        Some(toml::Value::String(p)) => Some((dir.join(p), file.preprocess.clone())),
        Some(_) => bail!("{}: [preprocess] wasm must be a path", path.display()),
    };
    Ok(Plan {
        dir: dir.to_path_buf(),
        file,
        custom_wasm,
    })
}

fn bare_model_plan(model: &Path, a: &PackArgs) -> Result<Plan> {
    let name = match a.name.as_ref().or(a.registered_model.as_ref()) {
        Some(n) => n.clone(),
        None => model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    let file = ProjectFile {
        model: ModelSection {
            name,
            // An MLflow registered version stands in for the default.
            version: match (&a.registered_version, a.model_version.as_str()) {
                (Some(v), "0.0.0") => v.clone(),
                _ => a.model_version.clone(),
            },
            path: model.to_path_buf(),
            description: None,
            engine: None,
        },
        release: ReleaseSection::default(),
        preprocess: toml::Table::new(),
        postprocess: toml::Table::new(),
        limits: LimitsSection::default(),
        drift: DriftSection {
            baseline: a.baseline.clone(),
            ..DriftSection::default()
        },
        golden: Vec::new(),
        lineage: LineageSection::default(),
    };
    Ok(Plan {
        dir: PathBuf::from("."),
        file,
        custom_wasm: None,
    })
}

/// What `ferry pack` precompiles the guest for without `--precompile`: one
/// artifact for each device class Ferry supports (x86_64 and aarch64 native
/// code, 32-bit ARM on Pulley), so a bundle packed without flags runs on the
/// lean device build everywhere. The size this costs: docs/devices.md.
pub const DEFAULT_PRECOMPILE: [&str; 3] = ["x86_64", "aarch64", "pulley32"];

/// The targets of `--precompile` (the default without it; none for `none`).
fn precompile_targets(flag: Option<&[String]>) -> Vec<String> {
    match flag {
        None => DEFAULT_PRECOMPILE
            .iter()
            .map(|t| target_triple(t))
            .collect(),
        Some([none]) if none == "none" => Vec::new(),
        Some(list) => {
            let mut out: Vec<String> = Vec::new();
            for t in list.iter().map(|t| target_triple(t)) {
                if !out.contains(&t) {
                    out.push(t);
                }
            }
            out
        }
    }
}

fn target_triple(t: &str) -> String {
    match t {
        "x86_64" | "x86-64" | "amd64" => "x86_64-unknown-linux-gnu".into(),
        "aarch64" | "arm64" => "aarch64-unknown-linux-gnu".into(),
        // 32-bit ARM has no native wasmtime backend: its guests run on Pulley.
        "armv7" | "armhf" | "arm" => "pulley32".into(),
        other => other.into(),
    }
}

/// Step timer and progress display (hidden with --json or off a terminal).
struct Steps {
    bar: ProgressBar,
    timings: BTreeMap<&'static str, Duration>,
}

impl Steps {
    fn new(quiet: bool) -> Steps {
        let bar = ProgressBar::new_spinner();
        if quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        } else {
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        Steps {
            bar,
            timings: BTreeMap::new(),
        }
    }

    fn run<T>(
        &mut self,
        name: &'static str,
        message: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.bar.set_message(message.to_string());
        let start = Instant::now();
        let out = f();
        self.timings.insert(name, start.elapsed());
        out
    }
}

fn source_date() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH=`{v}` is not a number of seconds")),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)),
    }
}

fn source_commit(configured: Option<&String>) -> Option<String> {
    configured.cloned().or_else(|| {
        ["FERRY_SOURCE_COMMIT", "GITHUB_SHA", "CI_COMMIT_SHA"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
    })
}

fn to_json(table: &toml::Table) -> serde_json::Value {
    serde_json::to_value(table).expect("TOML values convert to JSON")
}

impl PackArgs {
    pub fn run(self) -> Result<()> {
        let started = Instant::now();
        let plan = match (&self.dir, &self.model) {
            (Some(dir), None) => load_project(dir)?,
            (None, Some(model)) => bare_model_plan(model, &self)?,
            _ => bail!("give a project directory or --model FILE"),
        };
        let mut signers = Vec::new();
        for k in &self.key {
            signers.push(keyfile::read_secret_key(k)?);
        }
        if let Some(name) = &self.key_env {
            signers.push(keyfile::read_secret_key_env(name)?);
        }
        let f = &plan.file;
        let mut steps = Steps::new(self.json);

        // 1. The model: tract must load and optimise it. An MLflow model
        // directory names its ONNX file; weights in external-data files
        // beside it are inlined (a bundle carries one self-contained model).
        let mut model_path = plan.dir.join(&f.model.path);
        let mlflow = if crate::mlflow::is_model_dir(&model_path) {
            let m = crate::mlflow::MlflowModel::open(&model_path)?;
            model_path = m.model_file.clone();
            Some(m)
        } else {
            None
        };
        let onnx = std::fs::read(&model_path)
            .with_context(|| format!("cannot read model {}", model_path.display()))?;
        let model_dir = model_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let onnx = match rt::inline_external_data(&onnx, &|location| {
            std::fs::read(model_dir.join(location))
        }) {
            Ok(Some(inlined)) => inlined,
            Ok(None) => onnx,
            Err(e) => bail!("{} cannot be packed: {e}", model_path.display()),
        };
        let preference = match (self.engine.engine, &f.model.engine) {
            (Some(e), _) => e,
            (None, Some(name)) => name
                .parse::<rt::EngineChoice>()
                .map_err(|e| anyhow::anyhow!("{}: [model] engine: {e}", plan.dir.display()))?,
            (None, None) => rt::EngineChoice::Auto,
        };
        let options = rt::EngineOptions {
            choice: rt::EngineChoice::Auto,
            onnxruntime: self.engine.onnxruntime.clone(),
        };
        let mut checks = steps.run("model_load", "loading the model with each engine", || {
            engines::load_each(&onnx, &options, preference)
                .with_context(|| format!("{} cannot be packed", model_path.display()))
        })?;
        let model = checks
            .iter()
            .find_map(|c| c.model.as_ref())
            .expect("load_each returns an engine that loaded");
        for dropped in model.dropped_outputs() {
            eprintln!(
                "warning: model output {dropped} has an unsupported element type and is left out"
            );
        }

        // 2. The guest and its configuration.
        let (wasm, guest_name, pre_cfg, post_cfg) = match &plan.custom_wasm {
            Some((path, cfg)) => {
                let wasm = std::fs::read(path)
                    .with_context(|| format!("cannot read guest {}", path.display()))?;
                (
                    wasm,
                    "custom".to_string(),
                    to_json(cfg),
                    to_json(&f.postprocess),
                )
            }
            None => (
                STD_GUEST.to_vec(),
                format!("standard {}", env!("CARGO_PKG_VERSION")),
                to_json(&f.preprocess),
                to_json(&f.postprocess),
            ),
        };
        let config_json = serde_json::to_string(&json!({
            "abi": 1,
            "preprocess": pre_cfg,
            "postprocess": post_cfg,
            "model": {"inputs": model.inputs(), "outputs": model.outputs()},
        }))?;

        let release = rt::Release {
            fleet: self
                .fleet
                .clone()
                .unwrap_or_else(|| f.release.fleet.clone()),
            channel: self
                .channel
                .clone()
                .unwrap_or_else(|| f.release.channel.clone()),
            sequence: self.sequence.unwrap_or(f.release.sequence),
        };
        let mut drift_config = rt::DriftConfig {
            rules: f.drift.features.clone(),
            ..rt::DriftConfig::default()
        };
        if let Some(share) = f.drift.drift_share {
            drift_config.drift_share = share;
        }
        let dataset_sha256 = match &f.lineage.dataset {
            Some(p) => {
                let p = plan.dir.join(p);
                Some(hex::encode(Sha256::digest(
                    std::fs::read(&p)
                        .with_context(|| format!("cannot read dataset {}", p.display()))?,
                )))
            }
            None => None,
        };
        let mut manifest = rt::Manifest {
            format_version: rt::FORMAT_VERSION,
            name: f.model.name.clone(),
            version: f.model.version.clone(),
            description: f.model.description.clone(),
            created: source_date()?,
            min_runtime: f
                .release
                .min_runtime
                .clone()
                // The bundle format's `min_runtime` is MAJOR.MINOR.PATCH without
                // a pre-release suffix: a `-rc.1` build needs what its release has.
                .unwrap_or_else(|| {
                    let v = env!("CARGO_PKG_VERSION");
                    v.split(['-', '+']).next().unwrap_or(v).to_string()
                }),
            packager: format!("ferry {}", env!("CARGO_PKG_VERSION")),
            release,
            model: rt::ModelInfo {
                format: "onnx".into(),
                inputs: model.inputs().to_vec(),
                outputs: model.outputs().to_vec(),
                engines: None,
            },
            pipeline: rt::Pipeline {
                guest: guest_name,
                config_json,
            },
            limits: rt::GuestLimits {
                memory_bytes: f.limits.memory_mb << 20,
                timeout_ms: f.limits.timeout_ms,
            },
            drift: drift_config,
            lineage: rt::Lineage {
                source_commit: source_commit(f.lineage.source_commit.as_ref()),
                dataset_sha256,
                training_json: {
                    let mut training = f.lineage.training.clone();
                    if let Some(m) = &mlflow {
                        training.insert(
                            "mlflow".into(),
                            m.lineage(
                                self.registered_model.as_deref(),
                                self.registered_version.as_deref(),
                            ),
                        );
                    }
                    rt::lineage_training(&training)
                },
            },
            artifacts: Vec::new(),
        };
        // The sessions below load their own copies; free these before they do.
        for c in &mut checks {
            c.model = None;
        }

        // 3. A session over the draft, to run goldens and compute the baseline.
        let mut artifacts = vec![
            artifact(rt::role::MODEL, "application/onnx", onnx, None, true),
            artifact(
                rt::role::GUEST,
                "application/wasm",
                wasm.clone(),
                None,
                false,
            ),
        ];
        for triple in precompile_targets(self.precompile.as_deref()) {
            let (bytes, key) = steps.run(
                "precompile",
                &format!("precompiling the guest for {triple}"),
                || {
                    rt::precompile(&wasm, Some(&triple))
                        .with_context(|| format!("cannot precompile the guest for {triple}"))
                },
            )?;
            artifacts.push(artifact(
                rt::role::GUEST_PRECOMPILED,
                "application/x-wasmtime",
                bytes,
                Some(key),
                false,
            ));
        }
        // The golden examples on every engine that loaded the model: the
        // first (the preferred one) must pass them, as ever; another that
        // fails them is recorded as unable to serve the model.
        let mut session = None;
        let mut golden = Vec::new();
        for check in checks.iter_mut() {
            if !check.loaded {
                continue;
            }
            let engine = check.engine;
            let s = steps.run("session", "starting the pipeline", || {
                draft_session(&manifest, &artifacts, &options, engine)
            })?;
            let outcome = steps.run("golden", "running the golden examples", || {
                check_golden(&plan, &s)
            });
            match outcome {
                Ok(examples) => {
                    check.median_ns =
                        Some(steps.run("engine_timing", "timing the engines", || {
                            Ok(engines::median_run_ns(&s, &examples))
                        })?);
                    check.serves = Some(true);
                    if session.is_none() {
                        golden = examples;
                        session = Some(s);
                    }
                }
                Err(e) if session.is_some() => {
                    eprintln!(
                        "warning: {engine} loads the model and fails its golden examples: {e:#}"
                    );
                    check.serves = Some(false);
                    check.reason = Some(format!("golden examples failed: {e:#}"));
                }
                Err(e) => return Err(e.context(format!("on {engine}"))),
            }
        }
        let session = session.expect("the first engine that loaded passed or returned");
        manifest.model.engines = Some(engines::support(preference, &checks));
        let baseline = match &f.drift.baseline {
            None => None,
            Some(p) => {
                let path = plan.dir.join(p);
                let kind = inputs::pipeline_kind(&manifest);
                Some(steps.run("baseline", "computing the drift baseline", || {
                    let rows = inputs::collect_features(
                        &|ct, body| session.preprocess(ct, body),
                        &path,
                        &kind,
                        &manifest,
                    )
                    .with_context(|| {
                        format!("cannot compute the drift baseline from {}", path.display())
                    })?;
                    let mut builder = rt::BaselineBuilder::new(
                        rows.names
                            .iter()
                            .map(|(n, k)| (n.clone(), rt::drift_kind(*k))),
                    )?;
                    for row in &rows.rows {
                        builder.push_row(&row.iter().map(rt::drift_value).collect::<Vec<_>>())?;
                    }
                    let baseline = builder.finish();
                    manifest
                        .drift
                        .validate(&baseline)
                        .context("[drift] in ferry.toml does not fit the baseline")?;
                    Ok(baseline)
                })?)
            }
        };
        drop(session);
        if let Some(b) = &baseline {
            artifacts.push(artifact(
                rt::role::DRIFT_BASELINE,
                "application/cbor",
                rt::to_cbor(b),
                None,
                false,
            ));
        }
        if !golden.is_empty() {
            artifacts.push(artifact(
                rt::role::GOLDEN,
                "application/cbor",
                rt::to_cbor(&golden),
                None,
                false,
            ));
        }

        // 4. Compress, sign, check what was written, and write atomically.
        let signer_refs: Vec<&rt::SecretKey> = signers.iter().collect();
        let (manifest, bytes) = steps.run("compress_sign", "compressing and signing", || {
            Ok(rt::write_bundle(
                manifest,
                &artifacts,
                &signer_refs,
                self.level,
            )?)
        })?;
        let trust = rt::TrustPolicy::new(signers.iter().map(|k| k.public()).collect())?;
        let verified = rt::verify(&bytes, &trust, &rt::ReadLimits::default())
            .context("the bundle just written does not verify")?;
        ferry_host::write_durably(&self.out, &bytes)?;
        steps.bar.finish_and_clear();

        let model_art = manifest.artifact(rt::role::MODEL).expect("model artifact");
        if self.json {
            let summary = json!({
                "bundle": self.out,
                "digest": verified.digest(),
                "size": bytes.len(),
                "name": manifest.name,
                "version": manifest.version,
                "release": manifest.release,
                "signed_by": verified.signed_by().iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                "model": {"size": model_art.size, "compressed_size": model_art.compressed_size, "encoding": model_art.encoding},
                "artifacts": manifest.artifacts.iter().map(|a| json!({
                    "role": a.role, "size": a.size, "compressed_size": a.compressed_size, "encoding": a.encoding, "sha256": a.sha256, "target": a.target,
                })).collect::<Vec<_>>(),
                "guest_targets": crate::output::guest_targets(&manifest),
                "golden": {"passed": golden.len(), "failed": 0},
                "engines": manifest.model.engines,
                "baseline_features": baseline.as_ref().map(|b| b.features.len()).unwrap_or(0),
                "timings_ms": steps.timings.iter().map(|(k, v)| (k.to_string(), json!(v.as_secs_f64() * 1e3))).collect::<serde_json::Map<_, _>>(),
                "total_ms": started.elapsed().as_secs_f64() * 1e3,
            });
            println!("{summary}");
        } else {
            println!(
                "packed {} {} -> {} ({} bytes; model {} -> {} bytes, {:?})",
                manifest.name,
                manifest.version,
                self.out.display(),
                bytes.len(),
                model_art.size,
                model_art.compressed_size,
                model_art.encoding
            );
            println!("  golden examples: {} passed", golden.len());
            for line in engines::describe(&checks) {
                println!("  {line}");
            }
            println!(
                "  guest runs on: {}",
                crate::output::describe_guest_targets(&manifest)
            );
            if let Some(b) = &baseline {
                println!("  drift baseline: {} feature(s)", b.features.len());
            }
            println!("  digest sha256:{}", verified.digest());
        }
        Ok(())
    }
}

fn artifact(
    role: &str,
    media_type: &str,
    content: Vec<u8>,
    target: Option<String>,
    try_shuffle: bool,
) -> rt::ArtifactInput {
    rt::ArtifactInput {
        role: role.into(),
        media_type: media_type.into(),
        content,
        target,
        try_shuffle,
    }
}

/// A session over artifacts that have not been written yet (the packager's
/// own inputs: nothing untrusted), to run goldens and extract features.
fn draft_session(
    manifest: &rt::Manifest,
    artifacts: &[rt::ArtifactInput],
    options: &rt::EngineOptions,
    engine: rt::Engine,
) -> Result<rt::Session> {
    let mut m = manifest.clone();
    m.artifacts = artifacts
        .iter()
        .map(|a| rt::Artifact {
            role: a.role.clone(),
            media_type: a.media_type.clone(),
            encoding: rt::Encoding::Zstd,
            offset: 0,
            compressed_size: 0,
            size: a.content.len() as u64,
            sha256: String::new(),
            compressed_sha256: String::new(),
            target: a.target.clone(),
        })
        .collect();
    let draft = rt::VerifiedBundle::draft(m, artifacts.iter().map(|a| a.content.clone()).collect());
    let options = rt::EngineOptions {
        choice: rt::EngineChoice::Only(engine),
        onnxruntime: options.onnxruntime.clone(),
    };
    rt::Session::from_verified_with(draft, &options).map_err(|e| {
        if matches!(e, rt::Error::Guest(rt::GuestError::Config(_))) {
            anyhow::anyhow!("the pipeline configuration ([preprocess]/[postprocess] in ferry.toml) is invalid: {e}")
        } else {
            anyhow::Error::new(e).context("cannot start the pipeline")
        }
    })
}

fn check_golden(plan: &Plan, session: &rt::Session) -> Result<Vec<rt::GoldenExample>> {
    let mut examples = Vec::new();
    let mut report = String::new();
    for g in &plan.file.golden {
        let input_path = plan.dir.join(&g.input);
        let expected_path = plan.dir.join(&g.expected);
        let input = std::fs::read(&input_path).with_context(|| {
            format!("golden `{}`: cannot read {}", g.name, input_path.display())
        })?;
        let expected_text = std::fs::read_to_string(&expected_path).with_context(|| {
            format!(
                "golden `{}`: cannot read {}",
                g.name,
                expected_path.display()
            )
        })?;
        let expected: serde_json::Value =
            serde_json::from_str(&expected_text).with_context(|| {
                format!(
                    "golden `{}`: {} is not JSON",
                    g.name,
                    expected_path.display()
                )
            })?;
        let content_type = content_type_for(&input_path)
            .filter(|ct| *ct != "text/csv")
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "golden `{}`: {} must be .json, .png, .jpg or .jpeg",
                    g.name,
                    input_path.display()
                )
            })?;
        let example = rt::GoldenExample {
            name: g.name.clone(),
            content_type: content_type.into(),
            input,
            expected_json: serde_json::to_string(&expected)?,
            tolerance: g.tolerance,
        };
        let outcome = session.check_example(&example);
        if let Some(e) = &outcome.error {
            report.push_str(&format!(
                "\n  golden `{}` ({}): the pipeline failed: {e}",
                g.name,
                input_path.display()
            ));
        }
        if !outcome.mismatches.is_empty() {
            report.push_str(&format!(
                "\n  golden `{}` ({} vs {}, tolerance {}):",
                g.name,
                input_path.display(),
                expected_path.display(),
                g.tolerance
            ));
            for m in &outcome.mismatches {
                report.push_str(&format!("\n    {m}"));
            }
        }
        examples.push(example);
    }
    if !report.is_empty() {
        return Err(fail(
            exit::GOLDEN_FAILED,
            anyhow::anyhow!("golden example(s) failed; no bundle written:{report}"),
        ));
    }
    Ok(examples)
}
