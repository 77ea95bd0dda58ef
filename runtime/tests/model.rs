use ferry_runtime::{
    DType, MAX_RUN_STATES, MAX_SPECIALISED_PLANS, Model, ModelError, PlanChoice, SPECIALISE_AFTER,
    Tensor,
};
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

/// The runtime's committed fixtures (`scripts/perf_models.py --fixtures`).
fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// Deterministic, varied input values (not all equal: a plan that mixed up
/// rows or channels would show).
fn ramp(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 1000) as f32 / 500.0
                - 1.0
        })
        .collect()
}

/// Outputs of two plans agree: integers exactly, floats within 1e-5
/// relative (tract's kernels may sum in another order for another shape).
#[track_caller]
fn assert_same(a: &[Tensor], b: &[Tensor], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            (&x.name, x.dtype, &x.shape),
            (&y.name, y.dtype, &y.shape),
            "{what}"
        );
        match x.dtype {
            DType::F32 | DType::F64 => {
                for (p, q) in x.to_f64_vec().iter().zip(y.to_f64_vec()) {
                    assert!(
                        (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                        "{what} {}: {p} vs {q}",
                        x.name
                    );
                }
            }
            _ => assert_eq!(x.data, y.data, "{what} {}", x.name),
        }
    }
}

/// Every model of the repository, with its input's name and shape per batch.
fn models() -> Vec<(&'static str, Vec<u8>, &'static str, Vec<u64>)> {
    vec![
        (
            "iris",
            std::fs::read(examples().join("iris/model.onnx")).unwrap(),
            "float_input",
            vec![4],
        ),
        (
            "digits",
            std::fs::read(examples().join("digits/model.onnx")).unwrap(),
            "input",
            vec![1, 8, 8],
        ),
        ("mlp", fixture("mlp.onnx"), "input", vec![4]),
    ]
}

#[test]
fn batch_plans_compute_what_the_symbolic_plan_computes() {
    for (name, bytes, input, rest) in models() {
        let model = Model::load(&bytes).unwrap();
        assert!(model.has_symbolic_batch(), "{name}");
        for batch in [1u64, 2, 5] {
            let mut shape = vec![batch];
            shape.extend(&rest);
            let n = shape.iter().product::<u64>() as usize;
            let t = [Tensor::from_f32(input, shape, &ramp(n, batch as u32))];
            let symbolic = model.run_with(&t, PlanChoice::Symbolic).unwrap();
            let specialised = model.run_with(&t, PlanChoice::Batch(batch)).unwrap();
            let chosen = model.run(&t).unwrap();
            assert_same(&specialised, &symbolic, &format!("{name} batch {batch}"));
            assert_same(&chosen, &symbolic, &format!("{name} batch {batch} (run)"));
            assert_eq!(symbolic[0].shape[0], batch, "{name}");
        }
    }
}

#[test]
fn a_recurring_batch_size_gets_its_own_plan_and_the_same_outputs() {
    let model = Model::load(&std::fs::read(examples().join("digits/model.onnx")).unwrap()).unwrap();
    let t = |batch: u64| {
        [Tensor::from_f32(
            "input",
            vec![batch, 1, 8, 8],
            &ramp(batch as usize * 64, 7),
        )]
    };
    let symbolic = model.run_with(&t(3), PlanChoice::Symbolic).unwrap();
    for call in 1..=SPECIALISE_AFTER {
        assert!(model.specialised_batches().is_empty(), "call {call}");
        assert_same(
            &model.run(&t(3)).unwrap(),
            &symbolic,
            &format!("call {call}"),
        );
    }
    assert_eq!(model.specialised_batches(), vec![3]);
    assert_same(&model.run(&t(3)).unwrap(), &symbolic, "with its plan");
    // Batch 1 has its plan from the start and is not counted.
    for _ in 0..SPECIALISE_AFTER {
        model.run(&t(1)).unwrap();
    }
    assert_eq!(model.specialised_batches(), vec![3]);
    // The memory bound: the least recently used plan goes first.
    for batch in 4..(4 + MAX_SPECIALISED_PLANS as u64) {
        for _ in 0..SPECIALISE_AFTER {
            model.run(&t(batch)).unwrap();
        }
    }
    let kept = model.specialised_batches();
    assert_eq!(kept.len(), MAX_SPECIALISED_PLANS, "{kept:?}");
    assert!(!kept.contains(&3), "{kept:?}");
    assert_same(&model.run(&t(3)).unwrap(), &symbolic, "after eviction");
}

