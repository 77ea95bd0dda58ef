//! `Tensor::to_npy` against the bytes NumPy's `np.save` writes for the same
//! arrays (`scripts/npy_fixtures.py` made the fixtures).

use ferry_guest_abi::{DType, Tensor};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}.npy", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn tensor(dtype: DType, shape: &[u64], data: Vec<u8>) -> Tensor {
    Tensor {
        name: "y".into(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

fn le<T, const N: usize>(values: &[T], f: fn(&T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(f).collect()
}

#[test]
fn every_dtype_is_written_byte_for_byte_as_numpy_writes_it() {
    let cases = [
        (
            "f32_2x3",
            Tensor::from_f32("y", vec![2, 3], &[0.5, -1.25, 3.0, 1e-8, 65504.0, -0.0]),
        ),
        (
            "f64_1",
            tensor(
                DType::F64,
                &[1],
                le(&[std::f64::consts::E], |v| v.to_le_bytes()),
            ),
        ),
        (
            "i64_4",
            tensor(
                DType::I64,
                &[4],
                le(&[-1i64, 0, 1, 1 << 40], |v| v.to_le_bytes()),
            ),
        ),
        (
            "i32_1x2x2",
            tensor(
                DType::I32,
                &[1, 2, 2],
                le(&[7i32, -7, 0, i32::MAX], |v| v.to_le_bytes()),
            ),
        ),
        ("u8_3", tensor(DType::U8, &[3], vec![0, 128, 255])),
        ("bool_scalar", tensor(DType::Bool, &[], vec![1])),
        ("f32_0x5", tensor(DType::F32, &[0, 5], vec![])),
        // The edges of NumPy's padding.
        (
            "u8_0x10e12",
            tensor(DType::U8, &[0, 1_000_000_000_000], vec![]),
        ),
        (
            "u8_10e18x0",
            tensor(DType::U8, &[1_000_000_000_000_000_000, 0], vec![]),
        ),
        ("u8_rank20", tensor(DType::U8, &[1; 20], vec![0])),
        (
            "u8_big_rank4",
            tensor(DType::U8, &[0, 1_000_000, 1_000_000, 1_000_000], vec![]),
        ),
        ("u8_rank36_aligned", tensor(DType::U8, &[1; 36], vec![0])),
    ];
    for (name, t) in cases {
        assert_eq!(
            t.to_npy(),
            fixture(name),
            "{name}: {:?}",
            String::from_utf8_lossy(&t.to_npy())
        );
    }
}

#[test]
fn a_header_over_64_kib_takes_format_2() {
    // No model has 25,000 dimensions (NumPy itself stops at 64, the guest ABI at 16); the
    // format's limit is still honoured, with NumPy's padding rule.
    let t = tensor(DType::U8, &[1; 25_000], vec![9]);
    let npy = t.to_npy();
    assert_eq!(&npy[..8], b"\x93NUMPY\x02\x00");
    let len = u32::from_le_bytes(npy[8..12].try_into().unwrap()) as usize;
    assert!(len > 1 << 16, "{len}");
    assert_eq!((12 + len) % 64, 0);
    assert_eq!(npy[12 + len - 1], b'\n');
    assert!(npy[12..].starts_with(b"{'descr': '|u1', 'fortran_order': False, 'shape': (1, 1,"));
    assert_eq!(&npy[12 + len..], [9]);
}
