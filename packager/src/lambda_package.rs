//! `ferry lambda-package`: a deployment zip for AWS Lambda's custom runtime
//! (`provided.al2023`): `bootstrap` for the chosen architecture at the root,
//! the bundle next to it, the trusted public keys in `keys/`, and with
//! `--onnxruntime` the onnxruntime library as `libonnxruntime.so`.
//!
//! The zip is deterministic: entries in a fixed order, every timestamp
//! 1980-01-01 00:00, fixed permissions (0755 for `bootstrap`, 0644 for the
//! rest) and deflate at its default level, so the same inputs give the same
//! bytes (and the same CodeSha256 in Lambda).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipWriter};

use ferry_runtime as rt;

use crate::{TrustArgs, verified};

/// ELF `e_machine` values.
const EM_X86_64: u16 = 0x3E;
const EM_AARCH64: u16 = 0xB7;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    /// x86_64 (Lambda's `x86_64` architecture).
    #[value(name = "x86_64", alias = "amd64")]
    X86_64,
    /// arm64 (Lambda's `arm64`, Graviton).
    #[value(name = "arm64", alias = "aarch64")]
    Arm64,
}

impl Arch {
    fn machine(self) -> u16 {
        match self {
            Arch::X86_64 => EM_X86_64,
            Arch::Arm64 => EM_AARCH64,
        }
    }

    fn triple(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }
}

#[derive(Args)]
pub struct LambdaPackageArgs {
    /// The bundle to deploy.
    bundle: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// Lambda architecture.
    #[arg(long, value_enum)]
    arch: Option<Arch>,
    /// The `bootstrap` executable for that architecture (built from lambda/).
    /// Default: the `bootstrap` next to this `ferry`, when the architecture is this machine's.
    #[arg(long, value_name = "FILE")]
    bootstrap: Option<PathBuf>,
    /// Ship this libonnxruntime (for the same architecture) as
    /// `libonnxruntime.so` beside `bootstrap`, where the runtime looks for it:
    /// the onnxruntime engine then serves the bundle when it can and is
    /// faster (or always, with `--engine onnxruntime`).
    #[arg(long, value_name = "FILE")]
    onnxruntime: Option<PathBuf>,
    /// The engine the function loads, `tract` or `onnxruntime`, written to
    /// `ferry.engine` beside `bootstrap`: each cold start then loads that
    /// engine alone instead of loading both and measuring them (`auto`, the
    /// default). The function's `FERRY_ENGINE` still wins.
    #[arg(long, value_name = "ENGINE")]
    engine: Option<rt::EngineChoice>,
    /// Output zip file.
    #[arg(short, long, value_name = "FILE")]
    out: PathBuf,
}

/// Reads an ELF header's machine; `None` if the file is not a 64-bit ELF.
fn elf_machine(bytes: &[u8]) -> Option<u16> {
    (bytes.len() >= 20 && bytes.starts_with(b"\x7fELF") && bytes[4] == 2)
        .then(|| u16::from_le_bytes([bytes[18], bytes[19]]))
}

