//! Benchmarks of the whole pipeline against raw tract, cold loads, and
//! bundle sizes. Run: `cargo bench -p ferry --bench pipeline` (release
//! profile, the one CI builds). Prints Markdown for docs/PERFORMANCE.md.
//!
//! Every comparison is a ratio of numbers measured in the same run, with
//! the two sides interleaved, because this machine is shared and noisy.

use std::path::Path;
use std::time::Instant;

use ferry_runtime::{self as rt, Session, TrustPolicy};
use ferry_testkit::bench::{ferry_ok as ferry, median, us};
use ferry_testkit::fixtures::examples;

struct Case {
    name: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
}

fn main() {
    // `cargo test --benches` runs benches once in test mode; keep that fast.
    let quick = std::env::args().any(|a| a == "--test" || a == "--quick");
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    ferry(&["keygen", "-o", &d("k")]);
    for name in ["iris", "digits"] {
        let project = examples().join(name).to_string_lossy().into_owned();
        ferry(&[
            "pack",
            &project,
            "--key",
            &d("k.key"),
            "-o",
            &d(&format!("{name}.ferry")),
        ]);
        ferry(&[
            "pack",
            &project,
            "--key",
            &d("k.key"),
            "-o",
            &d(&format!("{name}-pre.ferry")),
            "--precompile",
            std::env::consts::ARCH,
        ]);
    }
    let trust = TrustPolicy::new(
        rt::PublicKey::all_from_pem(&std::fs::read_to_string(d("k.pub")).unwrap()).unwrap(),
    )
    .unwrap();
    let cases = [
        Case {
            name: "iris",
            content_type: "application/json",
            body: std::fs::read(examples().join("iris/golden/setosa.json")).unwrap(),
        },
        Case {
            name: "digits",
            content_type: "image/png",
            body: std::fs::read(examples().join("digits/golden/digit_3.png")).unwrap(),
        },
    ];

    println!("## Per-inference latency: whole pipeline vs raw tract (same run, interleaved)\n");
    println!(
        "| model | raw tract (median µs) | pipeline (median µs) | overhead µs | ratio | of which preprocess µs |"
    );
    println!("|---|---|---|---|---|---|");
    for c in &cases {
        let session = Session::load(
            &std::fs::read(d(&format!("{}-pre.ferry", c.name))).unwrap(),
            &trust,
        )
        .unwrap();
        let tensors = session.preprocess(c.content_type, &c.body).unwrap().tensors;
        let rounds = if quick { 3 } else { 200 };
        let per_round = if quick { 5 } else { 50 };
        let (mut raw, mut full, mut pre) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            for _ in 0..per_round {
                std::hint::black_box(session.run_model(&tensors).unwrap());
            }
            raw.push(t.elapsed() / per_round);
            let t = Instant::now();
            for _ in 0..per_round {
                std::hint::black_box(session.infer(c.content_type, &c.body).unwrap());
            }
            full.push(t.elapsed() / per_round);
            let t = Instant::now();
            for _ in 0..per_round {
                std::hint::black_box(session.preprocess(c.content_type, &c.body).unwrap());
            }
            pre.push(t.elapsed() / per_round);
        }
        let (r, f, p) = (median(raw), median(full), median(pre));
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.3} | {:.1} |",
            c.name,
            us(r),
            us(f),
            us(f) - us(r),
            f.as_secs_f64() / r.as_secs_f64(),
            us(p)
        );
    }

    println!("\n## Cold load: file on disk → verified → first prediction (median of runs)\n");
    println!("| bundle | verify ms | guest ms | model ms | to first prediction ms |");
    println!("|---|---|---|---|---|");
    for c in &cases {
        for variant in ["", "-pre"] {
            let path = d(&format!("{}{variant}.ferry", c.name));
            let runs = if quick { 2 } else { 15 };
            let mut totals = Vec::new();
            let mut last = rt::LoadTimings::default();
            for _ in 0..runs {
                let t = Instant::now();
                let bytes = std::fs::read(&path).unwrap();
                let s = Session::load(&bytes, &trust).unwrap();
                std::hint::black_box(s.infer(c.content_type, &c.body).unwrap());
                totals.push(t.elapsed());
                last = s.timings();
            }
            let label = if variant.is_empty() {
                "portable wasm"
            } else {
                "precompiled guest"
            };
            println!(
                "| {} ({label}) | {:.1} | {:.1} | {:.1} | {:.1} |",
                c.name,
                last.verify.as_secs_f64() * 1e3,
                last.guest.as_secs_f64() * 1e3,
                last.model.as_secs_f64() * 1e3,
                median(totals).as_secs_f64() * 1e3
            );
        }
    }

    println!("\n## Sizes\n");
    println!(
        "| model | ONNX bytes | zstd -19 | shuffle4 + zstd -19 | kept in bundle | whole bundle |"
    );
    println!("|---|---|---|---|---|---|");
    for c in &cases {
        let onnx = std::fs::read(examples().join(c.name).join("model.onnx")).unwrap();
        let plain = rt::compress(&onnx, false, 19).1.len();
        let shuffled = zstd::bulk::compress(&rt::shuffle4(&onnx), 19)
            .unwrap()
            .len();
        let kept = rt::compress(&onnx, true, 19);
        let bundle = std::fs::metadata(d(&format!("{}.ferry", c.name)))
            .unwrap()
            .len();
        println!(
            "| {} | {} | {} ({:.2}x) | {} ({:.2}x) | {} ({:?}) | {} |",
            c.name,
            onnx.len(),
            plain,
            onnx.len() as f64 / plain as f64,
            shuffled,
            onnx.len() as f64 / shuffled as f64,
            kept.1.len(),
            kept.0,
            bundle
        );
    }
    let _ = Path::new("");
}