#[test]
fn a_model_with_a_fixed_batch_has_one_plan() {
    let fixed = Model::load(&fixture("digits_batch1.onnx")).unwrap();
    assert!(!fixed.has_symbolic_batch());
    assert_eq!(
        fixed.inputs()[0].shape,
        vec![Some(1), Some(1), Some(8), Some(8)]
    );
    let symbolic =
        Model::load(&std::fs::read(examples().join("digits/model.onnx")).unwrap()).unwrap();
    let t = [Tensor::from_f32("input", vec![1, 1, 8, 8], &ramp(64, 3))];
    let want = symbolic.run_with(&t, PlanChoice::Symbolic).unwrap();
    for choice in [PlanChoice::Symbolic, PlanChoice::Batch(1)] {
        assert_same(
            &fixed.run_with(&t, choice).unwrap(),
            &want,
            &format!("{choice:?}"),
        );
    }
    assert_same(&fixed.run(&t).unwrap(), &want, "run");
    for _ in 0..SPECIALISE_AFTER {
        fixed.run(&t).unwrap();
    }
    assert!(fixed.specialised_batches().is_empty());
    // Another batch is a bad input, as before.
    let err = fixed
        .run(&[Tensor::from_f32("input", vec![2, 1, 8, 8], &ramp(128, 3))])
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::BadInput(m) if m.contains("[1, 1, 8, 8]")),
        "{err:?}"
    );
}

#[test]
fn a_batch_of_zero_takes_the_symbolic_plan() {
    // A batch of 0 has no plan of its own: the symbolic plan answers it.
    let model = Model::load(&fixture("mlp.onnx")).unwrap();
    let out = model
        .run(&[Tensor::from_f32("input", vec![0, 4], &[])])
        .unwrap();
    assert_eq!(out[0].shape, vec![0, 3]);
}

/// A run state is reused from call to call; nothing of one request may reach
/// the next. The GRU is the case in point: tract keeps its hidden state in
/// the run state, and carries it over when asked to (streaming), so every
/// call must answer what a freshly loaded model answers. The stateless
/// models (whose states are reused) too, with a failing call and another
/// batch size in between.
#[test]
fn no_request_leaks_into_the_next() {
    let mut cases = models();
    cases.push(("gru", fixture("gru.onnx"), "x", vec![5, 3]));
    for (name, bytes, input, rest) in cases {
        let shape: Vec<u64> = std::iter::once(1).chain(rest.iter().copied()).collect();
        let n = shape.iter().product::<u64>() as usize;
        let a = [Tensor::from_f32(input, shape.clone(), &ramp(n, 7))];
        let b = [Tensor::from_f32(input, shape.clone(), &ramp(n, 99))];
        let fresh = |t: &[Tensor]| Model::load(&bytes).unwrap().run(t).unwrap();
        let shape3: Vec<u64> = std::iter::once(3).chain(rest.iter().copied()).collect();
        let c = [Tensor::from_f32(input, shape3, &ramp(3 * n, 5))];
        let (want_a, want_b) = (fresh(&a), fresh(&b));
        // tract cannot make the GRU's plan for another batch (see the next test).
        let want_c = Model::load(&bytes).unwrap().run(&c).ok();
        let model = Model::load(&bytes).unwrap();
        let wrong = [Tensor::from_f32(input, vec![1, 2], &[1.0, 2.0])];
        for round in 0..3 {
            assert_same(
                &model.run(&a).unwrap(),
                &want_a,
                &format!("{name} a, round {round}"),
            );
            assert_same(
                &model.run(&b).unwrap(),
                &want_b,
                &format!("{name} b, round {round}"),
            );
            assert!(model.run(&wrong).is_err(), "{name}");
            // Another batch size (another plan) in between.
            match &want_c {
                Some(want_c) => {
                    let c_out = model.run(&c).unwrap();
                    assert_same(&c_out, want_c, &format!("{name} c, round {round}"));
                }
                // No plan for the symbolic batch; from the third call batch 3 has its own.
                None => {
                    if let Ok(out) = model.run(&c) {
                        assert_eq!(out[0].shape, [1, 3, 4], "{name}");
                    }
                }
            }
        }
        // Two threads at once, each with its own state.
        std::thread::scope(|s| {
            for (t, want) in [(&a, &want_a), (&b, &want_b)] {
                let model = &model;
                s.spawn(move || {
                    for _ in 0..20 {
                        assert_same(&model.run(t).unwrap(), want, name);
                    }
                });
            }
        });
    }
}

