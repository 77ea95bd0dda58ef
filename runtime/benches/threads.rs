//! How the model alone scales with threads (issue 12: "throughput with 2
//! threads at least 1.8x one thread"): predictions per second of one loaded
//! model called from 1 thread and from `FERRY_BENCH_THREADS` threads (default
//! 2) at once, batch 1, no guest. `ferry bench --threads` measures the whole
//! pipeline; this isolates the engine's part of it.
//!
//! ```sh
//! cargo bench --workspace --bench threads    # FERRY_ONNXRUNTIME adds onnxruntime's rows
//! ```
//!
//! Models: the MLP fixture (4 features) and the digits CNN (1x8x8). Engines:
//! tract as Ferry runs it (`Model::run`), and onnxruntime when
//! `FERRY_ONNXRUNTIME` names the library. Rounds of 1 thread and N threads
//! are interleaved (`FERRY_BENCH_ROUNDS`, default 9, of
//! `FERRY_BENCH_SECONDS`, default 0.3, each); ratios of the medians and of
//! the best rounds (other processes on a shared machine only ever take
//! throughput away, so the best round is the closest to what the model does
//! with the cores to itself).
//! Every run's outputs are checked against a serial run's.

use std::time::{Duration, Instant};

use ferry_runtime::{Engine, EngineModel, EngineOptions, Tensor};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Calls per second of `threads` threads calling `run` for `budget`
/// (thread `i` runs `models[i % models.len()]`).
fn throughput(
    models: &[EngineModel],
    input: &[Tensor],
    want: &[Tensor],
    threads: usize,
    budget: Duration,
) -> f64 {
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let model = &models[i % models.len()];
                s.spawn(move || {
                    let mut n = 0u64;
                    while n < 10 || start.elapsed() < budget {
                        let out = model.run(input).expect("the model runs");
                        assert_eq!(out, want, "a concurrent run answered differently");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a bench thread panicked"))
            .sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { ferry_runtime::keep_onnxruntime_telemetry_off() };
    let threads: usize = env("FERRY_BENCH_THREADS", 2);
    let rounds: usize = env("FERRY_BENCH_ROUNDS", 9);
    let budget = Duration::from_secs_f64(env("FERRY_BENCH_SECONDS", 0.3));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let models = [
        (
            "MLP, 4 features",
            root.join("runtime/tests/fixtures/mlp.onnx"),
            vec![1u64, 4],
        ),
        (
            "digits CNN, 1x8x8",
            root.join("examples/digits/model.onnx"),
            vec![1, 1, 8, 8],
        ),
    ];
    let mut engines = vec![Engine::Tract];
    if std::env::var_os(ferry_runtime::ONNXRUNTIME_ENV).is_some() {
        engines.push(Engine::OnnxRuntime);
    }
    println!(
        "| model | engine | model | 1 thread /s | {threads} threads /s | scaling (medians) | scaling (best rounds) |\n|---|---|---|---:|---:|---:|---:|"
    );
    for (name, path, shape) in &models {
        let bytes = std::fs::read(path).expect("the model file");
        let n = shape.iter().product::<u64>() as usize;
        let data: Vec<f32> = (0..n).map(|i| (i % 17) as f32 / 17.0).collect();
        for &engine in &engines {
            let load = || {
                EngineModel::load(&bytes, engine, &EngineOptions::only(engine))
                    .expect("the model loads")
            };
            // One model shared by the threads (what a session does), and
            // for reference one model per thread (nothing shared).
            let shared = vec![load()];
            let apart: Vec<_> = (0..threads).map(|_| load()).collect();
            let input_name = shared[0].inputs()[0].name.clone();
            let input = [Tensor::from_f32(&input_name, shape.clone(), &data)];
            let want = shared[0].run(&input).expect("the model runs");
            let ways = [("shared", &shared), ("one per thread", &apart)];
            // Warm up: states, scratch buffers, caches.
            for (_, models) in ways {
                throughput(models, &input, &want, threads, budget / 4);
            }
            // [way][1 thread, N threads] per round, all four interleaved.
            let mut rates = vec![[Vec::new(), Vec::new()]; ways.len()];
            for _ in 0..rounds {
                for ((_, models), rate) in ways.iter().zip(&mut rates) {
                    rate[0].push(throughput(models, &input, &want, 1, budget));
                    rate[1].push(throughput(models, &input, &want, threads, budget));
                }
            }
            for ((how, _), [one, many]) in ways.iter().zip(rates) {
                let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
                let (best_one, best_many) = (best(&one), best(&many));
                let (one, many) = (median(one), median(many));
                println!(
                    "| {name} | {} | {how} | {one:.0} | {many:.0} | {:.2}x | {:.2}x |",
                    engine.name(),
                    many / one,
                    best_many / best_one,
                );
            }
        }
    }
}
