//! The two engines: tract and onnxruntime agree on every example model;
//! each runs what the other refuses; `auto` chooses among the engines that
//! can serve a bundle; a missing library is a clear error. Tests that need
//! the real library take it from `FERRY_ONNXRUNTIME` (see
//! `ferry_testkit::onnxruntime`).

use std::path::{Path, PathBuf};

use ferry_runtime::{
    DType, Engine, EngineChoice, EngineModel, EngineOptions, EngineReport, EngineSupport, Model,
    ModelError, Tensor, engine_candidates, inline_external_data,
};
use ferry_testkit::fixtures::{examples, minimal_manifest};
use ferry_testkit::onnxruntime::library;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn ort(lib: &Path) -> EngineOptions {
    EngineOptions {
        choice: EngineChoice::Only(Engine::OnnxRuntime),
        onnxruntime: Some(lib.to_path_buf()),
    }
}

/// Deterministic inputs of the model's declared shapes (batch 3), f32
/// values in [-2, 2).
fn inputs_for(model: &EngineModel) -> Vec<Tensor> {
    let mut state = 0x2545_f491_u32;
    model
        .inputs()
        .iter()
        .map(|spec| {
            assert_eq!(spec.dtype, "f32", "{spec:?}");
            let shape: Vec<u64> = spec.shape.iter().map(|d| d.unwrap_or(3)).collect();
            let n: u64 = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    (state % 4000) as f32 / 1000.0 - 2.0
                })
                .collect();
            Tensor::from_f32(&spec.name, shape, &values)
        })
        .collect()
}

fn assert_close(a: &[Tensor], b: &[Tensor], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            (&x.name, x.dtype, &x.shape),
            (&y.name, y.dtype, &y.shape),
            "{what}"
        );
        for (i, (p, q)) in x.to_f64_vec().iter().zip(y.to_f64_vec()).enumerate() {
            // The golden examples' default tolerance (docs/project-file.md).
            assert!(
                (p - q).abs() <= 1e-5,
                "{what}: output `{}`[{i}]: tract {p}, onnxruntime {q}",
                x.name
            );
        }
    }
}

#[test]
fn both_engines_agree_on_every_example_model() {
    let Some(lib) = library("both_engines_agree_on_every_example_model") else {
        return;
    };
    let root = examples().join("..");
    let models: Vec<PathBuf> = vec![
        examples().join("iris/model.onnx"),
        examples().join("digits/model.onnx"),
        root.join("runtime/tests/fixtures/mlp.onnx"),
        root.join("runtime/tests/fixtures/digits_batch1.onnx"),
        // Multi-dimensional PRelu slopes: issue 12 counted them among tract's
        // refusals; tract 0.23.9 runs them like onnxruntime.
        root.join("runtime/tests/fixtures/prelu_slopes.onnx"),
        // Weights in an external-data file, inlined as `ferry pack` does.
        root.join("packager/tests/data/mlflow-iris/model.onnx"),
    ];
    for path in models {
        let what = path.display().to_string();
        let onnx = std::fs::read(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        let dir = path.parent().unwrap().to_path_buf();
        let onnx = inline_external_data(&onnx, &|l| std::fs::read(dir.join(l)))
            .unwrap()
            .unwrap_or(onnx);
        let tract = EngineModel::load(&onnx, Engine::Tract, &EngineOptions::default()).unwrap();
        let ort = EngineModel::load(&onnx, Engine::OnnxRuntime, &ort(&lib)).unwrap();
        assert_eq!(ort.engine(), Engine::OnnxRuntime);
        assert_eq!(tract.inputs(), ort.inputs(), "{what}");
        assert_eq!(tract.outputs(), ort.outputs(), "{what}");
        let inputs = inputs_for(&tract);
        let a = tract.run(&inputs).unwrap();
        let b = ort.run(&inputs).unwrap();
        assert_close(&a, &b, &what);
        // A request of the wrong type is refused the same way by both.
        let mut bad = inputs.clone();
        bad[0].dtype = DType::F64;
        let doubled = bad[0].data.repeat(2);
        bad[0].data = doubled;
        for m in [&tract, &ort] {
            assert!(
                matches!(m.run(&bad), Err(ModelError::BadInput(_))),
                "{what} on {}",
                m.engine()
            );
        }
    }
    // A recurrent model, batch 1 (tract has no plan for its symbolic batch:
    // model::an_engine_panic_is_an_error_not_a_crash), twice in a row: the
    // GRU's hidden state starts from zero on every call on both engines.
    let onnx = fixture("gru.onnx");
    let tract = EngineModel::load(&onnx, Engine::Tract, &EngineOptions::default()).unwrap();
    let ort = EngineModel::load(&onnx, Engine::OnnxRuntime, &ort(&lib)).unwrap();
    let x: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) / 5.0).collect();
    let inputs = [Tensor::from_f32("x", vec![1, 5, 3], &x)];
    let first = ort.run(&inputs).unwrap();
    for _ in 0..2 {
        assert_close(&tract.run(&inputs).unwrap(), &first, "gru.onnx");
        assert_close(&ort.run(&inputs).unwrap(), &first, "gru.onnx");
    }
}

