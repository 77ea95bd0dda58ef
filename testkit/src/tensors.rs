//! Binary tensor request bodies, as a client makes them: NumPy `.npy` files
//! (`application/x-npy`) and tensor sets in the guest ABI's wire format
//! (`application/x-ferry-tensors`).

use ferry_guest_abi::{Tensor, TensorSet};

/// A `.npy` file with any type string, for requests a pipeline must refuse
/// (format 1.0, header padded to a multiple of 64 bytes and ended by a
/// newline; without NumPy's spare room, which readers do not need).
pub fn npy(descr: &str, shape: &[u64], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// A float32 `.npy` file, as `np.save` writes it (`Tensor::to_npy`, checked
/// byte for byte against NumPy in guest-abi/tests/npy.rs).
pub fn npy_f32(shape: &[u64], values: &[f32]) -> Vec<u8> {
    Tensor::from_f32("x", shape.to_vec(), values).to_npy()
}

/// A tensor set holding one float32 tensor.
pub fn tensor_set_f32(name: &str, shape: &[u64], values: &[f32]) -> Vec<u8> {
    TensorSet {
        tensors: vec![Tensor::from_f32(name, shape.to_vec(), values)],
        features: None,
    }
    .encode()
}

/// The iris tensor request of `examples/iris/golden/tensor_request.json`
/// (2 rows of 4 features), as shape and values.
pub fn iris_tensor() -> (Vec<u64>, Vec<f32>) {
    let req = crate::fixtures::read_json(
        &crate::fixtures::examples().join("iris/golden/tensor_request.json"),
    );
    let t = &req["inputs"]["float_input"];
    let shape = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect();
    let values = t["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (shape, values)
}

/// Asserts that a tensor of a binary response holds what the JSON response of
/// the same request says for that output (`outputs.<name>`: the shape, and
/// the values at the tensor's precision, since JSON writes each `f32` with the
/// fewest digits that read back as it).
pub fn assert_matches_json_output(t: &Tensor, response: &serde_json::Value) {
    let output = &response["outputs"][&t.name];
    assert_eq!(
        serde_json::json!(t.shape),
        output["shape"],
        "{}: {response}",
        t.name
    );
    let want: Vec<f64> = output["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no outputs.{} in {response}", t.name))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let got = t.to_f64_vec();
    let same = match t.dtype {
        ferry_guest_abi::DType::F32 => got.iter().zip(&want).all(|(g, w)| *g as f32 == *w as f32),
        _ => got == want,
    };
    assert!(
        same && got.len() == want.len(),
        "{}: {got:?} vs {want:?}",
        t.name
    );
}
