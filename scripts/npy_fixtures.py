#!/usr/bin/env python3
"""Writes guest-abi/tests/fixtures/*.npy with NumPy's own `np.save`: the
bytes `Tensor::to_npy` must reproduce exactly (guest-abi/tests/npy.rs).

    python3 -m pip install numpy && python3 scripts/npy_fixtures.py
"""

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "guest-abi" / "tests" / "fixtures"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    arrays = {
        "f32_2x3": np.array([[0.5, -1.25, 3.0], [1e-8, 65504.0, -0.0]], dtype="<f4"),
        "f64_1": np.array([2.718281828459045], dtype="<f8"),
        "i64_4": np.array([-1, 0, 1, 1 << 40], dtype="<i8"),
        "i32_1x2x2": np.array([[[7, -7], [0, 2**31 - 1]]], dtype="<i4"),
        "u8_3": np.array([0, 128, 255], dtype="u1"),
        "bool_scalar": np.array(True),
        "f32_0x5": np.zeros((0, 5), dtype="<f4"),
        # Headers at the edges of NumPy's padding: a first axis of many digits (less room
        # left to grow it), many dimensions, a header already 64-byte aligned.
        "u8_0x10e12": np.zeros((0, 10**12), dtype="u1"),
        "u8_10e18x0": np.zeros((10**18, 0), dtype="u1"),
        "u8_rank20": np.zeros((1,) * 20, dtype="u1"),
        "u8_big_rank4": np.zeros((0, 10**6, 10**6, 10**6), dtype="u1"),
        "u8_rank36_aligned": np.zeros((1,) * 36, dtype="u1"),
    }
    for name, a in arrays.items():
        np.save(OUT / f"{name}.npy", a)
        print(name, a.dtype, a.shape)


if __name__ == "__main__":
    main()
