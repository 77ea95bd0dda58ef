use tract_onnx::prelude::*;
fn main() {
    for (path, shape) in [
        ("runtime/tests/fixtures/mlp.onnx", vec![1usize, 4]),
        ("examples/digits/model.onnx", vec![1, 1, 8, 8]),
    ] {
        let m = tract_onnx::onnx()
            .model_for_path(path)
            .unwrap()
            .with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
            .unwrap()
            .into_optimized()
            .unwrap();
        println!("== {path}");
        for n in m.nodes() {
            let konst = n
                .op_as::<tract_onnx::tract_core::ops::konst::Const>()
                .map(|k| format!(" CONST {:?} {:?}", k.val().datum_type(), k.val().shape()))
                .unwrap_or_default();
            println!(
                "{} {} {} inputs={:?}{}",
                n.id,
                n.op().name(),
                n.name,
                n.inputs.iter().map(|i| i.node).collect::<Vec<_>>(),
                konst
            );
        }
        let plan = m.into_runnable().unwrap();
        println!("order {:?}", plan.order_without_consts());
    }
}
