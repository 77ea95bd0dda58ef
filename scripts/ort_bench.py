#!/usr/bin/env python3
"""onnxruntime's side of the engine benchmarks (packager/benches/models.rs):
what a Python service calling onnxruntime pays per prediction, one thread,
measured in rounds that the Rust side interleaves with its own.

    python3 scripts/ort_bench.py MODEL.onnx INPUT_NAME DIM,DIM,...

Prints one JSON line ({"version": ...}) once the session is loaded and warm,
then serves rounds: for each line N read on standard input it runs N
predictions and prints their mean time in microseconds on one line. Ends at
the end of its input. Exits 2 with a message on stderr when onnxruntime or
numpy is not installed.
"""

import json
import sys
import time

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as e:  # the benchmark skips this column
    print(f"onnxruntime not installed: {e}", file=sys.stderr)
    sys.exit(2)


def main():
    model, name, dims = sys.argv[1:4]
    shape = [int(d) for d in dims.split(",")]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    feed = {name: x}
    for _ in range(20):
        sess.run(None, feed)
    print(json.dumps({"version": ort.__version__}), flush=True)
    for line in sys.stdin:
        n = int(line)
        t = time.perf_counter()
        for _ in range(n):
            sess.run(None, feed)
        print((time.perf_counter() - t) / n * 1e6, flush=True)


if __name__ == "__main__":
    main()
