//! AWS Lambda's Runtime API on 127.0.0.1:0, following AWS's documented
//! protocol: it serves queued events to the real `bootstrap` and records
//! what the function sends back. Used by ferry-lambda's tests and its
//! cold-start benchmark.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long to wait for the function.
pub const WAIT: Duration = Duration::from_secs(60);

/// What the function sent back to the Runtime API.
#[derive(Debug)]
pub enum Outcome {
    Response {
        id: String,
        body: Value,
    },
    Error {
        id: String,
        body: Value,
        error_type: String,
    },
    InitError {
        body: Value,
        error_type: String,
    },
}

/// A Runtime API on 127.0.0.1:0 serving queued events.
pub struct RuntimeApi {
    pub addr: String,
    pub events: Sender<Value>,
    pub outcomes: Receiver<Outcome>,
    pub served: Arc<Mutex<usize>>,
    /// When the function first asked for an invocation (it is ready).
    pub first_next: Arc<Mutex<Option<Instant>>>,
}

fn header(req: &tiny_http::Request, name: &'static str) -> String {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str().to_string())
        .unwrap_or_default()
}

impl RuntimeApi {
    pub fn start() -> RuntimeApi {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let addr = server.server_addr().to_ip().unwrap().to_string();
        let (events, events_rx) = channel::<Value>();
        let (outcomes_tx, outcomes) = channel();
        let served = Arc::new(Mutex::new(0));
        let count = served.clone();
        let first_next = Arc::new(Mutex::new(None));
        let first = first_next.clone();
        std::thread::spawn(move || {
            for mut req in server.incoming_requests() {
                let url = req.url().to_string();
                let mut body = String::new();
                let _ = req.as_reader().read_to_string(&mut body);
                let parsed: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let accepted =
                    tiny_http::Response::from_string("{\"status\":\"OK\"}").with_status_code(202);
                if url == "/2018-06-01/runtime/invocation/next" {
                    first.lock().unwrap().get_or_insert_with(Instant::now);
                    match events_rx.recv_timeout(WAIT) {
                        Ok(event) => {
                            let n = {
                                let mut c = count.lock().unwrap();
                                *c += 1;
                                *c
                            };
                            let deadline = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .unwrap()
                                .as_millis()
                                + 30_000;
                            let h = |k: &str, v: String| {
                                tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap()
                            };
                            let resp = tiny_http::Response::from_string(event.to_string())
                                .with_header(h("Content-Type", "application/json".into()))
                                .with_header(h("Lambda-Runtime-Aws-Request-Id", format!("req-{n}")))
                                .with_header(h("Lambda-Runtime-Deadline-Ms", deadline.to_string()))
                                .with_header(h(
                                    "Lambda-Runtime-Invoked-Function-Arn",
                                    "arn:aws:lambda:us-east-1:123456789012:function:ferry-test"
                                        .into(),
                                ))
                                .with_header(h(
                                    "Lambda-Runtime-Trace-Id",
                                    format!("Root=1-5e1b4151-{n:024x}"),
                                ));
                            let _ = req.respond(resp);
                        }
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                            let _ = req.respond(
                                tiny_http::Response::from_string("no more events")
                                    .with_status_code(500),
                            );
                        }
                    }
                } else if url == "/2018-06-01/runtime/init/error" {
                    let error_type = header(&req, "Lambda-Runtime-Function-Error-Type");
                    let _ = outcomes_tx.send(Outcome::InitError {
                        body: parsed,
                        error_type,
                    });
                    let _ = req.respond(accepted);
                } else if let Some(rest) = url.strip_prefix("/2018-06-01/runtime/invocation/") {
                    let (id, kind) = rest.split_once('/').unwrap_or((rest, ""));
                    let id = id.to_string();
                    let outcome = match kind {
                        "response" => Outcome::Response { id, body: parsed },
                        _ => Outcome::Error {
                            id,
                            body: parsed,
                            error_type: header(&req, "Lambda-Runtime-Function-Error-Type"),
                        },
                    };
                    let _ = outcomes_tx.send(outcome);
                    let _ = req.respond(accepted);
                } else {
                    let _ = req.respond(
                        tiny_http::Response::from_string("not found").with_status_code(404),
                    );
                }
            }
        });
        RuntimeApi {
            addr,
            events,
            outcomes,
            served,
            first_next,
        }
    }

    /// Sends an event and waits for what the function answers.
    pub fn invoke(&self, event: Value) -> Outcome {
        self.events.send(event).unwrap();
        self.outcomes
            .recv_timeout(WAIT)
            .expect("the function answered")
    }
}
