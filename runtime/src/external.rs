//! ONNX external data: weights kept in files beside `model.onnx` (what
//! `onnx.save_model(..., save_as_external_data=True)` and MLflow write for
//! large models), inlined so a bundle carries one self-contained model.

use crate::model::onnx_pb::{GraphProto, ModelProto, TensorProto};
use prost::Message;

/// Inlines every tensor whose data lives in an external file. `read(location)`
/// returns the bytes of a file named by a tensor's `location`, relative to the
/// model's directory; locations that are absolute or climb out with `..` are
/// refused before `read` sees them. Returns `None` when the model has no
/// external data, or is not a protobuf at all (the caller keeps its bytes as
/// they are, and the model loader explains).
pub fn inline_external_data(
    onnx: &[u8],
    read: &dyn Fn(&str) -> std::io::Result<Vec<u8>>,
) -> Result<Option<Vec<u8>>, String> {
    // Bytes that are not an ONNX protobuf are left to the model loader,
    // whose error says so in its own words.
    let Ok(mut model) = ModelProto::decode(onnx) else {
        return Ok(None);
    };
    let mut changed = 0usize;
    if let Some(graph) = model.graph.as_mut() {
        inline_graph(graph, read, &mut changed)?;
    }
    if changed == 0 {
        return Ok(None);
    }
    Ok(Some(model.encode_to_vec()))
}

fn inline_graph(
    graph: &mut GraphProto,
    read: &dyn Fn(&str) -> std::io::Result<Vec<u8>>,
    changed: &mut usize,
) -> Result<(), String> {
    for t in &mut graph.initializer {
        inline_tensor(t, read, changed)?;
    }
    for node in &mut graph.node {
        for a in &mut node.attribute {
            if let Some(t) = a.t.as_mut() {
                inline_tensor(t, read, changed)?;
            }
            for t in &mut a.tensors {
                inline_tensor(t, read, changed)?;
            }
            if let Some(g) = a.g.as_mut() {
                inline_graph(g, read, changed)?;
            }
            for g in &mut a.graphs {
                inline_graph(g, read, changed)?;
            }
        }
    }
    Ok(())
}

fn inline_tensor(
    t: &mut TensorProto,
    read: &dyn Fn(&str) -> std::io::Result<Vec<u8>>,
    changed: &mut usize,
) -> Result<(), String> {
    // DataLocation::External = 1.
    if t.data_location != Some(1) {
        return Ok(());
    }
    let field = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
    };
    let location = field("location")
        .ok_or_else(|| format!("tensor {:?}: external data without a location", t.name))?;
    let inside = {
        use std::path::{Component, Path};
        let p = Path::new(&location);
        p.components().all(|c| matches!(c, Component::Normal(_)))
    };
    if !inside {
        return Err(format!(
            "tensor {:?}: external data location {location:?} is not a file beside the model",
            t.name
        ));
    }
    let number = |k: &str| -> Result<Option<usize>, String> {
        field(k)
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| format!("tensor {:?}: bad external data {k} {v:?}", t.name))
            })
            .transpose()
    };
    let offset = number("offset")?.unwrap_or(0);
    let length = number("length")?;
    let bytes =
        read(&location).map_err(|e| format!("tensor {:?}: cannot read {location}: {e}", t.name))?;
    let end = match length {
        Some(l) => offset.checked_add(l),
        None => Some(bytes.len()),
    }
    .filter(|end| *end <= bytes.len() && offset <= *end)
    .ok_or_else(|| {
        format!(
            "tensor {:?}: {location} has {} bytes, the tensor needs {offset}..{}",
            t.name,
            bytes.len(),
            length.map(|l| (offset + l).to_string()).unwrap_or_default()
        )
    })?;
    t.raw_data = bytes[offset..end].to_vec();
    t.external_data.clear();
    t.data_location = Some(0);
    *changed += 1;
    Ok(())
}
