#!/usr/bin/env python3
"""Retrains the iris example on what the fleet saw, and writes a complete Ferry project.

    python3 examples/iris/retrain.py REQUEST_JSON --out PROJECT_DIR [--sequence N] [--version V]

REQUEST_JSON is the `request.json` (schema 1) that `ferry-fleet serve` writes for a retraining
episode (or `ferry-fleet retrain --export DIR` on demand): which features drifted, on which
devices and bundles, and `samples_csv`, the absolute path of the data set (columns device,
ts_ms, bundle_version, the four features, top1, score). See fleet/README.md, "Retraining".

Training set: the original training split (exactly train.py's: load_iris, the same stratified
split and seed) plus every complete device sample, labelled with its `top1`, the class the
deployed model predicted.

    These are PSEUDO-LABELS. The deployed model labels its own inputs, so retraining on them
    mostly re-centres the standardisation and the drift baseline on the new data; it cannot
    correct the model where it is wrong. A real pipeline labels the samples (human review,
    delayed ground truth, a stronger offline model) before training on them. Pseudo-labels
    keep this example self-contained.

The standardisation (mean and population std, rounded to 6 decimals, as in train.py) is
recomputed over the combined set, the model is refitted and exported like train.py does, and
PROJECT_DIR receives:

    model.onnx
    ferry.toml          train.py's structure: new mean/std, version bumped, [release] sequence,
                        [drift] baseline = data/baseline.csv, lineage of the retraining
    data/baseline.csv   the combined features: the new bundle's drift reference is the data it
                        was trained on
    golden/*.json       examples/iris/golden's inputs, with *.expected.json recomputed by
                        onnxruntime through examples/ferry_reference.py (`ferry pack` runs them
                        in the guest and refuses a bundle whose outputs differ)

Then: ferry pack PROJECT_DIR --key KEY -o new.ferry. The version defaults to the version of the
retrained bundle (the request's bundle with the highest sequence, else examples/iris/ferry.toml)
with ".1" appended; the sequence to that bundle's sequence + 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train  # noqa: E402  (train.py: shared helpers; importing it trains nothing)
from train import FEATURES, CLASSES, ref  # noqa: E402


def load_samples(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Features [N, 4] and top1 [N] of the complete rows (every feature and top1 present, top1 a
    known class), and the number of rows skipped."""
    xs, ys, skipped = [], [], 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in FEATURES + ["top1"] if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"retrain.py: {path} has no column(s) {', '.join(missing)}")
        for row in reader:
            try:
                x = [float(row[c]) for c in FEATURES]
                y = int(row["top1"])
            except (TypeError, ValueError):
                skipped += 1
                continue
            if not 0 <= y < len(CLASSES) or not all(np.isfinite(x)):
                skipped += 1
                continue
            xs.append(x)
            ys.append(y)
    return np.array(xs, dtype=np.float64).reshape(-1, 4), np.array(ys, dtype=np.int64), skipped


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("request", type=Path, help="request.json (schema 1) from ferry-fleet")
    ap.add_argument("--out", type=Path, required=True, help="project directory to write")
    ap.add_argument("--sequence", type=int, help="[release] sequence (default: retrained bundle's + 1)")
    ap.add_argument("--version", help='[model] version (default: retrained bundle\'s + ".1")')
    args = ap.parse_args()

    request_path = args.request.resolve()
    req = json.loads(request_path.read_text())
    if req.get("schema") != 1:
        raise SystemExit(f"retrain.py: {request_path}: schema {req.get('schema')!r}, expected 1")
    samples_path = Path(req["samples_csv"])
    if not samples_path.is_absolute():
        samples_path = request_path.parent / samples_path

    # The bundle being replaced: the iris bundle with the highest sequence in the request.
    bundles = [b for b in req.get("bundles", []) if b.get("name") == "iris"] or req.get("bundles", [])
    base = max(bundles, key=lambda b: b.get("sequence", 0), default=None)
    if base is not None:
        old_version, old_sequence = base["version"], int(base.get("sequence", 0))
    else:
        old = ref.load_project(HERE)
        old_version, old_sequence = old["model"]["version"], int(old["release"]["sequence"])
    version = args.version or f"{old_version}.1"
    sequence = args.sequence if args.sequence is not None else old_sequence + 1

    x_dev, y_dev, skipped = load_samples(samples_path)
    if len(y_dev) == 0:
        raise SystemExit(f"retrain.py: {samples_path}: no complete rows (of {req.get('rows')})")
    x_tr, x_te, y_tr, y_te = train.load_split()
    x = np.vstack([x_tr, x_dev])
    y = np.concatenate([y_tr, y_dev])

    mean, std = train.standardization(x)
    z = train.standardize(x, mean, std)
    clf = train.fit(z, y)
    train_acc = float(clf.score(z, y))
    test_acc = float(clf.score(train.standardize(x_te, mean, std), y_te))
    agree = float(clf.score(train.standardize(x_dev, mean, std), y_dev))

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.onnx"
    train.export_onnx(clf, model_path)
    train.write_csv(out / "data" / "baseline.csv", x)

    drifted = [f["name"] for f in req.get("features", [])]
    devices = sorted({d["device"] for d in req.get("devices", [])})
    src = base or {}
    training = f"""algorithm = "LogisticRegression"
solver = "lbfgs"
multi_class = "multinomial"
C = 1.0
library = "scikit-learn"
sklearn_version = "{train.sklearn.__version__}"
skl2onnx_version = "{train.skl2onnx.__version__}"
standardization = "mean and population std (ddof=0) of the combined set, applied by the guest"
retrained_from = {toml_str(f"{src.get('name', 'iris')} {old_version} (sequence {old_sequence})")}
retrained_from_digest = {toml_str(src.get("digest", ""))}
source_request = {toml_str(str(request_path))}
episode = {toml_str(req.get("episode") or "")}
fleet = {toml_str(req.get("fleet", ""))}
rule = {toml_str(req.get("rule", ""))}
drifted_features = {json.dumps(drifted)}
devices = {json.dumps(devices)}
labels = "device samples pseudo-labelled with the deployed model's top1 (not ground truth)"
original_train_rows = {len(y_tr)}
device_rows = {len(y_dev)}
device_rows_skipped = {skipped}
train_rows = {len(y)}
test_rows = {len(y_te)}
split_seed = {train.SPLIT_SEED}
train_accuracy = {round(train_acc, 4)}
test_accuracy = {round(test_acc, 4)}
pseudo_label_agreement = {round(agree, 4)}
"""
    (out / "ferry.toml").write_text(train.render_toml(
        mean, std, training=training, version=version, sequence=sequence,
        header=f"# Generated by examples/iris/retrain.py from {request_path}; see examples/iris/README.md.",
        std_comment="original training split + device samples, population std (ddof = 0)",
    ))

    gdir = out / "golden"
    gdir.mkdir(exist_ok=True)
    for g in train.GOLDENS:
        shutil.copyfile(HERE / "golden" / f"{g}.json", gdir / f"{g}.json")
    train.write_expected(out, ref.session(model_path))

    print(f"retrain: {len(y_tr)} original + {len(y_dev)} device rows ({skipped} skipped); "
          f"drifted: {', '.join(drifted) or '-'}")
    print(f"retrain: mean {mean.tolist()}  std (population) {std.tolist()}")
    print(f"retrain: train accuracy {train_acc:.4f}, original test accuracy {test_acc:.4f}, "
          f"agreement with pseudo-labels {agree:.4f}")
    print(f"retrain: wrote {out} (iris {version}, sequence {sequence})")


if __name__ == "__main__":
    main()
