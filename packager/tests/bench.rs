//! `ferry bench`: the report's shape and values that make sense together
//! (no timing thresholds: speed is measured, not asserted).

use ferry_testkit::cli::{assert_exit, ferry, stderr, stdout};
use ferry_testkit::fixtures::{bundles, example};

fn number(v: &serde_json::Value, path: &str) -> f64 {
    let mut at = v;
    for key in path.split('.') {
        at = &at[key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

/// `ferry bench` on the digits fixture with a golden image, and `extra`.
fn bench_digits(extra: &[&str]) -> std::process::Output {
    let f = bundles();
    let (digits, public) = (f.bundle("digits"), f.public());
    let input = example("digits/golden/digit_3.png");
    let mut args = vec!["bench", &digits, "--pub", &public, "--input", &input];
    args.extend(extra);
    ferry(&args)
}

#[test]
fn bench_reports_cold_warm_and_throughput_as_json() {
    let f = bundles();
    let o = bench_digits(&[
        "--threads",
        "2",
        "--seconds",
        "0.05",
        "--engine",
        "tract",
        "--json",
    ]);
    assert_exit(&o, 0);
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(r["engine"], "tract");
    assert_eq!(r["name"], "digits");
    assert_eq!(r["content_type"], "image/png");
    assert_eq!(r["accept"], "application/json");
    assert_eq!(r["digest"], f.digest("digits.ferry"));
    // The fixtures are portable: the guest was compiled here.
    assert_eq!(r["cold"]["precompiled_guest"], false);
    for step in [
        "read_ms",
        "verify_ms",
        "guest_ms",
        "model_ms",
        "load_ms",
        "first_prediction_ms",
    ] {
        let v = number(&r, &format!("cold.{step}"));
        assert!(v >= 0.0 && v <= number(&r, "cold.total_ms"), "{step}: {r}");
    }
    // Guest and model load in parallel: the load takes at least the longer.
    assert!(
        number(&r, "cold.load_ms") + 0.2
            >= number(&r, "cold.guest_ms").max(number(&r, "cold.model_ms")),
        "{r}"
    );
    for phase in ["model", "pipeline"] {
        let calls = number(&r, &format!("warm.{phase}.calls"));
        let (p50, p99) = (
            number(&r, &format!("warm.{phase}.p50_us")),
            number(&r, &format!("warm.{phase}.p99_us")),
        );
        assert!(calls >= 10.0, "{phase}: {r}");
        assert!(p50 > 0.0 && p50 <= p99, "{phase}: {r}");
    }
    assert_eq!(r["throughput"]["threads"], 2);
    assert!(number(&r, "throughput.one_thread_per_s") > 0.0, "{r}");
    assert!(number(&r, "throughput.per_s") > 0.0, "{r}");
    assert!(number(&r, "throughput.scaling") > 0.0, "{r}");

    // Without --json: the same measurements, for people.
    let o = bench_digits(&["--threads", "1", "--seconds", "0.02"]);
    assert_exit(&o, 0);
    let text = stdout(&o);
    for line in [
        "cold ",
        "warm   model",
        "warm   pipeline",
        "predictions/s with 1 thread",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }

    // The pipeline answering with the model's output as .npy.
    let o = bench_digits(&[
        "--threads",
        "1",
        "--seconds",
        "0.02",
        "--accept",
        "npy",
        "--json",
    ]);
    assert_exit(&o, 0);
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(r["accept"], "application/x-npy");
    assert!(number(&r, "warm.pipeline.p50_us") > 0.0, "{r}");
}

#[test]
fn bench_refuses_what_run_refuses_with_the_same_exit_codes() {
    let f = bundles();
    let args = |bundle: &str, input: &str, extra: &[&str]| -> std::process::Output {
        let public = f.public();
        let mut a = vec![
            "bench",
            bundle,
            "--pub",
            &public,
            "--input",
            input,
            "--seconds",
            "0.01",
        ];
        a.extend(extra);
        ferry(&a)
    };
    // A tampered bundle: rejected (3) before anything runs.
    let mut bytes = f.bytes("digits.ferry");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let tampered = f.scratch("bench-tampered.ferry");
    std::fs::create_dir_all(std::path::Path::new(&tampered).parent().unwrap()).unwrap();
    std::fs::write(&tampered, &bytes).unwrap();
    let o = args(&tampered, &example("digits/golden/digit_3.png"), &[]);
    assert_exit(&o, 3);
    assert!(stderr(&o).contains("rejected"), "{}", stderr(&o));
    // An input the pipeline refuses: bad input (4).
    let o = args(
        &f.bundle("digits"),
        &example("iris/golden/setosa.json"),
        &[],
    );
    assert_exit(&o, 4);
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));
    // A response form the model cannot give (two outputs, one .npy): usage (2).
    let o = args(
        &f.bundle("raw"),
        &example("iris/golden/tensor_request.json"),
        &["--accept", "npy"],
    );
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("this model has 2 outputs"),
        "{}",
        stderr(&o)
    );
    // An engine Ferry does not have, and nonsense numbers: usage (2) or error (1).
    let o = args(
        &f.bundle("digits"),
        &example("digits/golden/digit_3.png"),
        &["--engine", "magic"],
    );
    assert_exit(&o, 2);
    let o = args(
        &f.bundle("digits"),
        &example("digits/golden/digit_3.png"),
        &["--threads", "0"],
    );
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("--threads"), "{}", stderr(&o));
}
