use ferry_runtime::{DType, Model, ModelError, Tensor};
use serde_json::Value;

use ferry_testkit::fixtures::examples;

fn tensor_from_json(name: &str, v: &Value) -> Tensor {
    let shape: Vec<u64> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect();
    let data: Vec<f32> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    Tensor::from_f32(name, shape, &data)
}

#[test]
fn iris_matches_onnxruntime() {
    let model = Model::load(&std::fs::read(examples().join("iris/model.onnx")).unwrap()).unwrap();
    assert_eq!(model.inputs()[0].name, "float_input");
    assert_eq!(model.inputs()[0].shape, vec![None, Some(4)]);
    let req: Value = serde_json::from_str(
        &std::fs::read_to_string(examples().join("iris/golden/tensor_request.json")).unwrap(),
    )
    .unwrap();
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(examples().join("iris/golden/tensor_request.expected.json"))
            .unwrap(),
    )
    .unwrap();
    let out = model
        .run(&[tensor_from_json(
            "float_input",
            &req["inputs"]["float_input"],
        )])
        .unwrap();
    for t in &out {
        let expected: Vec<f64> = want["outputs"][&t.name]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let got = t.to_f64_vec();
        assert_eq!(got.len(), expected.len(), "{}", t.name);
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-5, "{}: {g} vs {e}", t.name);
        }
    }
    let label = out.iter().find(|t| t.name == "label").unwrap();
    assert_eq!(label.dtype, DType::I64);
}

#[test]
fn digits_cnn_runs_with_any_batch() {
    let model = Model::load(&std::fs::read(examples().join("digits/model.onnx")).unwrap()).unwrap();
    for n in [1u64, 3, 17] {
        let out = model
            .run(&[Tensor::from_f32(
                "input",
                vec![n, 1, 8, 8],
                &vec![0.5; (n * 64) as usize],
            )])
            .unwrap();
        assert_eq!(out[0].shape, vec![n, 10]);
    }
}

#[test]
fn wrong_inputs_are_bad_input_errors() {
    let model = Model::load(&std::fs::read(examples().join("iris/model.onnx")).unwrap()).unwrap();
    let err = model
        .run(&[Tensor::from_f32("float_input", vec![1, 5], &[0.0; 5])])
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::BadInput(m) if m.contains("[N, 4]")),
        "{err:?}"
    );
    let err = model
        .run(&[Tensor::from_f32("other", vec![1, 4], &[0.0; 4])])
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::BadInput(m) if m.contains("float_input")),
        "{err:?}"
    );
    let err = model
        .run(&[Tensor::from_f32("float_input", vec![4], &[0.0; 4])])
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::BadInput(m) if m.contains("2 dimensions")),
        "{err:?}"
    );
}

#[test]
fn garbage_is_not_a_model() {
    let err = Model::load(b"definitely not protobuf").unwrap_err();
    assert!(matches!(err, ModelError::Load(_)), "{err:?}");
}