/// Concurrent calls run in run states of their own (one per thread, with
/// their own copies of the constants for small models, or made for the call
/// when every slot is busy): more threads than slots, each sending its own
/// requests, all get what one thread gets from a model of its own, exactly.
#[test]
fn concurrent_runs_answer_what_serial_runs_answer() {
    let mut cases = models();
    cases.push((
        "digits_batch1",
        fixture("digits_batch1.onnx"),
        "input",
        vec![1, 8, 8],
    ));
    // Its states are not reused (it keeps a hidden state): a fresh one per call.
    cases.push(("gru", fixture("gru.onnx"), "x", vec![5, 3]));
    for (name, bytes, input, rest) in cases {
        let shape: Vec<u64> = std::iter::once(1).chain(rest.iter().copied()).collect();
        let n = shape.iter().product::<u64>() as usize;
        let threads = MAX_RUN_STATES + 2;
        let requests: Vec<Vec<[Tensor; 1]>> = (0..threads)
            .map(|t| {
                (0..3)
                    .map(|r| {
                        [Tensor::from_f32(
                            input,
                            shape.clone(),
                            &ramp(n, (t * 3 + r) as u32),
                        )]
                    })
                    .collect()
            })
            .collect();
        let serial = Model::load(&bytes).unwrap();
        let want: Vec<Vec<Vec<Tensor>>> = requests
            .iter()
            .map(|rs| rs.iter().map(|r| serial.run(r).unwrap()).collect())
            .collect();
        let model = Model::load(&bytes).unwrap();
        let start = std::sync::Barrier::new(threads);
        std::thread::scope(|s| {
            for (rs, want) in requests.iter().zip(&want) {
                let (model, start) = (&model, &start);
                s.spawn(move || {
                    start.wait();
                    for round in 0..50 {
                        for (r, w) in rs.iter().zip(want) {
                            assert_eq!(&model.run(r).unwrap(), w, "{name}, round {round}");
                        }
                    }
                });
            }
        });
    }
}

/// tract panics while optimising the GRU for a symbolic batch (tract-onnx
/// 0.23.9 unwraps the batch size when the GRU has no initial state). A panic
/// in the engine is an error of that request: the model keeps serving the
/// batches it can, and the plan that cannot be made is not retried.
#[test]
fn an_engine_panic_is_an_error_not_a_crash() {
    let model = Model::load(&fixture("gru.onnx")).unwrap();
    let one = [Tensor::from_f32("x", vec![1, 5, 3], &ramp(15, 7))];
    let three = [Tensor::from_f32("x", vec![3, 5, 3], &ramp(45, 7))];
    let want = model.run(&one).unwrap();
    for _ in 0..2 {
        match model.run(&three) {
            Err(ModelError::Run(msg)) => assert!(msg.contains("tract panicked"), "{msg}"),
            other => panic!("expected a run error, got {other:?}"),
        }
        assert_same(&model.run(&one).unwrap(), &want, "batch 1 after the panic");
        assert!(model.run_with(&one, PlanChoice::Symbolic).is_err());
    }
    // A batch size that recurs gets a plan of its own, with the batch fixed: tract makes
    // that one.
    let out = model.run(&three).unwrap();
    assert_eq!(out[0].shape, [1, 3, 4]);
    assert_eq!(model.specialised_batches(), [3]);
}
