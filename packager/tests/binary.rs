//! Binary tensor requests through `ferry run`: a `.npy` array or a tensor set
//! answers exactly what the JSON tensor form answers (on one engine, tract:
//! `auto` may pick another engine in another process, whose last digits
//! differ); malformed bodies are refused as bad input (exit 4) naming the
//! problem.

use std::io::Write;
use std::process::{Command, Stdio};

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
