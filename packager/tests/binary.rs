//! Binary tensor requests through `ferry run`: a `.npy` array or a tensor set
//! answers exactly what the JSON tensor form answers (on one engine, tract:
//! `auto` may pick another engine in another process, whose last digits
//! differ); malformed bodies are refused as bad input (exit 4) naming the
//! problem.

use std::io::Write;
use std::process::{Command, Stdio};

use ferry_runtime::{DType, TensorSet};
use ferry_testkit::cli::{assert_exit, ferry, stderr, stdout};
use ferry_testkit::fixtures::{bundles, example, workspace_bin};
use ferry_testkit::tensors::{iris_tensor, npy, npy_f32, tensor_set_f32};

fn run(input: &str, extra: &[&str]) -> std::process::Output {
    let f = bundles();
    let (bundle, public) = (f.bundle("raw"), f.public());
    let mut args = vec![
        "run", &bundle, "--pub", &public, "--input", input, "--json", "--engine", "tract",
    ];
    args.extend(extra);
    ferry(&args)
}

fn write(name: &str, bytes: &[u8]) -> String {
    let path = bundles().scratch(name);
    std::fs::create_dir_all(std::path::Path::new(&path).parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn npy_and_tensor_sets_answer_what_json_answers() {
    let json = run(&example("iris/golden/tensor_request.json"), &[]);
    assert_exit(&json, 0);
    let want = stdout(&json);
    let (shape, values) = iris_tensor();
    let npy_file = write("iris.npy", &npy_f32(&shape, &values));
    let o = run(&npy_file, &[]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), want);
    let set = write("iris.fts", &tensor_set_f32("float_input", &shape, &values));
    let o = run(&set, &["--content-type", "application/x-ferry-tensors"]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), want);
    // From standard input, recognised by their first bytes.
    for body in [
        npy_f32(&shape, &values),
        tensor_set_f32("float_input", &shape, &values),
    ] {
        let f = bundles();
        let mut child = Command::new(workspace_bin("ferry"))
            .args([
                "run",
                &f.bundle("raw"),
                "--pub",
                &f.public(),
                "--input",
                "-",
                "--json",
                "--engine",
                "tract",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&body).unwrap();
        let o = child.wait_with_output().unwrap();
        assert_exit(&o, 0);
        assert_eq!(stdout(&o), want);
    }
}

#[test]
fn malformed_binary_requests_are_bad_input() {
    let (shape, values) = iris_tensor();
    let good = npy_f32(&shape, &values);
    let f64s: Vec<u8> = values
        .iter()
        .flat_map(|v| (*v as f64).to_le_bytes())
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.npy",
            good[..good.len() - 3].to_vec(),
            "holds 29 bytes",
        ),
        ("header.npy", good[..30].to_vec(), "truncated header"),
        (
            "float64.npy",
            npy("<f8", &shape, &f64s),
            "x.astype(np.float32)",
        ),
        (
            "wide.npy",
            npy_f32(&[1, 8], &values),
            "dimension 1 must be 4",
        ),
        ("text.npy", b"1,2,3,4".to_vec(), "not a .npy array"),
    ];
    for (name, body, want) in cases {
        let o = run(&write(name, &body), &[]);
        assert_exit(&o, 4);
        assert!(stderr(&o).contains(want), "{name}: {}", stderr(&o));
    }
    let wrong_name = write("wrong.fts", &tensor_set_f32("x", &shape, &values));
    let o = run(
        &wrong_name,
        &["--content-type", "application/x-ferry-tensors"],
    );
    assert_exit(&o, 4);
    assert!(stderr(&o).contains("unknown input \"x\""), "{}", stderr(&o));
    // A binary body for a pipeline that takes records: refused by content type.
    let f = bundles();
    let o = ferry(&[
        "run",
        &f.bundle("iris"),
        "--pub",
        &f.public(),
        "--input",
        &write("for-iris.npy", &good),
    ]);
    assert_exit(&o, 4);
    assert!(
        stderr(&o).contains("unsupported content type"),
        "{}",
        stderr(&o)
    );
}

