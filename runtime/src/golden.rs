//! Comparing a response with a golden example's expected output.
//!
//! The expected document may be a *subset* of the response: every key it has
//! must be in the response, with an equal value; numbers are equal within an
//! absolute tolerance; arrays must have the same length. Keys of the response
//! that the expected document does not mention are ignored, so a golden
//! example can pin only the label, or every probability.

use serde::Serialize;
use serde_json::Value;

/// One difference between expected and actual output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mismatch {
    /// JSON path of the value, e.g. `predictions[0].score`.
    pub path: String,
    pub expected: String,
    pub actual: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: expected {}, got {}",
            self.path, self.expected, self.actual
        )
    }
}

/// Most mismatches reported per example; the rest are counted in the last.
pub const MAX_MISMATCHES: usize = 20;

/// Compares `actual` against the (subset) `expected` document.
pub fn compare_json(expected: &Value, actual: &Value, tolerance: f64) -> Vec<Mismatch> {
    let mut out = Vec::new();
    walk(expected, actual, tolerance, &mut String::new(), &mut out);
    if out.len() > MAX_MISMATCHES {
        let more = out.len() - MAX_MISMATCHES;
        out.truncate(MAX_MISMATCHES);
        out.push(Mismatch {
            path: "...".into(),
            expected: String::new(),
            actual: format!("{more} more difference(s)"),
        });
    }
    out
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}...", &s[..s.floor_char_boundary(77)])
    } else {
        s
    }
}

fn walk(expected: &Value, actual: &Value, tol: f64, path: &mut String, out: &mut Vec<Mismatch>) {
    let here = |path: &str| {
        if path.is_empty() {
            "$".to_string()
        } else {
            path.to_string()
        }
    };
    match (expected, actual) {
        (Value::Number(e), Value::Number(a)) => {
            let (e, a) = (
                e.as_f64().unwrap_or(f64::NAN),
                a.as_f64().unwrap_or(f64::NAN),
            );
            let diff = (e - a).abs();
            // NaN differences are mismatches too.
            if diff.is_nan() || diff > tol {
                out.push(Mismatch {
                    path: here(path),
                    expected: e.to_string(),
                    actual: format!("{a} (off by {diff:.3e})"),
                });
            }
        }
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match a.get(k) {
                    Some(av) => walk(ev, av, tol, path, out),
                    None => out.push(Mismatch {
                        path: here(path),
                        expected: short(ev),
                        actual: "(missing)".into(),
                    }),
                }
                path.truncate(len);
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                out.push(Mismatch {
                    path: here(path),
                    expected: format!("{} element(s)", e.len()),
                    actual: format!("{} element(s)", a.len()),
                });
                return;
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(ev, av, tol, path, out);
                path.truncate(len);
            }
        }
        (e, a) if e == a => {}
        (e, a) => out.push(Mismatch {
            path: here(path),
            expected: short(e),
            actual: short(a),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subset_and_tolerance() {
        let actual =
            json!({"predictions": [{"label": "a", "score": 0.5000001}], "outputs": {"x": [1, 2]}});
        assert!(compare_json(&json!({"predictions": [{"label": "a"}]}), &actual, 1e-5).is_empty());
        assert!(compare_json(&json!({"predictions": [{"score": 0.5}]}), &actual, 1e-5).is_empty());
        let m = compare_json(
            &json!({"predictions": [{"score": 0.6, "label": "b"}], "other": 1}),
            &actual,
            1e-5,
        );
        let mut paths: Vec<_> = m.iter().map(|m| m.path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            ["other", "predictions[0].label", "predictions[0].score"]
        );
        let m = compare_json(&json!({"outputs": {"x": [1]}}), &actual, 0.0);
        assert_eq!(m[0].path, "outputs.x");
        assert_eq!(m[0].actual, "2 element(s)");
    }
}
