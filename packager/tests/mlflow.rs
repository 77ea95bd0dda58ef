//! MLflow models in: a model directory written by the real `mlflow` package
//! (`tests/data/make_mlflow_fixture.py`: the onnx flavor, a column-based
//! signature, weights in an external-data file beside model.onnx).

use std::path::PathBuf;

use serde_json::{Value, json};

use ferry_testkit::cli::{assert_exit, ferry, stderr, stdout};

/// `packager/tests/data`, found at run time (a test binary from a shared
/// target directory may have been built from another checkout).
fn data() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("tests/data")
}

fn fixture() -> PathBuf {
    data().join("mlflow-iris")
}

fn expected() -> Value {
    let p = data().join("mlflow-iris.expected.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn keys(dir: &std::path::Path) -> (String, String) {
    let prefix = dir.join("k").display().to_string();
    assert_exit(&ferry(&["keygen", "-o", &prefix]), 0);
    (format!("{prefix}.key"), format!("{prefix}.pub"))
}

fn probabilities(response: &Value) -> Vec<Vec<f64>> {
    let out = &response["outputs"]["probabilities"];
    let data: Vec<f64> = out["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no probabilities in {response}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    data.chunks(3).map(|c| c.to_vec()).collect()
}

fn assert_close(got: &[Vec<f64>], want: &Value) {
    let want: Vec<Vec<f64>> = serde_json::from_value(want.clone()).unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }
}

/// `ferry run`s `request` on `bundle` and compares the probabilities with
/// onnxruntime's (the fixture's expected.json).
fn assert_runs_like_onnxruntime(
    dir: &std::path::Path,
    bundle: &str,
    public: &str,
    request: &Value,
) {
    let input = dir.join("request.json");
    std::fs::write(&input, request.to_string()).unwrap();
    let o = ferry(&[
        "run",
        bundle,
        "--pub",
        public,
        "--input",
        &input.display().to_string(),
        "--json",
    ]);
    assert_exit(&o, 0);
    let response: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_close(&probabilities(&response), &expected()["probabilities"]);
}

#[test]
fn an_mlflow_model_packs_with_its_lineage_and_external_weights_and_agrees_with_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keys(tmp.path());
    let bundle = tmp.path().join("m.ferry").display().to_string();
    let o = ferry(&[
        "pack",
        "--model",
        &fixture().display().to_string(),
        "--key",
        &key,
        "-o",
        &bundle,
        "--registered-model",
        "iris-mlp",
        "--registered-version",
        "3",
    ]);
    assert_exit(&o, 0);
    // The lineage: run id and model uuid as MLflow wrote them, the
    // signature, the registered name and version.
    let mlmodel = std::fs::read_to_string(fixture().join("MLmodel")).unwrap();
    let field = |k: &str| {
        mlmodel
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap()
            .to_string()
    };
    let o = ferry(&["inspect", &bundle, "--json"]);
    assert_exit(&o, 0);
    let inspect: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let m = &inspect["manifest"];
    assert_eq!(m["name"], "iris-mlp");
    assert_eq!(m["version"], "3");
    let training: Value =
        serde_json::from_str(m["lineage"]["training_json"].as_str().unwrap()).unwrap();
    let mlflow = &training["mlflow"];
    assert_eq!(mlflow["run_id"], json!(field("run_id")));
    assert_eq!(mlflow["model_uuid"], json!(field("model_uuid")));
    assert_eq!(mlflow["registered_model"], "iris-mlp");
    assert_eq!(mlflow["registered_version"], "3");
    assert_eq!(mlflow["signature"]["inputs"][0]["name"], "sepal_length");
    // The weights came from model.onnx.data: outputs equal onnxruntime's.
    let e = expected();
    let rows: Vec<Vec<f64>> = serde_json::from_value(e["rows"].clone()).unwrap();
    let request = json!({"inputs": {"float_input": {
        "shape": [rows.len(), 4], "data": rows.concat()}}});
    assert_runs_like_onnxruntime(tmp.path(), &bundle, &public, &request);
}

