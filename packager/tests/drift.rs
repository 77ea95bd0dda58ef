use serde_json::Value;

use ferry_testkit::cli::{assert_exit, ferry, stderr, stdout};
use ferry_testkit::fixtures::{bundles, example};

fn drift(bundle: &str, data: &str, extra: &[&str]) -> (std::process::Output, Option<Value>) {
    let f = bundles();
    let mut args = vec![
        "drift",
        bundle,
        "--pub",
        f.public().leak(),
        "--data",
        data,
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = ferry(&args);
    let v = serde_json::from_str(&stdout(&o)).ok();
    (o, v)
}

fn drifted(report: &Value) -> Vec<String> {
    report["features"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["drifted"] == true)
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn shifted_iris_features_are_flagged_and_only_those() {
    let f = bundles();
    let (o, r) = drift(
        &f.bundle("iris"),
        &example("iris/data/current_shifted.csv"),
        &[],
    );
    assert_exit(&o, 0);
    let r = r.unwrap();
    assert_eq!(drifted(&r), ["petal_length", "petal_width"]);
    assert_eq!(r["dataset_drifted"], true);
    for feature in r["features"].as_array().unwrap() {
        for key in [
            "psi",
            "ks_statistic",
            "ks_pvalue",
            "wasserstein",
            "wasserstein_normed",
            "jensen_shannon",
            "method",
            "drifted",
        ] {
            assert!(feature.get(key).is_some(), "{key} missing in {feature}");
        }
        // The baseline has 2000 rows: Evidently's rule for large references.
        assert_eq!(feature["method"], "wasserstein");
    }
}

#[test]
fn same_distribution_iris_flags_nothing() {
    let f = bundles();
    let (o, r) = drift(
        &f.bundle("iris"),
        &example("iris/data/current_same.csv"),
        &["--fail-on-drift"],
    );
    assert_exit(&o, 0);
    let r = r.unwrap();
    assert!(drifted(&r).is_empty(), "{r}");
    assert_eq!(r["dataset_drifted"], false);
}

#[test]
fn brighter_digits_are_flagged() {
    let f = bundles();
    let (o, r) = drift(
        &f.bundle("digits"),
        &example("digits/data/current_shifted"),
        &["--fail-on-drift"],
    );
    assert_exit(&o, 6);
    assert_eq!(drifted(&r.unwrap()), ["brightness", "contrast"]);
    let (o, r) = drift(
        &f.bundle("digits"),
        &example("digits/data/current_same"),
        &[],
    );
    assert_exit(&o, 0);
    assert!(drifted(&r.unwrap()).is_empty());
}

#[test]
fn drift_without_a_key_warns_and_bad_data_is_explained() {
    let f = bundles();
    let o = ferry(&[
        "drift",
        &f.bundle("iris"),
        "--data",
        &example("iris/data/current_same.csv"),
    ]);
    assert_exit(&o, 0);
    assert!(
        stderr(&o).contains("signature is not checked"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).contains("not drifted"), "{}", stdout(&o));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.csv");
    std::fs::write(
        &p,
        "sepal_length,sepal_width,petal_length,petal_width\n1,2,3,oops\n",
    )
    .unwrap();
    let (o, _) = drift(&f.bundle("iris"), p.to_str().unwrap(), &[]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("petal_width"), "{}", stderr(&o));
    let (o, _) = drift(
        &f.bundle("digits"),
        &example("iris/data/current_same.csv"),
        &[],
    );
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("directory"), "{}", stderr(&o));
}
