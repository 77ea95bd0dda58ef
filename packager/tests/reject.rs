use ferry_testkit::cli::{assert_exit, ferry, stderr, stdout};
use ferry_testkit::fixtures::{bundles, example};

#[test]
fn a_tampered_bundle_is_rejected_with_exit_code_3() {
    let f = bundles();
    let mut bytes = std::fs::read(f.bundle("iris")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let path = f.scratch("tampered.ferry");
    std::fs::write(&path, &bytes).unwrap();
    for cmd in ["verify", "run"] {
        let mut args = vec![cmd, path.as_str(), "--pub", f.public().leak()];
        if cmd == "run" {
            args.extend(["--input", example("iris/golden/setosa.json").leak()]);
        }
        let o = ferry(&args);
        assert_exit(&o, 3);
        assert!(
            stderr(&o).contains("does not match its digest"),
            "{}",
            stderr(&o)
        );
    }
    let truncated = f.scratch("truncated.ferry");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let o = ferry(&["verify", &truncated, "--pub", &f.public()]);
    assert_exit(&o, 3);
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
}

#[test]
fn a_bundle_signed_by_another_key_is_rejected() {
    let f = bundles();
    let other = f.scratch("keys/other");
    assert_exit(&ferry(&["keygen", "-o", &other]), 0);
    let o = ferry(&[
        "verify",
        &f.bundle("iris"),
        "--pub",
        &format!("{other}.pub"),
    ]);
    assert_exit(&o, 3);
    assert!(stderr(&o).contains("untrusted key"), "{}", stderr(&o));
    // Two signatures required, one present.
    let o = ferry(&[
        "verify",
        &f.bundle("iris"),
        "--pub",
        &f.public(),
        "--pub",
        &format!("{other}.pub"),
        "--threshold",
        "2",
    ]);
    assert_exit(&o, 3);
    assert!(
        stderr(&o).contains("1 valid signature(s) by release keys, 2 required"),
        "{}",
        stderr(&o)
    );
    let o = ferry(&["verify", &f.bundle("iris")]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("--pub"), "{}", stderr(&o));
}

#[test]
fn bad_inputs_get_exit_code_4_and_say_what_is_wrong() {
    let f = bundles();
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "missing.json",
            r#"{"records": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4}]}"#,
            "petal_width",
        ),
        (
            "string.json",
            r#"{"records": [{"sepal_length": "x", "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]}"#,
            "sepal_length",
        ),
        ("notjson.json", "this is not json", "JSON"),
        ("empty.json", "", "JSON"),
    ];
    for (name, body, needle) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        let o = ferry(&[
            "run",
            &f.bundle("iris"),
            "--pub",
            &f.public(),
            "--input",
            p.to_str().unwrap(),
        ]);
        assert_exit(&o, 4);
        assert!(stderr(&o).contains(needle), "{name}: {}", stderr(&o));
    }
    // Tensor form: wrong shape.
    let p = dir.path().join("shape.json");
    std::fs::write(
        &p,
        r#"{"inputs": {"float_input": {"shape": [1, 3], "data": [1, 2, 3]}}}"#,
    )
    .unwrap();
    let o = ferry(&[
        "run",
        &f.bundle("raw"),
        "--pub",
        &f.public(),
        "--input",
        p.to_str().unwrap(),
    ]);
    assert_exit(&o, 4);
    assert!(stderr(&o).contains("float_input"), "{}", stderr(&o));
    // A corrupt image.
    let p = dir.path().join("broken.png");
    std::fs::write(&p, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let o = ferry(&[
        "run",
        &f.bundle("digits"),
        "--pub",
        &f.public(),
        "--input",
        p.to_str().unwrap(),
    ]);
    assert_exit(&o, 4);
    // An unknown extension.
    let p = dir.path().join("input.bin");
    std::fs::write(&p, b"x").unwrap();
    let o = ferry(&[
        "run",
        &f.bundle("digits"),
        "--pub",
        &f.public(),
        "--input",
        p.to_str().unwrap(),
    ]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("--content-type"), "{}", stderr(&o));
}

#[test]
fn bad_project_files_are_explained() {
    let f = bundles();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.ferry");
    let pack = |d: &std::path::Path| {
        ferry(&[
            "pack",
            d.to_str().unwrap(),
            "--key",
            &f.key(),
            "-o",
            out.to_str().unwrap(),
        ])
    };
    // No ferry.toml.
    let o = pack(dir.path());
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("ferry.toml"), "{}", stderr(&o));
    // A typo in a key.
    std::fs::copy(example("iris/model.onnx"), dir.path().join("model.onnx")).unwrap();
    std::fs::write(
        dir.path().join("ferry.toml"),
        "[model]\nname = \"m\"\nversion = \"1\"\npath = \"model.onnx\"\nverison = 2\n",
    )
    .unwrap();
    let o = pack(dir.path());
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("verison"), "{}", stderr(&o));
    // A model that is not ONNX.
    std::fs::write(dir.path().join("model.onnx"), b"garbage").unwrap();
    std::fs::write(
        dir.path().join("ferry.toml"),
        "[model]\nname = \"m\"\nversion = \"1\"\npath = \"model.onnx\"\n",
    )
    .unwrap();
    let o = pack(dir.path());
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains("not a valid ONNX model"),
        "{}",
        stderr(&o)
    );
    // A pipeline configuration the guest refuses.
    std::fs::copy(example("iris/model.onnx"), dir.path().join("model.onnx")).unwrap();
    std::fs::write(
        dir.path().join("ferry.toml"),
        "[model]\nname = \"m\"\nversion = \"1\"\npath = \"model.onnx\"\n[preprocess]\nkind = \"spreadsheet\"\n",
    )
    .unwrap();
    let o = pack(dir.path());
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("spreadsheet"), "{}", stderr(&o));
    assert!(!out.exists());
    // A missing signing key.
    let o = ferry(&[
        "pack",
        &example("iris"),
        "--key",
        "/nonexistent.key",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("/nonexistent.key"), "{}", stderr(&o));
}

#[test]
fn usage_errors_exit_with_2() {
    assert_exit(&ferry(&["pack"]), 2);
    assert_exit(&ferry(&["frobnicate"]), 2);
    let o = ferry(&["--help"]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("Exit codes"));
}
