"""A small Python reference of Ferry's standard guest, used to compute and to audit the
golden expected responses of the examples.

It follows docs/project-file.md: preprocessing (`tensor`, `tabular`, `image`), the model run
(onnxruntime instead of tract) and postprocessing (`tensor`, `classification`, `regression`).
Arithmetic is done in float32 the way the guest does it:

* tabular:  (f32(x) - f32(mean)) / f32(std)
* image:    (f32(pixel) * f32(scale) - f32(mean[c])) / f32(std[c])
* softmax:  subtract the row max, exp, divide by the row sum (all f32)

It also holds the drift statistics used to check the drift test data (KS test and the
Wasserstein-1 distance divided by the baseline's population standard deviation).

Only numpy, Pillow, onnxruntime and scipy are needed.
"""

from __future__ import annotations

import base64
import io
import json
import tomllib
from pathlib import Path

import numpy as np

ORT_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


# --------------------------------------------------------------------------- project / model


def load_project(project_dir: str | Path) -> dict:
    with open(Path(project_dir) / "ferry.toml", "rb") as f:
        return tomllib.load(f)


def session(model_path: str | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_model(sess, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, inputs)
    return dict(zip(names, values))


# --------------------------------------------------------------------------- preprocessing


def tabular_tensor(features: list[dict], records: list[dict]) -> np.ndarray:
    """The `kind = "tabular"` tensor [N, width] (float32)."""
    rows = []
    for rec in records:
        row = []
        for feat in features:
            name = feat["name"]
            v = rec.get(name)
            if v is None:
                if "default" not in feat:
                    raise ValueError(f"record is missing field {name!r}")
                v = feat["default"]
            if "categories" in feat:
                cats = feat["categories"]
                if v not in cats and feat.get("handle_unknown") != "ignore":
                    raise ValueError(f"unknown category {v!r} for {name!r}")
                row.extend(np.float32(1.0 if c == v else 0.0) for c in cats)
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"field {name!r} must be a number")
                mean = np.float32(feat.get("mean", 0.0))
                std = np.float32(feat.get("std", 1.0))
                row.append((np.float32(v) - mean) / std)
        rows.append(row)
    return np.asarray(rows, dtype=np.float32)


