//! Cold starts of portable bundles: compiling the standard guest with
//! Cranelift against Winch, what each compiler's code costs per request,
//! and `ferry run` as a whole process (portable, which compiles the guest
//! with `ON_DEVICE_COMPILER`, against precompiled). Prints Markdown for
//! docs/PERFORMANCE.md.
//!
//! ```sh
//! cargo bench --workspace --bench guest_compile
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_runtime::{
    self as rt, GuestCompiler, GuestRuntime, SandboxLimits, Session, TensorSet, TrustPolicy,
};
use ferry_testkit::bench::{ferry_ok as ferry, median, us};
use ferry_testkit::cli::assert_exit;
use ferry_testkit::fixtures::{examples, workspace_bin};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

const COMPILERS: [GuestCompiler; 2] = [GuestCompiler::Cranelift, GuestCompiler::Winch];

fn main() {
    let quick = std::env::args().any(|a| a == "--test" || a == "--quick");
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    ferry(&["keygen", "-o", &d("k")]);
    let project = examples().join("digits").to_string_lossy().into_owned();
    ferry(&[
        "pack",
        &project,
        "--key",
        &d("k.key"),
        "-o",
        &d("portable.ferry"),
    ]);
    ferry(&[
        "pack",
        &project,
        "--key",
        &d("k.key"),
        "-o",
        &d("pre.ferry"),
        "--precompile",
        std::env::consts::ARCH,
    ]);
    let trust = TrustPolicy::new(
        rt::PublicKey::all_from_pem(&std::fs::read_to_string(d("k.pub")).unwrap()).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(d("portable.ferry")).unwrap();
    let bundle = rt::verify(&bytes, &trust, &rt::ReadLimits::default()).unwrap();
    let wasm = bundle.content(rt::role::GUEST).unwrap().to_vec();
    let config = bundle.manifest().pipeline.config_json.clone();
    let limits = SandboxLimits {
        memory_bytes: bundle.manifest().limits.memory_bytes,
        timeout_ms: bundle.manifest().limits.timeout_ms,
    };
    let png = std::fs::read(examples().join("digits/golden/digit_3.png")).unwrap();
    let session = Session::load(&std::fs::read(d("pre.ferry")).unwrap(), &trust).unwrap();
    let outputs = TensorSet {
        tensors: session
            .run_model(&session.preprocess("image/png", &png).unwrap().tensors)
            .unwrap(),
        features: None,
    }
    .encode();

    println!(
        "## Compiling the standard guest ({} KiB) on this machine: Cranelift vs Winch (same run, interleaved)\n",
        wasm.len() / 1024
    );
    println!(
        "| compiler | compile + first instance ms (median) | preprocess, 8x8 PNG µs | postprocess, classification JSON µs |"
    );
    println!("|---|---|---|---|");
    let rounds = if quick { 1 } else { 7 };
    let mut compile: Vec<Vec<Duration>> = vec![Vec::new(); 2];
    for _ in 0..rounds {
        for (i, c) in COMPILERS.iter().enumerate() {
            let t = Instant::now();
            let g = GuestRuntime::with_compiler(&wasm, &[], config.as_bytes(), limits, *c).unwrap();
            compile[i].push(t.elapsed());
            assert_eq!(g.compiler, *c);
        }
    }
    let runtimes: Vec<GuestRuntime> = COMPILERS
        .iter()
        .map(|c| GuestRuntime::with_compiler(&wasm, &[], config.as_bytes(), limits, *c).unwrap())
        .collect();
    let (calls, warm_rounds) = if quick { (2, 2) } else { (200, 50) };
    let mut pre: Vec<Vec<Duration>> = vec![Vec::new(); 2];
    let mut post: Vec<Vec<Duration>> = vec![Vec::new(); 2];
    for _ in 0..warm_rounds {
        for (i, g) in runtimes.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..calls {
                std::hint::black_box(g.preprocess("image/png", &png).unwrap());
            }
            pre[i].push(t.elapsed() / calls);
            let t = Instant::now();
            for _ in 0..calls {
                std::hint::black_box(g.postprocess(&outputs).unwrap());
            }
            post[i].push(t.elapsed() / calls);
        }
    }
    for (i, c) in COMPILERS.iter().enumerate() {
        println!(
            "| {c:?} | {:.1} | {:.1} | {:.1} |",
            ms(median(compile[i].clone())),
            us(median(pre[i].clone())),
            us(median(post[i].clone()))
        );
    }

    println!(
        "\n## `ferry run` as a whole process, digits, one PNG (median of runs, interleaved)\n"
    );
    println!("| bundle | wall ms |");
    println!("|---|---|");
    let runs = if quick { 1 } else { 11 };
    let input = examples().join("digits/golden/digit_3.png");
    let mut walls: Vec<Vec<Duration>> = vec![Vec::new(); 2];
    for _ in 0..runs {
        for (i, b) in ["portable.ferry", "pre.ferry"].iter().enumerate() {
            let t = Instant::now();
            let o = Command::new(workspace_bin("ferry"))
                .args(["run", &d(b), "--pub", &d("k.pub"), "--input"])
                .arg(&input)
                .output()
                .unwrap();
            walls[i].push(t.elapsed());
            assert_exit(&o, 0);
        }
    }
    for (i, label) in [
        "portable (guest compiled at start with ON_DEVICE_COMPILER)",
        "precompiled guest (`--precompile`)",
    ]
    .iter()
    .enumerate()
    {
        println!("| {label} | {:.1} |", ms(median(walls[i].clone())));
    }
}
