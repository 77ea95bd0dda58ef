//! Lambda events → Ferry requests → responses.
//!
//! - **Direct invocation**: the event *is* the request, in the JSON forms of
//!   `ferry run` (tensors, records, `{"image": "<base64>"}`); the result is
//!   the response JSON. A bad request is a function error
//!   (`errorType` `Ferry.bad_input`) naming what is wrong.
//! - **API Gateway HTTP API (payload 2.0) and function URLs**, and **API
//!   Gateway REST (1.0)**: the body (JSON, or an image or a binary tensor
//!   such as `.npy`, base64-encoded by Lambda) with its `content-type`; the
//!   result is an HTTP response: 200 with the response JSON, or with the
//!   model's outputs base64-encoded (`isBase64Encoded`) when the `accept`
//!   header asks for `application/x-npy` or `application/x-ferry-tensors`;
//!   400 with `{"error": ...}` for a bad request, 406 for a binary form the
//!   model cannot give (`.npy` from several outputs), 413 for a body over
//!   the limit, 500 for a failure of the function itself or an answer over
//!   Lambda's 6 MB response limit (which would reach the client as a bare
//!   502 from API Gateway).

use std::time::Instant;

use base64::Engine as _;
use ferry_runtime::{ResponseForm, Session};
use lambda_runtime::Diagnostic;
use serde_json::{Value, json};

use crate::telemetry::{self, Invocation};

/// Largest request body accepted. Lambda itself caps synchronous payloads
/// at 6 MB; a lower cap (`FERRY_MAX_BODY_BYTES`) refuses big bodies with a
/// 413 before any decoding.
pub const DEFAULT_MAX_BODY_BYTES: usize = 6 << 20;

/// Lambda's limit on a synchronous invocation's response (the whole JSON it
/// returns: an HTTP response's body is a string in it), less room for the
/// rest of that JSON. A larger answer would reach the client as a bare 502
/// from API Gateway; it is refused here with a message instead.
pub const MAX_RESPONSE_BYTES: usize = (6 << 20) - 1024;

/// How many bytes `answer` takes in the invocation's response: base64 for a
/// binary form; for JSON, the text itself (direct invocations) or that text
/// as a JSON string (HTTP: each `"` and `\` escaped, and two quotes).
fn response_size(form: ResponseForm, out: &[u8], http: bool) -> usize {
    if form.is_binary() {
        out.len().div_ceil(3) * 4
    } else if http {
        out.len() + out.iter().filter(|&&b| b == b'"' || b == b'\\').count() + 2
    } else {
        out.len()
    }
}

fn max_body_bytes() -> usize {
    std::env::var("FERRY_MAX_BODY_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MAX_BODY_BYTES)
}

/// Where an event came from.
enum Source {
    Direct,
    /// API Gateway HTTP API / function URL (2.0) or REST API (1.0).
    Http,
}

fn header<'a>(event: &'a Value, name: &str) -> Option<&'a str> {
    event
        .get("headers")?
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.as_str())
}

/// The `accept` header of an HTTP event: REST (1.0) events repeat each
/// header's values in `multiValueHeaders`, which lists a repeated header
/// whole; otherwise `headers` (2.0 events join repeated headers there).
fn accept_header(event: &Value) -> Option<String> {
    let multi = event
        .get("multiValueHeaders")
        .and_then(Value::as_object)
        .and_then(|h| h.iter().find(|(k, _)| k.eq_ignore_ascii_case("accept")))
        .and_then(|(_, v)| v.as_array())
        .map(|values| {
            values
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        });
    multi.or_else(|| header(event, "accept").map(str::to_string))
}

/// The request of an HTTP event: content type and decoded body.
fn http_request(event: &Value) -> Result<(String, Vec<u8>), (u16, String)> {
    let body = event.get("body").and_then(Value::as_str).unwrap_or("");
    let limit = max_body_bytes();
    // Base64 grows data by 4/3: check the encoded length first, then the decoded one.
    if body.len() > limit.saturating_mul(4) / 3 + 4 {
        return Err((413, format!("request body is over the {limit}-byte limit")));
    }
    let bytes = if event
        .get("isBase64Encoded")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| {
                (
                    400,
                    format!("body is marked base64 but does not decode: {e}"),
                )
            })?
    } else {
        body.as_bytes().to_vec()
    };
    if bytes.len() > limit {
        return Err((413, format!("request body is over the {limit}-byte limit")));
    }
    if bytes.is_empty() {
        return Err((
            400,
            "request body is empty: send a JSON request or an image".into(),
        ));
    }
    let content_type = header(event, "content-type").unwrap_or("application/json");
    let content_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    Ok((content_type, bytes))
}

/// An HTTP answer in JSON. Its form, and a 406, depend on the request's
/// `accept`: caches must key on it (`vary`).
fn http_response(status: u16, body: &Value) -> Value {
    json!({
        "statusCode": status,
        "headers": {"content-type": "application/json", "vary": "accept"},
        "body": body.to_string(),
        "isBase64Encoded": false,
    })
}

fn source_of(event: &Value) -> Source {
    let is_v2 = event
        .get("requestContext")
        .and_then(|c| c.get("http"))
        .is_some();
    let is_v1 = event.get("httpMethod").is_some() && event.get("requestContext").is_some();
    if is_v2 || is_v1 {
        Source::Http
    } else {
        Source::Direct
    }
}

