#!/usr/bin/env python3
"""onnxruntime's side of the engine benchmarks (packager/benches/models.rs):
what a Python service calling onnxruntime pays per prediction, measured the
way the Rust side measures tract (rounds of calls, median of the per-round
means), one thread.

    python3 scripts/ort_bench.py MODEL.onnx INPUT_NAME DIM,DIM,... ROUNDS PER_ROUND

Prints one JSON object: {"version": ..., "median_us": ...}. Exits 2 with a
message on stderr when onnxruntime or numpy is not installed.
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
    model, name, dims, rounds, per_round = sys.argv[1:6]
    shape = [int(d) for d in dims.split(",")]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    feed = {name: x}
    for _ in range(20):
        sess.run(None, feed)
    means = []
    for _ in range(int(rounds)):
        t = time.perf_counter()
        for _ in range(int(per_round)):
            sess.run(None, feed)
        means.append((time.perf_counter() - t) / int(per_round))
    means.sort()
    print(json.dumps({"version": ort.__version__, "median_us": means[len(means) // 2] * 1e6}))


if __name__ == "__main__":
    main()