impl LambdaPackageArgs {
    pub fn run(self) -> Result<()> {
        let arch = match self.arch.or_else(Arch::host) {
            Some(a) => a,
            None => bail!("pass --arch x86_64 or --arch arm64"),
        };
        // Only a bundle that verifies against the keys shipped with it is packaged.
        let bundle = verified(&self.bundle, &self.trust)?;
        let bootstrap_path = match &self.bootstrap {
            Some(p) => p.clone(),
            None if Some(arch) == Arch::host() => std::env::current_exe()
                .context("cannot locate the ferry executable")?
                .with_file_name("bootstrap"),
            None => bail!(
                "no bootstrap for {}: build one with `cargo build --release -p ferry-lambda --target {}` \
                 (see lambda/README.md) and pass --bootstrap target/{}/release/bootstrap",
                arch.triple(),
                arch.triple(),
                arch.triple()
            ),
        };
        let bootstrap = std::fs::read(&bootstrap_path).with_context(|| {
            format!(
                "cannot read {} (build it with `cargo build --release -p ferry-lambda`)",
                bootstrap_path.display()
            )
        })?;
        match elf_machine(&bootstrap) {
            Some(m) if m == arch.machine() => {}
            Some(m) => bail!(
                "{} is an ELF for machine {m:#x}, not {} ({:#x}): pass the bootstrap built for {}",
                bootstrap_path.display(),
                arch.triple(),
                arch.machine(),
                arch.triple()
            ),
            None => bail!(
                "{} is not a 64-bit Linux executable (ELF)",
                bootstrap_path.display()
            ),
        }
        // A portable guest is compiled at every cold start (Winch: ~0.1 s for
        // the standard guest; docs/PERFORMANCE.md): say so, and how to avoid it.
        let key = ferry_runtime::compatibility_key(Some(arch.triple()));
        if !bundle
            .precompiled_guests()
            .iter()
            .any(|g| g.target() == key)
        {
            eprintln!(
                "warning: {} has no guest precompiled for {}: every cold start compiles it (~0.1 s); \
                 pack with --precompile {} for cold starts of ~20 ms",
                self.bundle.display(),
                arch.triple(),
                match arch {
                    Arch::X86_64 => "x86_64",
                    Arch::Arm64 => "aarch64",
                }
            );
        }
        let bundle_bytes = std::fs::read(&self.bundle)?;
        let bundle_name = format!("{}.ferry", bundle.manifest().name);
        let mut keys = Vec::new();
        for (i, path) in self.trust.public_keys.iter().enumerate() {
            let text =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("key{i}.pub"));
            keys.push((format!("keys/{i:02}-{name}"), text));
        }
        let library = match &self.onnxruntime {
            None => None,
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                match elf_machine(&bytes) {
                    Some(m) if m == arch.machine() => {}
                    _ => bail!(
                        "{} is not a 64-bit Linux shared library for {}",
                        path.display(),
                        arch.triple()
                    ),
                }
                Some(bytes)
            }
        };
        let engine = match self.engine {
            None | Some(rt::EngineChoice::Auto) => {
                if let (Some(lib), Some(true)) =
                    (&self.onnxruntime, Arch::host().map(|h| h == arch))
                {
                    self.measure_engines(&bundle_bytes, lib)?;
                }
                None
            }
            Some(rt::EngineChoice::Only(engine)) => {
                // What the packer found of this engine, if it tried it.
                let report = bundle
                    .manifest()
                    .model
                    .engines
                    .as_ref()
                    .and_then(|e| e.engines.iter().find(|r| r.name == engine.name()));
                let serves = report.and_then(|r| r.serves);
                if let (Some(r), Some(false)) = (report, serves) {
                    bail!(
                        "--engine {engine}: {engine} cannot serve this bundle's model (found when it \
                         was packed: {})",
                        r.reason.as_deref().unwrap_or("no reason recorded")
                    );
                }
                if engine == rt::Engine::OnnxRuntime && library.is_none() {
                    eprintln!(
                        "warning: --engine onnxruntime without --onnxruntime: the function must \
                         find the library itself (FERRY_ONNXRUNTIME), or its start fails"
                    );
                }
                if serves.is_none() {
                    // Not checked when the bundle was packed (the engine was absent there):
                    // check it here where this machine can, or say that nobody did.
                    self.check_engine(&bundle_bytes, engine, arch)?;
                }
                Some(engine)
            }
        };
        let zip = build_zip(
            &bootstrap,
            &bundle_name,
            &bundle_bytes,
            &keys,
            engine,
            library.as_deref(),
        )?;
        ferry_host::write_durably(&self.out, &zip)?;
        println!(
            "wrote {} ({} bytes): bootstrap ({}), {bundle_name}, {} key(s){}{}",
            self.out.display(),
            zip.len(),
            arch.triple(),
            keys.len(),
            match engine {
                Some(e) => format!(", {ENGINE_FILE} ({e})"),
                None => String::new(),
            },
            if library.is_some() {
                ", libonnxruntime.so"
            } else {
                ""
            }
        );
        Ok(())
    }

    /// Loads the bundle on `engine` alone and runs its golden examples, as the
    /// function's cold start will: refused here rather than at every start.
    /// Where this machine cannot (another architecture, or onnxruntime without
    /// `--onnxruntime`), says that the choice is unchecked.
    fn check_engine(&self, bundle: &[u8], engine: rt::Engine, arch: Arch) -> Result<()> {
        let library = match engine {
            rt::Engine::OnnxRuntime => self.onnxruntime.clone(),
            rt::Engine::Tract => None,
        };
        if Arch::host() != Some(arch) || (engine == rt::Engine::OnnxRuntime && library.is_none()) {
            eprintln!(
                "warning: --engine {engine}: nobody checked that {engine} serves this bundle's \
                 model (it was absent when the bundle was packed, and cannot run here); a model \
                 it cannot run fails every cold start"
            );
            return Ok(());
        }
        let options = rt::EngineOptions {
            choice: rt::EngineChoice::Only(engine),
            onnxruntime: library,
        };
        let session =
            rt::Session::load_with(bundle, &self.trust.policy()?, &options).map_err(|e| {
                anyhow::anyhow!("--engine {engine}: {engine} cannot load this bundle's model: {e}")
            })?;
        let failed: Vec<String> = session
            .check_golden()
            .into_iter()
            .filter(|g| !g.passed())
            .map(|g| match g.error {
                Some(e) => format!("{}: {e}", g.name),
                None => match g.mismatches.first() {
                    Some(m) => format!("{}: {m}", g.name),
                    None => g.name,
                },
            })
            .collect();
        if !failed.is_empty() {
            bail!(
                "--engine {engine}: golden examples fail on {engine}: {}",
                failed.join("; ")
            );
        }
        Ok(())
    }

    /// With both engines present and `auto`, the function loads both and
    /// measures them at every cold start: do it once here (this machine's
    /// architecture is the function's) and say what `--engine` would save.
    fn measure_engines(&self, bundle: &[u8], library: &std::path::Path) -> Result<()> {
        let options = rt::EngineOptions {
            choice: rt::EngineChoice::Auto,
            onnxruntime: Some(library.to_path_buf()),
        };
        let session = match rt::Session::load_with(bundle, &self.trust.policy()?, &options) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("note: the engines could not be measured here: {e}");
                return Ok(());
            }
        };
        let race = session.engine_race();
        if race.is_empty() {
            // One engine can serve this model: nothing is measured at start either.
            return Ok(());
        }
        let runs: Vec<String> = race
            .iter()
            .map(|(e, d)| match d {
                Some(d) => format!("{e} {:.1} µs", d.as_secs_f64() * 1e6),
                None => format!("{e} failed"),
            })
            .collect();
        let t = session.timings();
        eprintln!(
            "note: measured here, one run of the model: {}. With both engines shipped and no \
             --engine, every cold start loads both (model load {:.0} ms here) and measures them \
             ({:.0} ms here) before keeping {}; pass --engine {} to load only that one",
            runs.join(", "),
            t.model.as_secs_f64() * 1e3,
            t.engine_race.as_secs_f64() * 1e3,
            session.engine(),
            session.engine(),
        );
        Ok(())
    }
}

