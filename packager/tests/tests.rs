//! End-to-end tests of the real `ferry` binary. Modules:
//! - `pack`: pack → verify → run round trips against onnxruntime's outputs, reproducibility, golden failures.
//! - `reject`: tampered bundles, wrong keys, bad inputs and bad project files give clear errors and exit codes.
//! - `engines`: which engines can serve a model (`ferry pack`), onnxruntime for what tract refuses, `--engine`.
//! - `drift`: `ferry drift` flags shifted features and only those.
//! - `publish`: update channel directories for `ferry-agent`.
//! - `mlflow`: MLflow model directories in (lineage, external weights, `ferry init`).
//! - `bench`: `ferry bench`'s report (shape and consistency, not speed).
//! - `binary`: binary tensor requests and responses (`.npy`, tensor sets) through `ferry run`.

mod bench;
mod binary;
mod drift;
mod engines;
mod mlflow;
mod pack;
mod publish;
mod reject;
