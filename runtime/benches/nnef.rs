//! ONNX vs tract's NNEF form: what loading mobilenet_v3_small to a runnable
//! batch-1 plan costs each way (issue 12 item 4: "store the model in tract's
//! NNEF form if it loads faster"). The decision and numbers are in
//! docs/PERFORMANCE.md.
//!
//! ```sh
//! cargo bench --workspace --bench nnef     # FERRY_BENCH_MODELS: directory of the .onnx (default /tmp/ferry-bench-models)
//! ```
//!
//! ONNX: parse the protobuf, set the input to batch 1, analyse, declutter
//! and optimise (what `Model::load` does for its first plan). NNEF: the same
//! model decluttered once at batch 1 (its best case) and written as an NNEF
//! tar; loaded back and optimised. Rounds interleaved; medians.

use std::time::{Duration, Instant};

use tract_nnef::internal::*;
use tract_onnx::prelude::{InferenceFact, InferenceModelExt, WithOnnx};

const ROUNDS: usize = 7;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let dir = std::env::var("FERRY_BENCH_MODELS").unwrap_or("/tmp/ferry-bench-models".into());
    let path = std::path::Path::new(&dir).join("mobilenet_v3_small.onnx");
    let Ok(onnx_bytes) = std::fs::read(&path) else {
        eprintln!(
            "nnef bench: {} not found (scripts/perf_models.py writes it); nothing measured",
            path.display()
        );
        return;
    };
    let onnx = tract_onnx::onnx();
    let fact = || InferenceFact::dt_shape(f32::datum_type(), tvec!(1, 3, 224, 224));
    let typed = |bytes: &[u8]| {
        onnx.model_for_read(&mut &bytes[..])
            .unwrap()
            .with_input_fact(0, fact())
            .unwrap()
            .into_typed()
            .unwrap()
            .into_decluttered()
            .unwrap()
    };
    let nnef = tract_nnef::nnef().with_onnx();
    let tar = nnef.write_to_tar(&typed(&onnx_bytes), Vec::new()).unwrap();
    let input = tract_ndarray::Array4::<f32>::from_shape_fn((1, 3, 224, 224), |(_, c, y, x)| {
        ((c * 7 + y * 3 + x) % 255) as f32 / 255.0
    })
    .into_tensor();

    let (mut onnx_parse, mut onnx_typed, mut onnx_total) = (vec![], vec![], vec![]);
    let (mut nnef_read, mut nnef_total) = (vec![], vec![]);
    let mut outputs = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let m = onnx.model_for_read(&mut &onnx_bytes[..]).unwrap();
        onnx_parse.push(t.elapsed());
        let m = m
            .with_input_fact(0, fact())
            .unwrap()
            .into_typed()
            .unwrap()
            .into_decluttered()
            .unwrap();
        onnx_typed.push(t.elapsed());
        let plan = m.into_optimized().unwrap().into_runnable().unwrap();
        onnx_total.push(t.elapsed());
        let a = plan.run(tvec!(input.clone().into())).unwrap();

        let t = Instant::now();
        let m = nnef.model_for_read(&mut &tar[..]).unwrap();
        nnef_read.push(t.elapsed());
        let plan = m.into_optimized().unwrap().into_runnable().unwrap();
        nnef_total.push(t.elapsed());
        let b = plan.run(tvec!(input.clone().into())).unwrap();
        outputs.push((a[0].clone(), b[0].clone()));
    }
    for (a, b) in &outputs {
        a.close_enough(b, true)
            .expect("both forms compute the same outputs");
    }
    println!(
        "mobilenet_v3_small: ONNX file {} bytes, NNEF tar {} bytes (zstd -19: {} / {})",
        onnx_bytes.len(),
        tar.len(),
        zstd::bulk::compress(&onnx_bytes, 19).unwrap().len(),
        zstd::bulk::compress(&tar, 19).unwrap().len()
    );
    println!(
        "ONNX → runnable plan: {:.1} ms (parse {:.1}, + analyse and declutter {:.1}, + optimise {:.1})",
        median(onnx_total.clone()),
        median(onnx_parse),
        median(onnx_typed.clone()),
        median(onnx_total.clone()) - median(onnx_typed),
    );
    println!(
        "NNEF → runnable plan: {:.1} ms (read {:.1}, + optimise {:.1}); NNEF / ONNX {:.2}",
        median(nnef_total.clone()),
        median(nnef_read.clone()),
        median(nnef_total.clone()) - median(nnef_read),
        median(nnef_total) / median(onnx_total),
    );
}