/// The file beside `bootstrap` naming the engine the function loads
/// (`lambda/src/init.rs` reads it).
const ENGINE_FILE: &str = "ferry.engine";

fn build_zip(
    bootstrap: &[u8],
    bundle_name: &str,
    bundle: &[u8],
    keys: &[(String, Vec<u8>)],
    engine: Option<rt::Engine>,
    onnxruntime: Option<&[u8]>,
) -> Result<Vec<u8>> {
    let base = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .last_modified_time(DateTime::default());
    let mut zip = ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file("bootstrap", base.unix_permissions(0o755))?;
    zip.write_all(bootstrap)?;
    // The bundle is already zstd-compressed: store it.
    zip.start_file(
        bundle_name,
        base.compression_method(CompressionMethod::Stored)
            .unix_permissions(0o644),
    )?;
    zip.write_all(bundle)?;
    for (name, text) in keys {
        zip.start_file(name.as_str(), base.unix_permissions(0o644))?;
        zip.write_all(text)?;
    }
    if let Some(engine) = engine {
        zip.start_file(ENGINE_FILE, base.unix_permissions(0o644))?;
        writeln!(zip, "{engine}")?;
    }
    if let Some(lib) = onnxruntime {
        zip.start_file("libonnxruntime.so", base.unix_permissions(0o755))?;
        zip.write_all(lib)?;
    }
    Ok(zip.finish()?.into_inner())
}