fn classes_of(response: &Value) -> Vec<String> {
    response
        .get("predictions")
        .and_then(Value::as_array)
        .map(|preds| {
            preds
                .iter()
                .filter_map(|p| p.get("label").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A response before it is put in Lambda's shape.
enum Answer {
    Json(Value),
    /// The model's outputs in a binary form, and how many rows the first has.
    Binary(ResponseForm, Vec<u8>, usize),
}

/// Runs one request in the form asked for (`accept`: the HTTP header;
/// direct invocations answer JSON, `http` false).
fn answer(
    session: &Session,
    content_type: &str,
    body: &[u8],
    accept: Option<&str>,
    http: bool,
) -> Result<Answer, (u16, String)> {
    let status = |e: ferry_runtime::Error| {
        let status = if e.is_not_acceptable() {
            406
        } else if e.is_bad_input() {
            400
        } else {
            500
        };
        (status, e.to_string())
    };
    let form = session.response_form(accept).map_err(status)?;
    let mut rows = 0;
    let out = session
        .infer_with(content_type, body, form, &mut |obs| {
            rows = obs
                .outputs
                .first()
                .and_then(|t| t.shape.first())
                .map_or(1, |&r| r as usize);
        })
        .map_err(status)?;
    let size = response_size(form, &out, http);
    if size > MAX_RESPONSE_BYTES {
        return Err((
            500,
            format!(
                "the answer takes {size} bytes in the response, over Lambda's limit of \
                 {MAX_RESPONSE_BYTES}: send fewer rows per request{}",
                if form.is_binary() {
                    ""
                } else {
                    ", or accept application/x-npy or application/x-ferry-tensors (smaller than JSON)"
                }
            ),
        ));
    }
    if form.is_binary() {
        return Ok(Answer::Binary(form, out, rows));
    }
    serde_json::from_slice(&out)
        .map(Answer::Json)
        .map_err(|e| (500, format!("the guest answered with invalid JSON: {e}")))
}

/// Handles one event.
pub fn handle(session: &Session, event: Value, cold_start: bool) -> Result<Value, Diagnostic> {
    let start = Instant::now();
    let m = session.manifest();
    let source = source_of(&event);
    let outcome = match source {
        Source::Direct => answer(
            session,
            "application/json",
            event.to_string().as_bytes(),
            None,
            false,
        ),
        Source::Http => http_request(&event).and_then(|(ct, body)| {
            answer(session, &ct, &body, accept_header(&event).as_deref(), true)
        }),
    };
    let (predictions, classes) = match &outcome {
        Ok(Answer::Json(v)) => {
            let classes = classes_of(v);
            let n = v
                .get("predictions")
                .and_then(Value::as_array)
                .map(Vec::len)
                .unwrap_or(1);
            (n, classes)
        }
        Ok(Answer::Binary(_, _, rows)) => (*rows, Vec::new()),
        Err(_) => (0, Vec::new()),
    };
    telemetry::emit(&Invocation {
        model: &m.name,
        version: &m.version,
        latency_ms: start.elapsed().as_secs_f64() * 1e3,
        cold_start,
        predictions,
        error: outcome.is_err(),
        classes,
    });
    if let Err((status, message)) = &outcome {
        telemetry::log(
            "WARN",
            "Request refused",
            json!({ "status": status, "error": message }),
        );
    }
    match (source, outcome) {
        (Source::Direct, Ok(Answer::Json(v))) => Ok(v),
        (Source::Direct, Ok(Answer::Binary(..))) => {
            unreachable!("direct invocations answer JSON")
        }
        (Source::Direct, Err((status, message))) => Err(Diagnostic {
            error_type: if status == 400 {
                "Ferry.bad_input".into()
            } else {
                "Ferry.internal".into()
            },
            error_message: message,
        }),
        (Source::Http, Ok(Answer::Json(v))) => Ok(http_response(200, &v)),
        (Source::Http, Ok(Answer::Binary(form, bytes, _))) => Ok(json!({
            "statusCode": 200,
            "headers": {"content-type": form.media_type(), "vary": "accept"},
            "body": base64::engine::general_purpose::STANDARD.encode(bytes),
            "isBase64Encoded": true,
        })),
        (Source::Http, Err((status, message))) => {
            Ok(http_response(status, &json!({ "error": message })))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_sizes_count_what_lambda_counts() {
        // Base64: 4 bytes for each 3, the last group padded.
        assert_eq!(response_size(ResponseForm::Tensors, &[0; 3], true), 4);
        assert_eq!(response_size(ResponseForm::Npy, &[0; 4], true), 8);
        assert_eq!(response_size(ResponseForm::Npy, &[], true), 0);
        // JSON in an HTTP response is a string: quotes and backslashes escaped, two quotes
        // (valid JSON holds no raw control characters to escape).
        let json = br#"{"a":"\n","b":1}"#;
        let as_string = serde_json::to_string(std::str::from_utf8(json).unwrap()).unwrap();
        assert_eq!(
            response_size(ResponseForm::Json, json, true),
            as_string.len()
        );
        assert_eq!(response_size(ResponseForm::Json, json, false), json.len());
    }
}
