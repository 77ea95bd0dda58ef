//! `ferry`: package ONNX models into signed bundles, verify, inspect and run
//! them, and measure drift against their baselines.
//!
//! # Layout
//! - `main.rs`: the command line (one clap `Subcommand` enum; each variant's
//!   `Args` struct owns its `run`), exit codes.
//! - `project.rs`: `ferry.toml`, reading it and turning it into a bundle.
//! - `inputs.rs`: turning files (JSON, images, CSV, directories) into requests.
//! - `keyfile.rs`: reading and writing key files.
//! - `lambda_package.rs`: the deterministic Lambda deployment zip.
//! - `publish.rs`: update channels (a directory with the bundles and index.json).
//! - `output.rs`: human and `--json` output.
//! - `bench.rs`: `ferry bench`, cold and warm measurements of a bundle.

mod bench;
mod engines;
mod inputs;
mod keyfile;
mod lambda_package;
mod mlflow;
mod output;
mod project;
mod publish;
mod scaffold;
mod trust_cmds;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ferry_runtime as rt;
use serde_json::json;

/// Exit codes (documented in the README).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other failure (missing file, bad project file, ...).
    pub const ERROR: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// The bundle was rejected: bad signature, untrusted key, corrupt, ...
    pub const REJECTED: u8 = 3;
    /// The input given to `ferry run` was refused by the pipeline.
    pub const BAD_INPUT: u8 = 4;
    /// A golden example did not match (`ferry pack`).
    pub const GOLDEN_FAILED: u8 = 5;
    /// Drift was detected and `--fail-on-drift` was given.
    pub const DRIFT: u8 = 6;
}

/// An error with its exit code.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub error: anyhow::Error,
}

/// Wraps an error with an exit code.
pub fn fail(code: u8, error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(ExitError(code, error.into()))
}

#[derive(Debug)]
struct ExitError(u8, anyhow::Error);

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.1)
    }
}

impl std::error::Error for ExitError {}

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Package ONNX models into signed, compressed bundles that run the same on edge devices, in WASM sandboxes and on AWS Lambda.",
    long_about = "Package ONNX models into signed, compressed bundles that run the same on edge devices, in WASM sandboxes and on AWS Lambda.\n\n\
A typical session:\n  ferry keygen -o keys/release\n  ferry pack examples/iris --key keys/release.key -o iris.ferry\n  ferry verify iris.ferry --pub keys/release.pub\n  ferry run iris.ferry --pub keys/release.pub --input examples/iris/golden/setosa.json\n  ferry drift iris.ferry --pub keys/release.pub --data examples/iris/data/current_shifted.csv\n\n\
Exit codes: 0 ok, 1 error, 2 usage, 3 bundle rejected, 4 bad input, 5 golden example failed, 6 drift (with --fail-on-drift)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a signing key pair: <OUT>.key (PKCS#8 PEM, mode 0600) and <OUT>.pub.
    Keygen(KeygenArgs),
    /// Check a model and its pipeline, and write a signed bundle.
    Pack(project::PackArgs),
    /// Check a bundle's signatures, sizes and digests.
    Verify(VerifyArgs),
    /// Show what a bundle holds.
    Inspect(InspectArgs),
    /// Run a bundle on an input and print the response.
    Run(RunArgs),
    /// Compare data with the drift baseline inside a bundle.
    Drift(DriftArgs),
    /// Write an AWS Lambda deployment zip: bootstrap + bundle + trusted keys.
    LambdaPackage(lambda_package::LambdaPackageArgs),
    /// Put a verified bundle on an update channel directory and point its index.json at it.
    Publish(publish::PublishArgs),
    /// Write a ferry.toml for a model (ONNX file or MLflow model directory).
    Init(scaffold::InitArgs),
    /// Create, sign and check roots of trust (which keys sign what, with thresholds).
    #[command(subcommand)]
    Root(trust_cmds::RootCommand),
    /// Add an approver's signature to a packed bundle (two-person release).
    Approve(trust_cmds::ApproveArgs),
    /// Write an operator command signed offline (JSON for `mosquitto_pub`).
    #[command(name = "command")]
    Order(trust_cmds::CommandArgs),
    /// Measure a bundle on this machine: cold start, warm latency, throughput.
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct KeygenArgs {
    /// Path prefix of the key pair; writes <OUT>.key and <OUT>.pub.
    #[arg(short, long, value_name = "OUT")]
    out: PathBuf,
    /// Overwrite existing key files.
    #[arg(long)]
    force: bool,
}

