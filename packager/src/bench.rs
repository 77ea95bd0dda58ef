//! `ferry bench`: what a bundle costs on this machine, the way `tract bench`
//! and `onnxruntime_perf_test` serve their users. Measures, in one process:
//!
//! - cold: reading the file, verifying it, loading the guest (compiling it,
//!   or loading a precompiled one) and the model (in parallel threads), and
//!   the first prediction;
//! - warm: latency percentiles of the model alone (the engine on the tensors
//!   the guest made from the input) and of the whole pipeline;
//! - throughput: predictions per second with 1 thread and with `--threads`
//!   threads sharing one session.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use ferry_runtime as rt;
use serde_json::json;

use crate::{EngineArgs, TrustArgs, exit, fail, inputs, read_bundle, verify_bytes_for_host};

/// Calls measured per warm phase at least, however long they take.
const MIN_CALLS: u32 = 10;
/// Calls measured per warm phase at most, however fast they are (bounds the
/// memory of the latency samples).
const MAX_CALLS: u32 = 1_000_000;

#[derive(Args)]
pub struct BenchArgs {
    /// The bundle file.
    bundle: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// The request to measure with: a .json file, a .png/.jpg image, or -
    /// for standard input (as `ferry run --input`).
    #[arg(short, long, value_name = "FILE")]
    input: PathBuf,
    /// Content type of the input, when its extension does not say it.
    #[arg(long)]
    content_type: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// The response form the pipeline answers in (as `ferry run --accept`):
    /// `json`, or `npy`/`tensors` (the model's outputs, postprocessing skipped).
    #[arg(long, value_name = "FORM", default_value = "json", value_parser = crate::parse_response_form)]
    accept: rt::ResponseForm,
    /// Threads for the throughput measurement (default: the CPUs available).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Seconds spent on each warm measurement (model, pipeline, throughput
    /// with 1 thread, with N threads); at least 10 calls each.
    #[arg(long, value_name = "S", default_value_t = 2.0)]
    seconds: f64,
    /// Print the results as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Latency percentiles of a series of calls.
struct Latency {
    calls: usize,
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latency {
            calls: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            mean: samples.iter().sum::<Duration>() / samples.len() as u32,
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "calls": self.calls,
            "p50_us": us(self.p50),
            "p99_us": us(self.p99),
            "mean_us": us(self.mean),
        })
    }
}

fn us(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Times `f` until `budget` has passed and at least [`MIN_CALLS`] calls.
fn measure(budget: Duration, f: &mut dyn FnMut() -> Result<()>) -> Result<Latency> {
    let start = Instant::now();
    let mut samples = Vec::new();
    while (samples.len() < MIN_CALLS as usize || start.elapsed() < budget)
        && samples.len() < MAX_CALLS as usize
    {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed());
    }
    Ok(Latency::of(samples))
}

