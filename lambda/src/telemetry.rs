//! Logs and metrics the way Lambda users read them: one JSON object per
//! line on stdout (CloudWatch Logs' JSON format), and metrics as CloudWatch
//! Embedded Metric Format (EMF) lines, which CloudWatch turns into metrics
//! without any API call from the function.

use serde_json::{Value, json};

/// CloudWatch namespace of Ferry's metrics.
pub const NAMESPACE: &str = "Ferry";

use ferry_host::now_ms;

/// A structured log line: `{"timestamp", "level", "message", ...fields}`.
pub fn log(level: &str, message: &str, fields: Value) {
    let mut line = json!({ "timestamp": now_ms(), "level": level, "message": message });
    if let (Some(obj), Value::Object(extra)) = (line.as_object_mut(), fields) {
        obj.extend(extra);
    }
    println!("{line}");
}

/// What one invocation did.
#[derive(Debug)]
pub struct Invocation<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub latency_ms: f64,
    pub cold_start: bool,
    /// Samples predicted (rows of a batch); 0 on error.
    pub predictions: usize,
    pub error: bool,
    /// Predicted class labels (classification), one per sample.
    pub classes: Vec<String>,
}

/// The EMF lines for one invocation: latency, predictions, errors and the
/// cold-start flag by model; and predictions per class by model and class.
pub fn emf_lines(i: &Invocation<'_>) -> Vec<Value> {
    let ts = now_ms();
    let mut lines = vec![json!({
        "_aws": {
            "Timestamp": ts,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["Model"]],
                "Metrics": [
                    {"Name": "Latency", "Unit": "Milliseconds"},
                    {"Name": "Predictions", "Unit": "Count"},
                    {"Name": "Errors", "Unit": "Count"},
                    {"Name": "ColdStart", "Unit": "Count"}
                ]
            }]
        },
        "Model": i.model,
        "ModelVersion": i.version,
        "Latency": i.latency_ms,
        "Predictions": i.predictions,
        "Errors": u8::from(i.error),
        "ColdStart": u8::from(i.cold_start),
    })];
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for c in &i.classes {
        *counts.entry(c).or_default() += 1;
    }
    for (class, n) in counts {
        lines.push(json!({
            "_aws": {
                "Timestamp": ts,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [["Model", "Class"]],
                    "Metrics": [{"Name": "ClassPredictions", "Unit": "Count"}]
                }]
            },
            "Model": i.model,
            "Class": class,
            "ClassPredictions": n,
        }));
    }
    lines
}

/// Prints the EMF lines of an invocation.
pub fn emit(i: &Invocation<'_>) {
    for line in emf_lines(i) {
        println!("{line}");
    }
}