def decode_image(data: bytes, color: str) -> np.ndarray:
    """Decoded 8-bit pixels [H, W, C]."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img = img.convert("L" if color == "grayscale" else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def image_tensor(cfg: dict, images: list[bytes], input_rank: int) -> np.ndarray:
    from PIL import Image

    width, height = int(cfg["width"]), int(cfg["height"])
    color = cfg.get("color", "rgb")
    channels = 1 if color == "grayscale" else 3
    scale = np.float32(cfg.get("scale", 1.0 / 255.0))
    mean = [np.float32(m) for m in cfg.get("mean", [0.0])]
    std = [np.float32(s) for s in cfg.get("std", [1.0])]
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    out = []
    for data in images:
        px = decode_image(data, color)
        if px.shape[0] != height or px.shape[1] != width:
            # Only an approximation of the guest's resize filters; the goldens need no resize.
            mode = "L" if channels == 1 else "RGB"
            img = Image.fromarray(px[:, :, 0] if channels == 1 else px, mode)
            px = np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.uint8)
            px = px[:, :, None] if px.ndim == 2 else px
        x = np.empty((height, width, channels), dtype=np.float32)
        for c in range(channels):
            x[:, :, c] = (px[:, :, c].astype(np.float32) * scale - mean[c]) / std[c]
        out.append(x)
    t = np.stack(out)  # N, H, W, C
    if cfg.get("layout", "nchw") == "nchw":
        t = t.transpose(0, 3, 1, 2)
    t = np.ascontiguousarray(t)
    n = t.shape[0]
    if input_rank == 2:
        t = t.reshape(n, -1)
    elif input_rank == 3:
        t = t.reshape(n, height, width)
    return t


def image_features(pixels: np.ndarray) -> tuple[float, float]:
    """(brightness, contrast): mean and population std of pixel/255 over all channels."""
    v = pixels.astype(np.float64) / 255.0
    return float(v.mean()), float(v.std())


def preprocess(project: dict, sess, body: bytes, content_type: str) -> dict[str, np.ndarray]:
    cfg = project.get("preprocess", {})
    kind = cfg.get("kind", "tensor")
    model_inputs = {i.name: i for i in sess.get_inputs()}
    input_name = cfg.get("input") or next(iter(model_inputs))
    if kind == "tensor":
        req = json.loads(body)
        out = {}
        if set(req["inputs"]) != set(model_inputs):
            raise ValueError("inputs do not match the model's")
        for name, t in req["inputs"].items():
            dtype = ORT_TO_NP[model_inputs[name].type]
            out[name] = np.asarray(t["data"], dtype=np.float64).astype(dtype).reshape(t["shape"])
        return out
    if kind == "tabular":
        req = json.loads(body)
        records = req["records"] if "records" in req else [req["record"]]
        return {input_name: tabular_tensor(cfg["features"], records)}
    if kind == "image":
        if content_type == "application/json":
            req = json.loads(body)
            images = [base64.b64decode(req["image"])] if "image" in req else [base64.b64decode(s) for s in req["images"]]
        else:
            images = [body]
        rank = len(model_inputs[input_name].shape)
        return {input_name: image_tensor(cfg, images, rank)}
    raise ValueError(f"unknown preprocess kind {kind!r}")


# --------------------------------------------------------------------------- postprocessing


def tensor_json(a: np.ndarray) -> dict:
    flat = a.reshape(-1)
    if np.issubdtype(a.dtype, np.floating):
        data = [float(np.float32(v)) if a.dtype == np.float32 else float(v) for v in flat]
    elif a.dtype == np.bool_:
        data = [bool(v) for v in flat]
    else:
        data = [int(v) for v in flat]
    return {"shape": [int(d) for d in a.shape], "data": data}


def softmax_f32(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float32)
    e = np.exp(row - row.max(), dtype=np.float32)
    total = np.float32(0.0)
    for v in e:  # sequential f32 sum, as a simple loop in the guest would do
        total = np.float32(total + v)
    return (e / total).astype(np.float32)


def sigmoid_f32(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float32)
    return (np.float32(1.0) / (np.float32(1.0) + np.exp(-row, dtype=np.float32))).astype(np.float32)


def postprocess(project: dict, outputs: dict[str, np.ndarray]) -> dict:
    cfg = project.get("postprocess", {})
    kind = cfg.get("kind", "tensor")
    raw = {name: tensor_json(v) for name, v in outputs.items()}
    if kind == "tensor":
        return {"outputs": raw}
    out_name = cfg.get("output") or next(n for n, v in outputs.items() if np.issubdtype(v.dtype, np.floating))
    table = np.asarray(outputs[out_name])
    table = table.reshape(table.shape[0], -1) if table.ndim != 1 else table.reshape(-1, 1)
    preds = []
    if kind == "classification":
        activation = cfg.get("activation", "none")
        top_k = int(cfg.get("top_k", 1))
        for row in table:
            row = row.astype(np.float32)
            if activation == "softmax":
                scores = softmax_f32(row)
            elif activation == "sigmoid":
                scores = sigmoid_f32(row)
                if scores.shape[0] == 1:
                    scores = np.asarray([np.float32(1.0) - scores[0], scores[0]], dtype=np.float32)
            else:
                scores = row
            labels = cfg.get("labels") or [str(i) for i in range(len(scores))]
            order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
            best = order[0]
            pred = {"label": labels[best], "class": best, "score": float(scores[best])}
            if top_k > 1:
                pred["top_k"] = [{"label": labels[i], "class": i, "score": float(scores[i])} for i in order[:top_k]]
            preds.append(pred)
    elif kind == "regression":
        for row in table:
            vals = [float(np.float32(v)) for v in row]
            preds.append({"value": vals[0] if len(vals) == 1 else vals})
    else:
        raise ValueError(f"unknown postprocess kind {kind!r}")
    resp = {"predictions": preds}
    if cfg.get("include_outputs", True):
        resp["outputs"] = raw
    return resp


# --------------------------------------------------------------------------- whole pipeline


def content_type_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(suffix, "application/json")


def respond(project: dict, sess, request_path: Path) -> dict:
    body = Path(request_path).read_bytes()
    inputs = preprocess(project, sess, body, content_type_of(Path(request_path)))
    return postprocess(project, run_model(sess, inputs))


def respond_raw(sess, request_path: Path) -> dict:
    """The response of `ferry pack --model` (tensor in, tensor out)."""
    body = Path(request_path).read_bytes()
    inputs = preprocess({}, sess, body, "application/json")
    return postprocess({}, run_model(sess, inputs))


def write_json(path: Path, doc) -> None:
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def compare(expected, actual, tol: float, path: str = "$") -> list[str]:
    """Same rule as the runtime's golden check (expected may be a subset; numbers within tol)."""
    errs: list[str] = []
    if isinstance(expected, bool) or isinstance(actual, bool):
        if expected != actual:
            errs.append(f"{path}: expected {expected!r}, got {actual!r}")
    elif isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        if not abs(expected - actual) <= tol:
            errs.append(f"{path}: expected {expected}, got {actual} (off by {abs(expected - actual):.3e})")
    elif isinstance(expected, dict) and isinstance(actual, dict):
        for k, v in expected.items():
            if k not in actual:
                errs.append(f"{path}.{k}: missing")
            else:
                errs.extend(compare(v, actual[k], tol, f"{path}.{k}"))
    elif isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            errs.append(f"{path}: expected {len(expected)} element(s), got {len(actual)}")
        else:
            for i, (e, a) in enumerate(zip(expected, actual)):
                errs.extend(compare(e, a, tol, f"{path}[{i}]"))
    elif expected != actual:
        errs.append(f"{path}: expected {expected!r}, got {actual!r}")
    return errs


# --------------------------------------------------------------------------- drift statistics


def drift_stats(baseline: np.ndarray, current: np.ndarray) -> dict:
    """KS two-sample test and the Wasserstein-1 distance normalised by the baseline's
    population standard deviation."""
    from scipy import stats

    baseline = np.asarray(baseline, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    ks = stats.ks_2samp(baseline, current)
    w = stats.wasserstein_distance(baseline, current)
    sd = baseline.std()
    return {
        "ks_statistic": float(ks.statistic),
        "ks_p": float(ks.pvalue),
        "wasserstein": float(w),
        "wasserstein_normed": float(w / sd) if sd > 0 else float("inf"),
    }