/// Predictions per second with `threads` threads calling `infer` for `budget`.
fn throughput(
    session: &rt::Session,
    request: &inputs::Request,
    form: rt::ResponseForm,
    threads: usize,
    budget: Duration,
) -> Result<f64> {
    let start = Instant::now();
    let counts = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<u64> {
                    let mut n = 0u64;
                    while n < MIN_CALLS as u64 || start.elapsed() < budget {
                        session.infer_as(&request.content_type, &request.body, form)?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a benchmark thread panicked"))
            .collect::<Result<Vec<u64>>>()
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(counts.iter().sum::<u64>() as f64 / elapsed)
}

impl BenchArgs {
    pub fn run(self) -> Result<()> {
        if !(self.seconds.is_finite() && self.seconds > 0.0 && self.seconds <= 3600.0) {
            anyhow::bail!("--seconds must be between 0 and 3600, got {}", self.seconds);
        }
        let threads = match self.threads {
            Some(0) => anyhow::bail!("--threads must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let budget = Duration::from_secs_f64(self.seconds);
        // A missing key is said before anything is read.
        self.trust.policy()?;
        let request = inputs::read_request(&self.input, self.content_type.as_deref())?;

        // Cold: each step as a process starting on this bundle takes it
        // (`ferry run`: onnxruntime's library loads beside reading and
        // verifying).
        let start = Instant::now();
        let library = rt::preload(&self.engine.options());
        let bytes = read_bundle(&self.bundle)?;
        let read = start.elapsed();
        let t = Instant::now();
        let bundle = verify_bytes_for_host(&self.bundle, &bytes, &self.trust)?;
        let verify = t.elapsed();
        let t = Instant::now();
        let session = rt::Session::from_verified_with(bundle, &self.engine.options())
            .context("cannot load the bundle")?;
        let load = t.elapsed();
        drop(library);
        let loaded = session.timings();
        let refused = |e: rt::Error| {
            if e.is_bad_input() {
                fail(
                    exit::BAD_INPUT,
                    anyhow::anyhow!("input {} refused: {e}", self.input.display()),
                )
            } else {
                anyhow::Error::new(e).context("inference failed")
            }
        };
        let form = self.accept;
        if let Err(e) = session.check_form(form) {
            return Err(fail(
                exit::USAGE,
                anyhow::anyhow!("--accept {}: {e}", form.name()),
            ));
        }
        let t = Instant::now();
        session
            .infer_as(&request.content_type, &request.body, form)
            .map_err(refused)?;
        let first = t.elapsed();
        let cold_total = start.elapsed();

        // Warm.
        let tensors = session
            .preprocess(&request.content_type, &request.body)
            .map_err(refused)?
            .tensors;
        let model = measure(budget, &mut || {
            std::hint::black_box(session.run_model(&tensors)?);
            Ok(())
        })?;
        let pipeline = measure(budget, &mut || {
            std::hint::black_box(session.infer_as(&request.content_type, &request.body, form)?);
            Ok(())
        })?;
        let one = throughput(&session, &request, form, 1, budget)?;
        let many = throughput(&session, &request, form, threads, budget)?;

        let report = json!({
            "bundle": self.bundle.display().to_string(),
            "digest": session.digest(),
            "name": session.manifest().name,
            "version": session.manifest().version,
            "engine": session.engine().name(),
            // What `auto` measured on load when two engines could serve.
            "engine_race": session.engine_race().iter().map(|(e, d)| json!({
                "engine": e.name(), "median_us": d.map(|d| d.as_secs_f64() * 1e6),
            })).collect::<Vec<_>>(),
            "input": self.input.display().to_string(),
            "content_type": request.content_type,
            "accept": form.media_type(),
            "cold": {
                "read_ms": ms(read),
                "verify_ms": ms(verify),
                "guest_ms": ms(loaded.guest),
                "model_ms": ms(loaded.model),
                "engine_race_ms": ms(loaded.engine_race),
                "load_ms": ms(load),
                "first_prediction_ms": ms(first),
                "total_ms": ms(cold_total),
                "precompiled_guest": session.used_precompiled_guest(),
            },
            "warm": {
                "model": model.json(),
                "pipeline": pipeline.json(),
            },
            "throughput": {
                "seconds": self.seconds,
                "one_thread_per_s": (one * 10.0).round() / 10.0,
                "threads": threads,
                "per_s": (many * 10.0).round() / 10.0,
                "scaling": (many / one * 100.0).round() / 100.0,
            },
        });
        if self.json {
            println!("{report}");
        } else {
            print_human(&report);
        }
        Ok(())
    }
}

fn print_human(r: &serde_json::Value) {
    let c = &r["cold"];
    println!(
        "{} {} ({}), engine {}, input {} ({}), answering {}",
        r["name"].as_str().unwrap_or(""),
        r["version"].as_str().unwrap_or(""),
        r["bundle"].as_str().unwrap_or(""),
        r["engine"].as_str().unwrap_or(""),
        r["input"].as_str().unwrap_or(""),
        r["content_type"].as_str().unwrap_or(""),
        r["accept"].as_str().unwrap_or(""),
    );
    println!(
        "cold   {} ms to the first prediction: read {} ms, verify {} ms, load {} ms (guest {} ms{} ‖ model {} ms), first prediction {} ms",
        c["total_ms"],
        c["read_ms"],
        c["verify_ms"],
        c["load_ms"],
        c["guest_ms"],
        if c["precompiled_guest"].as_bool() == Some(true) {
            ", precompiled"
        } else {
            ", compiled here"
        },
        c["model_ms"],
        c["first_prediction_ms"],
    );
    if let Some(race) = r["engine_race"].as_array().filter(|r| !r.is_empty()) {
        let each: Vec<String> = race
            .iter()
            .map(|e| match e["median_us"].as_f64() {
                Some(us) => format!("{} {us:.1} µs", e["engine"].as_str().unwrap_or("")),
                None => format!("{} failed", e["engine"].as_str().unwrap_or("")),
            })
            .collect();
        println!(
            "auto   measured on load in {} ms: {}; kept {}",
            c["engine_race_ms"],
            each.join(", "),
            r["engine"].as_str().unwrap_or("")
        );
    }
    for (label, key) in [("model   ", "model"), ("pipeline", "pipeline")] {
        let w = &r["warm"][key];
        println!(
            "warm   {label} p50 {} µs, p99 {} µs, mean {} µs ({} calls)",
            w["p50_us"], w["p99_us"], w["mean_us"], w["calls"]
        );
    }
    let t = &r["throughput"];
    println!(
        "through {} predictions/s with 1 thread, {} with {} threads ({}x)",
        t["one_thread_per_s"], t["per_s"], t["threads"], t["scaling"]
    );
}