/// Which engine runs the model, and where onnxruntime is.
#[derive(Args, Clone, Debug, Default)]
pub struct EngineArgs {
    /// The engine: `auto` (the bundle's preference; else, when both engines
    /// are present and can serve the model, both are measured on load and
    /// tract is kept unless onnxruntime is 1.25x faster), `tract` or
    /// `onnxruntime`.
    #[arg(long, value_name = "ENGINE")]
    pub engine: Option<rt::EngineChoice>,
    /// libonnxruntime's path (else FERRY_ONNXRUNTIME, else a libonnxruntime.so
    /// beside this binary).
    #[arg(long, value_name = "FILE")]
    pub onnxruntime: Option<PathBuf>,
}

impl EngineArgs {
    pub fn options(&self) -> rt::EngineOptions {
        rt::EngineOptions {
            choice: self.engine.unwrap_or_default(),
            onnxruntime: self.onnxruntime.clone(),
        }
    }
}

/// Which keys to trust.
#[derive(Args, Clone)]
pub struct TrustArgs {
    /// Trusted public key file(s) (PEM; a file may hold several keys). Repeatable.
    /// Also read from FERRY_PUB (paths separated by ':').
    #[arg(
        long = "pub",
        value_name = "FILE",
        env = "FERRY_PUB",
        value_delimiter = ':'
    )]
    pub public_keys: Vec<PathBuf>,
    /// Signatures by distinct trusted keys required.
    #[arg(long, default_value_t = 1)]
    pub threshold: usize,
    /// A root of trust (`ferry root init`): check against its release policy
    /// (builder, and approver when it has one) instead of --pub.
    #[arg(long, value_name = "FILE", conflicts_with = "threshold")]
    pub root: Option<PathBuf>,
}

impl TrustArgs {
    fn policy(&self) -> Result<rt::TrustPolicy> {
        if let Some(path) = &self.root {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let root = ferry_format::Root::from_envelope(&bytes)
                .with_context(|| format!("{} is not a valid root", path.display()))?;
            return Ok(root.release_policy().clone());
        }
        if self.public_keys.is_empty() {
            bail!(
                "no trusted key given: pass --pub <FILE> (the .pub file written by `ferry keygen`)"
            );
        }
        let mut keys = Vec::new();
        for path in &self.public_keys {
            keys.extend(keyfile::read_public_keys(path)?);
        }
        Ok(rt::TrustPolicy::with_threshold(keys, self.threshold)?)
    }
}

