//! Human and `--json` output.

use ferry_runtime::{DriftReport, KeyId, Manifest, fmt_shape};
use serde_json::{Value, json};

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// The targets a bundle's precompiled guests serve (from their
/// compatibility keys), with the wasmtime release when it is not this
/// packager's (a lean device build of another release cannot run them).
pub fn guest_targets(m: &Manifest) -> Vec<String> {
    m.artifacts
        .iter()
        .filter(|a| a.role == ferry_runtime::role::GUEST_PRECOMPILED)
        .filter_map(|a| a.target.as_deref())
        .map(|key| {
            let own = format!(":wasmtime-{}", ferry_runtime::WASMTIME_VERSION);
            match key.strip_suffix(&own) {
                Some(target) => target.to_string(),
                None => key.to_string(),
            }
        })
        .collect()
}

/// One line for people: which devices run the bundle without compiling.
pub fn describe_guest_targets(m: &Manifest) -> String {
    let targets = guest_targets(m);
    let precompiled = if targets.is_empty() {
        "no precompiled guest".to_string()
    } else {
        let named: Vec<String> = targets
            .iter()
            .map(|t| match t.as_str() {
                "pulley32" => "pulley32 (armv7 and other 32-bit devices, interpreted)".into(),
                "pulley64" => "pulley64 (any 64-bit device, interpreted)".into(),
                other => format!("{other} (native)"),
            })
            .collect();
        named.join(", ")
    };
    format!("{precompiled}; builds with a guest compiler: any target")
}

pub fn print_inspect(
    m: &Manifest,
    key_ids: &[KeyId],
    digest: &str,
    release_id: &str,
    size: usize,
    verified: bool,
    json: bool,
) {
    let signers: Vec<String> = key_ids.iter().map(|k| k.to_string()).collect();
    if json {
        let v = json!({
            "digest": digest,
            "release_id": release_id,
            "guest_targets": guest_targets(m),
            "size": size,
            "signatures": signers,
            "signatures_verified": verified,
            "manifest": m,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("manifest serializes")
        );
        return;
    }
    println!(
        "{} {}{}",
        m.name,
        m.version,
        m.description
            .as_deref()
            .map(|d| format!(" - {d}"))
            .unwrap_or_default()
    );
    println!("  digest      sha256:{digest}");
    println!("  release id  sha256:{release_id} (the signed manifest)");
    println!("  size        {}", human_bytes(size as u64));
    println!(
        "  release     fleet {} / channel {} / sequence {}",
        m.release.fleet, m.release.channel, m.release.sequence
    );
    println!(
        "  signed by   {} ({})",
        if signers.is_empty() {
            "nobody".into()
        } else {
            signers.join(", ")
        },
        if verified {
            "verified"
        } else {
            "not verified: pass --pub to check"
        }
    );
    println!(
        "  runtime     >= {} (packed by {})",
        m.min_runtime, m.packager
    );
    println!(
        "  guest       {} (memory {}, timeout {} ms)",
        m.pipeline.guest,
        human_bytes(m.limits.memory_bytes),
        m.limits.timeout_ms
    );
    println!("  runs on     {}", describe_guest_targets(m));
    for i in &m.model.inputs {
        println!(
            "  input       {} {} {}",
            i.name,
            i.dtype,
            fmt_shape(&i.shape)
        );
    }
    for o in &m.model.outputs {
        println!(
            "  output      {} {} {}",
            o.name,
            o.dtype,
            fmt_shape(&o.shape)
        );
    }
    match &m.model.engines {
        None => println!("  engines     not recorded (packed before engines were)"),
        Some(e) => {
            let found: Vec<String> = e
                .engines
                .iter()
                .map(|r| {
                    let verdict = match r.serves {
                        Some(true) => "serves",
                        Some(false) => "cannot serve",
                        None => "not checked",
                    };
                    format!("{} {verdict}", r.name)
                })
                .collect();
            println!(
                "  engines     prefers {}; {}",
                e.preference,
                found.join(", ")
            );
        }
    }
    if let Some(c) = &m.lineage.source_commit {
        println!("  commit      {c}");
    }
    if let Some(d) = &m.lineage.dataset_sha256 {
        println!("  dataset     sha256:{d}");
    }
    println!("  artifacts");
    for a in &m.artifacts {
        println!(
            "    {:<18} {:>10} -> {:>10}  {:<14} {}{}",
            a.role,
            human_bytes(a.size),
            human_bytes(a.compressed_size),
            match a.encoding {
                ferry_runtime::Encoding::Zstd => "zstd",
                ferry_runtime::Encoding::Shuffle4Zstd => "shuffle4+zstd",
            },
            &a.sha256[..16],
            a.target
                .as_deref()
                .map(|t| format!("  [{t}]"))
                .unwrap_or_default()
        );
    }
}

pub fn print_response(v: &Value, json: bool) {
    if json {
        println!("{v}");
        return;
    }
    if let Some(preds) = v.get("predictions").and_then(Value::as_array) {
        for (i, p) in preds.iter().enumerate() {
            if let Some(label) = p.get("label") {
                let label = label
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| label.to_string());
                let score = p.get("score").and_then(Value::as_f64).unwrap_or(f64::NAN);
                print!("{i}: {label} ({score:.4})");
                if let Some(top) = p.get("top_k").and_then(Value::as_array) {
                    let rest: Vec<String> = top
                        .iter()
                        .skip(1)
                        .map(|t| {
                            let l = t.get("label").and_then(Value::as_str).unwrap_or("?");
                            format!(
                                "{l} {:.4}",
                                t.get("score").and_then(Value::as_f64).unwrap_or(f64::NAN)
                            )
                        })
                        .collect();
                    if !rest.is_empty() {
                        print!("   next: {}", rest.join(", "));
                    }
                }
                println!();
            } else if let Some(value) = p.get("value") {
                println!("{i}: {value}");
            }
        }
        return;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON serializes")
    );
}

pub fn print_drift(r: &DriftReport, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).expect("report serializes")
        );
        return;
    }
    let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    println!(
        "{:<20} {:>8} {:>8} {:>10} {:>11} {:>8} {:>8}  {:<15} drifted",
        "feature", "psi", "ks", "ks_p", "wass_normed", "js", "chi2_p", "method"
    );
    for x in &r.features {
        println!(
            "{:<20} {:>8} {:>8} {:>10} {:>11} {:>8} {:>8}  {:<15} {}",
            x.name,
            f(x.psi),
            f(x.ks_statistic),
            f(x.ks_pvalue),
            f(x.wasserstein_normed),
            f(x.jensen_shannon),
            f(x.chi2_pvalue),
            x.method,
            if x.drifted { "YES" } else { "no" }
        );
    }
    println!(
        "{} of {} feature(s) drifted ({:.0}%) over {} row(s): data set {}",
        r.drifted_features,
        r.features.len(),
        r.share * 100.0,
        r.rows,
        if r.dataset_drifted {
            "DRIFTED"
        } else {
            "not drifted"
        }
    );
}