#[test]
fn tract_refuses_sequence_operators_and_a_variable_length_expand_which_onnxruntime_runs() {
    // tract's refusals need no library.
    let err = Model::load(&fixture("sequence_concat.onnx")).unwrap_err();
    assert!(matches!(err, ModelError::Load(_)), "{err}");
    assert!(err.to_string().contains("SequenceConstruct"), "{err}");
    let err = Model::load(&fixture("expand_shape.onnx")).unwrap_err();
    assert!(matches!(err, ModelError::Load(_)), "{err}");
    assert!(err.to_string().contains("variable length"), "{err}");

    let Some(lib) = library("tract_refuses_sequence_operators...") else {
        return;
    };
    let seq = EngineModel::load(
        &fixture("sequence_concat.onnx"),
        Engine::OnnxRuntime,
        &ort(&lib),
    )
    .unwrap();
    let x = [0.5f32, -1.0, 2.0, 3.5, 1.0, 2.0, 3.0, 4.0];
    let out = seq.run(&[Tensor::from_f32("x", vec![2, 4], &x)]).unwrap();
    assert_eq!(out[0].shape, vec![2, 8]);
    let want: Vec<f64> = x
        .chunks(4)
        .flat_map(|r| {
            let r: Vec<f64> = r.iter().map(|&v| v as f64).collect();
            let twice: Vec<f64> = r.iter().map(|v| v * 2.0).collect();
            [r, twice].concat()
        })
        .collect();
    assert_eq!(out[0].to_f64_vec(), want);

    let expand = EngineModel::load(
        &fixture("expand_shape.onnx"),
        Engine::OnnxRuntime,
        &ort(&lib),
    )
    .unwrap();
    let shape = Tensor {
        name: "shape".into(),
        dtype: DType::I64,
        shape: vec![3],
        data: [2i64, 3, 4].iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let out = expand
        .run(&[Tensor::from_f32("x", vec![1, 4], &x), shape])
        .unwrap();
    assert_eq!(out[0].shape, vec![2, 3, 4]);
    let want: Vec<f64> = (0..24).map(|i| x[i % 4] as f64).collect();
    assert_eq!(out[0].to_f64_vec(), want);
}

#[test]
fn onnxruntime_refuses_opsets_below_7_which_tract_runs() {
    let onnx = fixture("opset6_relu.onnx");
    let tract = Model::load(&onnx).unwrap();
    let out = tract
        .run(&[Tensor::from_f32("x", vec![1, 4], &[-1.0, 2.0, -3.0, 4.0])])
        .unwrap();
    assert_eq!(out[0].to_f64_vec(), vec![0.0, 2.0, 0.0, 4.0]);
    let Some(lib) = library("onnxruntime_refuses_opsets_below_7_which_tract_runs") else {
        return;
    };
    let err = EngineModel::load(&onnx, Engine::OnnxRuntime, &ort(&lib)).unwrap_err();
    assert!(err.to_string().contains("opset 6"), "{err}");
}

#[test]
fn asking_for_onnxruntime_without_its_library_is_a_clear_error() {
    let missing = PathBuf::from("/nonexistent/libonnxruntime.so");
    let err =
        EngineModel::load(&fixture("mlp.onnx"), Engine::OnnxRuntime, &ort(&missing)).unwrap_err();
    assert_eq!(err.code(), "engine_unavailable");
    assert!(
        err.to_string().contains("/nonexistent/libonnxruntime.so"),
        "{err}"
    );
    assert!(
        err.to_string().contains("onnxruntime is not available"),
        "{err}"
    );
    // A file that is not the library: refused by the loader, not a crash.
    let not_a_library = std::env::temp_dir().join("ferry-not-libonnxruntime.so");
    std::fs::write(&not_a_library, b"not a shared object").unwrap();
    let err = EngineModel::load(
        &fixture("mlp.onnx"),
        Engine::OnnxRuntime,
        &ort(&not_a_library),
    )
    .unwrap_err();
    assert_eq!(err.code(), "engine_unavailable", "{err}");
}

fn recorded(preference: &str, tract: Option<bool>, ort: Option<bool>) -> ferry_runtime::Manifest {
    let mut m = minimal_manifest();
    let report = |name: &str, serves: Option<bool>| EngineReport {
        name: name.into(),
        serves,
        reason: (serves == Some(false)).then(|| format!("{name} said no")),
    };
    m.model.engines = Some(EngineSupport {
        preference: preference.into(),
        engines: vec![report("tract", tract), report("onnxruntime", ort)],
    });
    m
}

#[test]
fn auto_offers_the_engines_present_that_can_serve_and_an_explicit_choice_is_checked() {
    // The candidates only check that the library file is there; any file
    // stands in for it here (loading it is the tests above).
    let present = Some(std::env::current_exe().unwrap());
    let absent = Some(PathBuf::from("/nonexistent/libonnxruntime.so"));
    let opts = |choice: EngineChoice, lib: &Option<PathBuf>| EngineOptions {
        choice,
        onnxruntime: lib.clone(),
    };
    let auto = EngineChoice::Auto;
    let only = EngineChoice::Only;
    use Engine::{OnnxRuntime, Tract};
    // A bundle from before engines were recorded: both when present.
    let old = minimal_manifest();
    assert_eq!(
        engine_candidates(&opts(auto, &present), &old).unwrap(),
        [Tract, OnnxRuntime]
    );
    assert_eq!(
        engine_candidates(&opts(auto, &absent), &old).unwrap(),
        [Tract]
    );
    // tract refused at pack time: onnxruntime alone, or a clear error.
    let no_tract = recorded("auto", Some(false), Some(true));
    assert_eq!(
        engine_candidates(&opts(auto, &present), &no_tract).unwrap(),
        [OnnxRuntime]
    );
    let err = engine_candidates(&opts(auto, &absent), &no_tract).unwrap_err();
    assert_eq!(err.code(), "engine_refused");
    assert!(err.to_string().contains("tract said no"), "{err}");
    let err = engine_candidates(&opts(only(Tract), &present), &no_tract).unwrap_err();
    assert!(err.to_string().contains("tract was asked for"), "{err}");
    // onnxruntime refused, or unknown: tract under auto; asked for, an error
    // only when refused or absent.
    let no_ort = recorded("auto", Some(true), Some(false));
    assert_eq!(
        engine_candidates(&opts(auto, &present), &no_ort).unwrap(),
        [Tract]
    );
    assert!(engine_candidates(&opts(only(OnnxRuntime), &present), &no_ort).is_err());
    let unknown = recorded("auto", Some(true), None);
    assert_eq!(
        engine_candidates(&opts(only(OnnxRuntime), &present), &unknown).unwrap(),
        [OnnxRuntime]
    );
    let err = engine_candidates(&opts(only(OnnxRuntime), &absent), &unknown).unwrap_err();
    assert_eq!(err.code(), "engine_unavailable");
    // The bundle's preference holds under a device's auto; a device's
    // explicit choice wins over it.
    let prefers_ort = recorded("onnxruntime", Some(true), Some(true));
    assert_eq!(
        engine_candidates(&opts(auto, &present), &prefers_ort).unwrap(),
        [OnnxRuntime]
    );
    assert_eq!(
        engine_candidates(&opts(only(Tract), &present), &prefers_ort).unwrap(),
        [Tract]
    );
    assert!(engine_candidates(&opts(auto, &absent), &prefers_ort).is_err());
}

#[test]
fn onnxruntime_serves_many_threads_from_its_session_pool() {
    let Some(lib) = library("onnxruntime_serves_many_threads_from_its_session_pool") else {
        return;
    };
    let onnx = std::fs::read(examples().join("digits/model.onnx")).unwrap();
    let model = EngineModel::load(&onnx, Engine::OnnxRuntime, &ort(&lib)).unwrap();
    let inputs = inputs_for(&model);
    let want = model.run(&inputs).unwrap();
    // More threads than sessions (`MAX_ORT_SESSIONS`): some wait for a
    // session; every answer is the single-threaded one.
    let threads = ferry_runtime::MAX_ORT_SESSIONS + 2;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..50 {
                    assert_eq!(model.run(&inputs).unwrap(), want);
                }
            });
        }
    });
}