#[derive(Args)]
struct VerifyArgs {
    /// The bundle file.
    bundle: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// The bundle file.
    bundle: PathBuf,
    /// Also verify the signatures against these keys.
    #[arg(long = "pub", value_name = "FILE")]
    public_keys: Vec<PathBuf>,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The bundle file.
    bundle: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// The request: a .json file (tensor, record or image form), a .png/.jpg
    /// image, a .csv file (rows become records), a .npy array (tensor
    /// pipelines), or - for standard input.
    #[arg(short, long, value_name = "FILE")]
    input: PathBuf,
    /// Content type of the input, when its extension does not say it.
    #[arg(long)]
    content_type: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Print the response JSON on one line (machine-readable).
    #[arg(long)]
    json: bool,
    /// The response form: `json` (the pipeline's answer), or the model's
    /// outputs before postprocessing as `npy` (its one output as a NumPy
    /// array) or `tensors` (every output, application/x-ferry-tensors).
    /// Default: `npy` for an --output ending in .npy, else `json`.
    #[arg(long, value_name = "FORM", value_parser = parse_response_form)]
    accept: Option<rt::ResponseForm>,
    /// Write the response to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

fn parse_response_form(s: &str) -> Result<rt::ResponseForm, String> {
    rt::ResponseForm::parse(s).ok_or_else(|| {
        format!("unknown form `{s}` (expected json, npy or tensors, or their media types)")
    })
}

#[derive(Args)]
struct DriftArgs {
    /// The bundle file.
    bundle: PathBuf,
    /// Current data: a CSV file (tabular and tensor pipelines) or a directory of images.
    #[arg(short, long, value_name = "PATH")]
    data: PathBuf,
    /// Trusted public key(s). Without one the signature is not checked
    /// (digests still are) and a warning is printed.
    #[arg(
        long = "pub",
        value_name = "FILE",
        env = "FERRY_PUB",
        value_delimiter = ':'
    )]
    public_keys: Vec<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Exit with code 6 when the data set drifted.
    #[arg(long)]
    fail_on_drift: bool,
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { rt::keep_onnxruntime_telemetry_off() };
    // A panic caught inside the engine is that request's error, printed
    // with the rest (exit 1).
    rt::quiet_caught_panics(|_| {});
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let result = match cli.command {
        Command::Keygen(a) => keygen(a),
        Command::Pack(a) => a.run(),
        Command::Verify(a) => verify(a),
        Command::Inspect(a) => inspect(a),
        Command::Run(a) => run(a),
        Command::Drift(a) => drift(a),
        Command::LambdaPackage(a) => a.run(),
        Command::Publish(a) => a.run(),
        Command::Init(a) => a.run(),
        Command::Root(c) => trust_cmds::root(c),
        Command::Approve(a) => trust_cmds::approve(a),
        Command::Order(a) => trust_cmds::command(a),
        Command::Bench(a) => a.run(),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            let code = e
                .downcast_ref::<ExitError>()
                .map(|x| x.0)
                .unwrap_or(exit::ERROR);
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn keygen(a: KeygenArgs) -> Result<()> {
    let key = rt::SecretKey::generate()?;
    let (key_path, pub_path) = keyfile::write_key_pair(&a.out, &key, a.force)?;
    eprintln!(
        "wrote {} (private, keep secret) and {}",
        key_path.display(),
        pub_path.display()
    );
    println!("{}", key.key_id());
    Ok(())
}

/// Reads a bundle file.
fn read_bundle(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read bundle {}", path.display()))
}

/// A rejected bundle: exits with [`exit::REJECTED`].
fn rejected(path: &std::path::Path, e: rt::BundleError) -> anyhow::Error {
    fail(
        exit::REJECTED,
        anyhow::anyhow!("{} rejected: {e}", path.display()),
    )
}

/// Verifies the bytes of the bundle at `path`.
fn verify_bytes(
    path: &std::path::Path,
    bytes: &[u8],
    trust: &TrustArgs,
) -> Result<rt::VerifiedBundle> {
    rt::verify(bytes, &trust.policy()?, &rt::ReadLimits::default()).map_err(|e| rejected(path, e))
}

/// Verifies the bytes of a bundle to run it here: guests precompiled for
/// other machines are checked, not decompressed (`rt::verify_for_host`).
fn verify_bytes_for_host(
    path: &std::path::Path,
    bytes: &[u8],
    trust: &TrustArgs,
) -> Result<rt::VerifiedBundle> {
    rt::verify_for_host(bytes, &trust.policy()?, &rt::ReadLimits::default())
        .map_err(|e| rejected(path, e))
}

/// Reads and verifies a bundle.
fn verified(path: &std::path::Path, trust: &TrustArgs) -> Result<rt::VerifiedBundle> {
    verify_bytes(path, &read_bundle(path)?, trust)
}

fn verify(a: VerifyArgs) -> Result<()> {
    let b = verified(&a.bundle, &a.trust)?;
    let m = b.manifest();
    if a.json {
        let summary = json!({
            "ok": true,
            "digest": b.digest(),
            "release_id": b.release_id(),
            "name": m.name,
            "version": m.version,
            "fleet": m.release.fleet,
            "channel": m.release.channel,
            "sequence": m.release.sequence,
            "signed_by": b.signed_by().iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        });
        println!("{summary}");
    } else {
        println!(
            "OK {} {} (sequence {}, {}/{}) signed by {}",
            m.name,
            m.version,
            m.release.sequence,
            m.release.fleet,
            m.release.channel,
            b.signed_by()
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("digest sha256:{}", b.digest());
        println!("release id sha256:{}", b.release_id());
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let bytes = read_bundle(&a.bundle)?;
    let (manifest, key_ids) = rt::inspect_unverified(&bytes, &rt::ReadLimits::default())
        .map_err(|e| rejected(&a.bundle, e))?;
    let verified = if a.public_keys.is_empty() {
        None
    } else {
        let trust = TrustArgs {
            public_keys: a.public_keys.clone(),
            threshold: 1,
            root: None,
        };
        Some(verify_bytes(&a.bundle, &bytes, &trust)?)
    };
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    let release_id = ferry_format::release_id_of(&bytes).map_err(|e| rejected(&a.bundle, e))?;
    output::print_inspect(
        &manifest,
        &key_ids,
        &digest,
        &release_id,
        bytes.len(),
        verified.is_some(),
        a.json,
    );
    Ok(())
}

fn run(a: RunArgs) -> Result<()> {
    let npy_file = a
        .output
        .as_ref()
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy")));
    let (form, asked_by) = match (a.accept, npy_file) {
        (Some(form), Some(path)) if form != rt::ResponseForm::Npy => {
            return Err(fail(
                exit::USAGE,
                anyhow::anyhow!(
                    "--accept {} writes {}, not an array: {} would not be a .npy file \
                     (use --accept npy, or another file name)",
                    form.name(),
                    if form == rt::ResponseForm::Json {
                        "JSON"
                    } else {
                        "a tensor set"
                    },
                    path.display()
                ),
            ));
        }
        (Some(form), _) => (form, format!("--accept {}", form.name())),
        (None, Some(path)) => (
            rt::ResponseForm::Npy,
            format!("--output {} (a .npy file)", path.display()),
        ),
        (None, None) => (rt::ResponseForm::Json, String::new()),
    };
    if form.is_binary() && a.json {
        return Err(fail(
            exit::USAGE,
            anyhow::anyhow!("--json prints the JSON response; {asked_by} asks for a binary one"),
        ));
    }
    if form.is_binary() && a.output.is_none() && std::io::stdout().is_terminal() {
        return Err(fail(
            exit::USAGE,
            anyhow::anyhow!(
                "the {} response is binary: write it with --output FILE or redirect standard output",
                form.name()
            ),
        ));
    }
    let options = a.engine.options();
    let library = rt::preload(&options);
    let bundle = verify_bytes_for_host(&a.bundle, &read_bundle(&a.bundle)?, &a.trust)?;
    let session =
        rt::Session::from_verified_with(bundle, &options).context("cannot load the bundle")?;
    drop(library);
    if let Err(e) = session.check_form(form) {
        return Err(fail(exit::USAGE, anyhow::anyhow!("{asked_by}: {e}")));
    }
    let request = inputs::read_request(&a.input, a.content_type.as_deref())?;
    let response = session
        .infer_as(&request.content_type, &request.body, form)
        .map_err(|e| {
            if e.is_bad_input() {
                fail(
                    exit::BAD_INPUT,
                    anyhow::anyhow!("input {} refused: {e}", a.input.display()),
                )
            } else {
                anyhow::Error::new(e).context("inference failed")
            }
        })?;
    match (&a.output, form) {
        (Some(path), _) => std::fs::write(path, &response)
            .with_context(|| format!("cannot write {}", path.display()))?,
        (None, rt::ResponseForm::Json) => {
            let value: serde_json::Value = serde_json::from_slice(&response)
                .context("the guest answered with invalid JSON")?;
            output::print_response(&value, a.json);
        }
        (None, _) => std::io::stdout()
            .write_all(&response)
            .context("cannot write the response")?,
    }
    // Nothing is left to do: exit without tearing the session down piece by
    // piece (for mobilenet on onnxruntime that took 10 ms after the answer
    // was out: the model's buffers unmapped, onnxruntime's session released),
    // nor running the exit handlers (onnxruntime's static destructors, 4 ms
    // more). Everything written is flushed first, and nothing here keeps
    // state a handler would have to save.
    std::io::stdout()
        .flush()
        .context("cannot write the response")?;
    std::io::stderr()
        .flush()
        .context("cannot write to standard error")?;
    // SAFETY: `fflush(NULL)` flushes every C stdio stream (what a library may
    // have printed); `_exit` then ends the process at once, and no invariant
    // of this program depends on code running after this point.
    unsafe {
        libc::fflush(std::ptr::null_mut());
        libc::_exit(exit::OK.into())
    }
}

fn drift(a: DriftArgs) -> Result<()> {
    let bytes = read_bundle(&a.bundle)?;
    let bundle = if a.public_keys.is_empty() {
        eprintln!(
            "warning: no --pub given: the bundle's signature is not checked (its digests are)"
        );
        rt::verify_integrity_only(&bytes, &rt::ReadLimits::default())
            .map_err(|e| rejected(&a.bundle, e))?
    } else {
        let trust = TrustArgs {
            public_keys: a.public_keys.clone(),
            threshold: 1,
            root: None,
        };
        verify_bytes(&a.bundle, &bytes, &trust)?
    };
    let baseline = bundle.baseline()?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} carries no drift baseline: pack it with [drift] baseline = ...",
            a.bundle.display()
        )
    })?;
    let pre = rt::Preprocessor::from_verified(&bundle)?;
    let kind = inputs::pipeline_kind(bundle.manifest());
    let current = inputs::collect_features(
        &|ct, body| pre.preprocess(ct, body),
        &a.data,
        &kind,
        bundle.manifest(),
    )?;
    let mut sample = rt::CurrentSample::new(&baseline, usize::MAX);
    let order = current.order_for(sample.features())?;
    for row in &current.rows {
        let ordered: Vec<rt::DriftValue> =
            order.iter().map(|&i| rt::drift_value(&row[i])).collect();
        sample.push_row(&ordered)?;
    }
    let report = rt::compare(&baseline, &sample, &bundle.manifest().drift)?;
    output::print_drift(&report, a.json);
    if a.fail_on_drift && report.dataset_drifted {
        return Err(fail(exit::DRIFT, anyhow::anyhow!("data set drifted")));
    }
    Ok(())
}