/// `ferry run` with one example, on tract (the engine every form is compared on).
fn run_example(bundle: &str, input: &str, extra: &[&str]) -> std::process::Output {
    let f = bundles();
    let (bundle, public) = (f.bundle(bundle), f.public());
    let mut args = vec![
        "run", &bundle, "--pub", &public, "--input", input, "--engine", "tract",
    ];
    args.extend(extra);
    ferry(&args)
}

#[test]
fn binary_responses_carry_the_outputs_the_json_response_carries() {
    let digit = example("digits/golden/digit_3.png");
    let json = run_example("digits", &digit, &["--json"]);
    assert_exit(&json, 0);
    let json: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    // Every output as a tensor set, on standard output.
    let o = run_example("digits", &digit, &["--accept", "tensors"]);
    assert_exit(&o, 0);
    let set = TensorSet::decode(&o.stdout).unwrap();
    assert_eq!(set.tensors.len(), 1);
    let t = &set.tensors[0];
    assert_eq!((t.name.as_str(), t.dtype), ("logits", DType::F32));
    ferry_testkit::tensors::assert_matches_json_output(t, &json);

    // The one output as a .npy file: chosen by the extension, or named.
    let out = bundles().scratch("digit_3.npy");
    let o = run_example("digits", &digit, &["--output", &out]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "");
    assert_eq!(std::fs::read(&out).unwrap(), t.to_npy());
    let o = run_example("digits", &digit, &["--accept", "application/x-npy"]);
    assert_exit(&o, 0);
    assert_eq!(o.stdout, t.to_npy());
    // JSON to a file is the JSON response.
    let out = bundles().scratch("digit_3.json");
    let o = run_example("digits", &digit, &["--output", &out, "--accept", "json"]);
    assert_exit(&o, 0);
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(written, json);
    // A .npy file that would not hold an array is refused before anything runs.
    for (accept, what) in [("json", "JSON"), ("tensors", "a tensor set")] {
        let out = bundles().scratch(&format!("digit_3.{accept}.npy"));
        let _ = std::fs::remove_file(&out);
        let o = run_example("digits", &digit, &["--output", &out, "--accept", accept]);
        assert_exit(&o, 2);
        assert_eq!(
            stderr(&o).trim(),
            format!(
                "error: --accept {accept} writes {what}, not an array: {out} would not be a \
                 .npy file (use --accept npy, or another file name)"
            )
        );
        assert!(!std::path::Path::new(&out).exists());
    }
}

#[test]
fn a_form_the_model_cannot_give_is_refused_before_it_runs() {
    let (shape, values) = iris_tensor();
    let input = write("iris-accept.npy", &npy_f32(&shape, &values));
    // The iris model has two outputs (label, probabilities): one .npy cannot hold them.
    let out = bundles().scratch("iris-accept-out.npy");
    let o = run_example("raw", &input, &["--output", &out]);
    assert_exit(&o, 2);
    assert_eq!(
        stderr(&o).trim(),
        format!(
            "error: --output {out} (a .npy file): application/x-npy carries one array and this \
             model has 2 outputs: accept application/x-ferry-tensors (all of them) or \
             application/json"
        )
    );
    assert!(!std::path::Path::new(&out).exists());
    // Both, as a tensor set; and an unknown form is a usage error naming the choices.
    let o = run_example("raw", &input, &["--accept", "tensors"]);
    assert_exit(&o, 0);
    let set = TensorSet::decode(&o.stdout).unwrap();
    let names: Vec<_> = set
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dtype))
        .collect();
    assert_eq!(
        names,
        [("label", DType::I64), ("probabilities", DType::F32)]
    );
    assert_eq!(set.tensors[1].shape, [2, 3]);
    let o = run_example("raw", &input, &["--accept", "csv"]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("expected json, npy or tensors"),
        "{}",
        stderr(&o)
    );
    // --json prints JSON: with a binary form it is a contradiction, said before anything runs.
    let o = run_example("raw", &input, &["--accept", "tensors", "--json"]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("--json prints the JSON response"),
        "{}",
        stderr(&o)
    );
}
