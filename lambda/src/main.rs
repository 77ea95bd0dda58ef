//! `bootstrap`: a Ferry bundle as an AWS Lambda function (custom runtime
//! `provided.al2023`).
//!
//! # Layout
//! - `init`: find the bundle and the trusted keys, verify, build the
//!   `Session` once, outside the handler; report failures through the
//!   Runtime API's init error endpoint (never a panic).
//! - `events`: direct invocations, API Gateway HTTP API (payload 2.0) and
//!   function URL events, API Gateway REST (1.0) events → request → response.
//! - `telemetry`: JSON log lines and CloudWatch Embedded Metric Format lines.

mod events;
mod init;
mod telemetry;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

/// Environment variables `lambda_runtime` needs (it panics without them).
const RUNTIME_ENV: [&str; 4] = [
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_RUNTIME_API",
];

fn main() -> std::process::ExitCode {
    // SAFETY: first thing in main, before any thread (the tokio runtime's included) starts.
    unsafe { ferry_runtime::keep_onnxruntime_telemetry_off() };
    let missing: Vec<&str> = RUNTIME_ENV
        .iter()
        .copied()
        .filter(|v| std::env::var_os(v).is_none())
        .collect();
    if !missing.is_empty() {
        telemetry::log(
            "ERROR",
            "Not running under the Lambda Runtime API",
            serde_json::json!({ "missing_environment": missing }),
        );
        return std::process::ExitCode::from(2);
    }
    ferry_runtime::quiet_caught_panics(|panic| {
        telemetry::log(
            "WARN",
            "The engine panicked: that invocation failed, the model keeps serving",
            serde_json::json!({ "panic": panic }),
        );
    });
    let started = std::time::Instant::now();
    let session = match init::load() {
        Ok(s) => Arc::new(s),
        Err(e) => {
            telemetry::log(
                "ERROR",
                "Init failed",
                serde_json::json!({ "error": e.to_string(), "code": e.code() }),
            );
            if let Err(report) = init::report_init_error(&e) {
                telemetry::log(
                    "ERROR",
                    "Cannot report the init error",
                    serde_json::json!({ "error": report }),
                );
            }
            return std::process::ExitCode::from(1);
        }
    };
    let m = session.manifest();
    telemetry::log(
        "INFO",
        "Initialized",
        serde_json::json!({
            "model": m.name, "version": m.version, "sequence": m.release.sequence, "digest": session.digest(),
            "init_ms": started.elapsed().as_secs_f64() * 1e3, "precompiled_guest": session.used_precompiled_guest(),
            "engine": session.engine().name(),
            "engine_race": session.engine_race().iter().map(|(e, d)| serde_json::json!({
                "engine": e.name(), "median_us": d.map(|d| d.as_secs_f64() * 1e6),
            })).collect::<Vec<_>>(),
        }),
    );
    let cold = Arc::new(AtomicBool::new(true));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(lambda_runtime::run(service_fn(
        move |event: LambdaEvent<Value>| {
            let session = session.clone();
            let cold_start = cold.swap(false, Ordering::Relaxed);
            async move { events::handle(&session, event.payload, cold_start) }
        },
    )));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            telemetry::log(
                "ERROR",
                "Runtime loop ended",
                serde_json::json!({ "error": e.to_string() }),
            );
            std::process::ExitCode::from(1)
        }
    }
}