#[test]
fn ferry_init_scaffolds_a_tabular_project_from_the_mlflow_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keys(tmp.path());
    let project = tmp.path().join("proj");
    let o = ferry(&[
        "init",
        &fixture().display().to_string(),
        "-o",
        &project.display().to_string(),
        "--name",
        "iris-mlp",
    ]);
    assert_exit(&o, 0);
    let toml = std::fs::read_to_string(project.join("ferry.toml")).unwrap();
    assert!(toml.contains("kind = \"tabular\""), "{toml}");
    assert!(toml.contains("{ name = \"petal_width\" }"), "{toml}");
    // Written once; a second init refuses to overwrite.
    let again = ferry(&[
        "init",
        &fixture().display().to_string(),
        "-o",
        &project.display().to_string(),
    ]);
    assert_exit(&again, 1);
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    let bundle = tmp.path().join("p.ferry").display().to_string();
    assert_exit(
        &ferry(&[
            "pack",
            &project.display().to_string(),
            "--key",
            &key,
            "-o",
            &bundle,
        ]),
        0,
    );
    // Records by the signature's column names.
    let e = expected();
    let columns: Vec<String> = serde_json::from_value(e["columns"].clone()).unwrap();
    let rows: Vec<Vec<f64>> = serde_json::from_value(e["rows"].clone()).unwrap();
    let records: Vec<Value> = rows
        .iter()
        .map(|r| {
            Value::Object(
                columns
                    .iter()
                    .cloned()
                    .zip(r.iter().map(|v| json!(v)))
                    .collect(),
            )
        })
        .collect();
    assert_runs_like_onnxruntime(tmp.path(), &bundle, &public, &json!({"records": records}));
}

#[test]
fn mlflow_directories_without_onnx_or_with_escaping_paths_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = keys(tmp.path());
    let out = tmp.path().join("x.ferry").display().to_string();
    // A scikit-learn flavor only.
    let sk = tmp.path().join("sk");
    std::fs::create_dir_all(&sk).unwrap();
    std::fs::write(
        sk.join("MLmodel"),
        "flavors:\n  sklearn:\n    pickled_model: model.pkl\n  python_function: {}\n",
    )
    .unwrap();
    let o = ferry(&[
        "pack",
        "--model",
        &sk.display().to_string(),
        "--key",
        &key,
        "-o",
        &out,
    ]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("no onnx flavor"), "{}", stderr(&o));
    assert!(stderr(&o).contains("sklearn"), "{}", stderr(&o));
    // An onnx flavor whose data leaves the directory.
    let up = tmp.path().join("up");
    std::fs::create_dir_all(&up).unwrap();
    std::fs::write(
        up.join("MLmodel"),
        "flavors:\n  onnx:\n    data: ../model.onnx\n",
    )
    .unwrap();
    let o = ferry(&[
        "pack",
        "--model",
        &up.display().to_string(),
        "--key",
        &key,
        "-o",
        &out,
    ]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("not a file inside"), "{}", stderr(&o));
    // External data that points outside the model's directory.
    let ext = tmp.path().join("ext");
    std::fs::create_dir_all(&ext).unwrap();
    for f in ["MLmodel", "model.onnx", "model.onnx.data"] {
        std::fs::copy(fixture().join(f), ext.join(f)).unwrap();
    }
    let onnx = std::fs::read(ext.join("model.onnx")).unwrap();
    let evil = replace(&onnx, b"model.onnx.data", b"../../etc/passw");
    std::fs::write(ext.join("model.onnx"), evil).unwrap();
    let o = ferry(&[
        "pack",
        "--model",
        &ext.display().to_string(),
        "--key",
        &key,
        "-o",
        &out,
    ]);
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains("not a file beside the model"),
        "{}",
        stderr(&o)
    );
    assert!(!std::path::Path::new(&out).exists(), "nothing written");
}

/// Replaces every occurrence of `from` by `to` (same length: the protobuf
/// framing stays valid).
fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let mut i = 0;
    let mut n = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            n += 1;
        }
        i += 1;
    }
    assert!(n > 0, "pattern not found");
    out
}
