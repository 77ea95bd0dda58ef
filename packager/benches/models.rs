//! Ferry against onnxruntime, model by model: the plans tract runs
//! (symbolic batch vs specialised for batch 1), the whole pipeline (JSON
//! tensor request and `.npy` request), and
//! onnxruntime called from Python, one thread, in the same run. Prints
//! Markdown for docs/PERFORMANCE.md.
//!
//! ```sh
//! python3 scripts/perf_models.py /tmp/ferry-bench-models   # mobilenet_v3_small (optional)
//! cargo bench --workspace --bench models
//! ```
//!
//! Models: `runtime/tests/fixtures/mlp.onnx` (4 features), the digits CNN of
//! `examples/digits` (1x8x8), and `mobilenet_v3_small.onnx` from
//! `$FERRY_BENCH_MODELS` (default `/tmp/ferry-bench-models`), skipped with a
//! message when absent. onnxruntime's column runs `scripts/ort_bench.py` with
//! `$FERRY_BENCH_PYTHON` (default `python3`), its rounds interleaved with
//! Ferry's (one Python process per model), and is skipped with a message
//! when onnxruntime is not installed there. The engines table (tract against
//! onnxruntime through Ferry) needs `FERRY_ONNXRUNTIME` (the library) and is
//! skipped with a message without it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_runtime::{
    self as rt, Engine, EngineModel, EngineOptions, Model, PlanChoice, ResponseForm, Session,
    Tensor, TrustPolicy,
};
use ferry_testkit::bench::{ferry_ok as ferry, median, us};
use ferry_testkit::fixtures::examples;

struct Case {
    name: &'static str,
    path: PathBuf,
    input: &'static str,
    shape: Vec<u64>,
}

/// Mean time of one call over `per_round` calls.
fn round(per_round: u32, f: &mut dyn FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..per_round {
        f();
    }
    t.elapsed() / per_round
}

/// onnxruntime called from Python (`scripts/ort_bench.py`), one process per
/// model serving rounds on request, so its rounds interleave with Ferry's:
/// machine noise and cache pollution hit both sides alike.
struct PythonOrt {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    version: String,
}

impl PythonOrt {
    /// The loaded, warm session, or why there is none.
    fn start(c: &Case) -> Result<PythonOrt, String> {
        use std::io::BufRead;
        let python = std::env::var("FERRY_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ort_bench.py");
        let dims: Vec<String> = c.shape.iter().map(|d| d.to_string()).collect();
        let mut child = Command::new(&python)
            .arg(script)
            .arg(&c.path)
            .arg(c.input)
            .arg(dims.join(","))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("{python}: {e}"))?;
        let stdin = child.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).map_err(|e| e.to_string())?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&first) else {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            let _ = child.wait();
            return Err(err.trim().to_string());
        };
        Ok(PythonOrt {
            child,
            stdin,
            stdout,
            version: v["version"].as_str().unwrap_or("?").to_string(),
        })
    }

    /// Mean time of one call over `per_round` calls.
    fn round(&mut self, per_round: u32) -> Duration {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{per_round}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        Duration::from_secs_f64(line.trim().parse::<f64>().expect("a round's time") / 1e6)
    }
}

impl Drop for PythonOrt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    // SAFETY: first thing in main, before any thread starts. The Python side inherits it:
    // neither onnxruntime runs its telemetry during the measurement.
    unsafe { rt::keep_onnxruntime_telemetry_off() };
    let quick = std::env::args().any(|a| a == "--test" || a == "--quick");
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    ferry(&["keygen", "-o", &d("k")]);
    let trust = TrustPolicy::new(
        rt::PublicKey::all_from_pem(&std::fs::read_to_string(d("k.pub")).unwrap()).unwrap(),
    )
    .unwrap();
    let models = PathBuf::from(
        std::env::var("FERRY_BENCH_MODELS").unwrap_or_else(|_| "/tmp/ferry-bench-models".into()),
    );
    let mut cases = vec![
        Case {
            name: "MLP, 4 features",
            path: Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/tests/fixtures/mlp.onnx"),
            input: "input",
            shape: vec![1, 4],
        },
        Case {
            name: "small CNN, 1x8x8 (digits)",
            path: examples().join("digits/model.onnx"),
            input: "input",
            shape: vec![1, 1, 8, 8],
        },
    ];
    let mobilenet = models.join("mobilenet_v3_small.onnx");
    if mobilenet.exists() {
        cases.push(Case {
            name: "mobilenet_v3_small, 3x224x224",
            path: mobilenet,
            input: "input",
            shape: vec![1, 3, 224, 224],
        });
    } else {
        eprintln!(
            "skipping mobilenet_v3_small: {} is absent (make it with `python3 scripts/perf_models.py {}`)",
            mobilenet.display(),
            models.display()
        );
    }

    let library = std::env::var_os("FERRY_ONNXRUNTIME").filter(|v| !v.is_empty());
    if library.is_none() {
        eprintln!("engines table skipped: FERRY_ONNXRUNTIME is not set");
    }
    let mut engine_rows = Vec::new();
    let tract_only = EngineOptions::only(Engine::Tract);
    println!("## Ferry vs onnxruntime, one thread, batch 1 (same run)\n");
    println!(
        "| model | onnxruntime (Python) µs | tract, symbolic plan µs | tract, batch-1 plan µs | Ferry pipeline, JSON tensor µs | Ferry pipeline, .npy µs | plan speed-up | pipeline (.npy) / onnxruntime | pipeline (.npy) − tract µs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (i, c) in cases.iter().enumerate() {
        let heavy = c.shape.iter().product::<u64>() > 10_000;
        let (rounds, per_round) = match (quick, heavy) {
            (true, _) => (3, 2),
            (false, false) => (200, 50),
            (false, true) => (30, 5),
        };
        let bundle = d(&format!("m{i}.ferry"));
        let path = c.path.to_string_lossy().into_owned();
        ferry(&[
            "pack",
            "--model",
            &path,
            "--key",
            &d("k.key"),
            "-o",
            &bundle,
            "--precompile",
            std::env::consts::ARCH,
        ]);
        let session =
            Session::load_with(&std::fs::read(&bundle).unwrap(), &trust, &tract_only).unwrap();
        let model = Model::load(&std::fs::read(&c.path).unwrap()).unwrap();
        let n = c.shape.iter().product::<u64>() as usize;
        let data: Vec<f32> = (0..n).map(|i| (i % 255) as f32 / 255.0).collect();
        let tensors = [Tensor::from_f32(c.input, c.shape.clone(), &data)];
        let request = serde_json::to_vec(&serde_json::json!({
            "inputs": { c.input: { "shape": c.shape, "data": data } }
        }))
        .unwrap();
        let npy = ferry_testkit::tensors::npy_f32(&c.shape, &data);
        // Both plans made before timing.
        model.run_with(&tensors, PlanChoice::Symbolic).unwrap();
        model.run(&tensors).unwrap();
        session.infer("application/json", &request).unwrap();
        assert_eq!(
            session.infer("application/x-npy", &npy).unwrap(),
            session.infer("application/json", &request).unwrap()
        );
        let mut python = PythonOrt::start(c);
        if let Err(why) = &python {
            eprintln!("onnxruntime column skipped for {}: {why}", c.name);
        }
        let (mut symbolic, mut batch1, mut pipeline, mut binary, mut py) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            if let Ok(p) = &mut python {
                py.push(p.round(per_round));
            }
            symbolic.push(round(per_round, &mut || {
                std::hint::black_box(model.run_with(&tensors, PlanChoice::Symbolic).unwrap());
            }));
            batch1.push(round(per_round, &mut || {
                std::hint::black_box(model.run(&tensors).unwrap());
            }));
            pipeline.push(round(per_round, &mut || {
                std::hint::black_box(session.infer("application/json", &request).unwrap());
            }));
            binary.push(round(per_round, &mut || {
                std::hint::black_box(session.infer("application/x-npy", &npy).unwrap());
            }));
        }
        let (s, b, p, bin) = (
            us(median(symbolic)),
            us(median(batch1)),
            us(median(pipeline)),
            us(median(binary)),
        );
        let (ort, ratio) = match &python {
            Ok(p) => {
                let t = us(median(py));
                (format!("{t:.1} ({})", p.version), format!("{:.2}", bin / t))
            }
            Err(_) => ("(skipped)".into(), "".into()),
        };
        if let Some(lib) = &library {
            let ort = EngineOptions {
                choice: rt::EngineChoice::Only(Engine::OnnxRuntime),
                onnxruntime: Some(PathBuf::from(lib)),
            };
            let onnx = std::fs::read(&c.path).unwrap();
            let ort_model = EngineModel::load(&onnx, Engine::OnnxRuntime, &ort).unwrap();
            let ort_session =
                Session::load_with(&std::fs::read(&bundle).unwrap(), &trust, &ort).unwrap();
            ort_model.run(&tensors).unwrap();
            ort_session.infer("application/x-npy", &npy).unwrap();
            // The outputs as a `.npy` response (postprocessing skipped).
            let npy_out = ResponseForm::Npy;
            session
                .infer_as("application/x-npy", &npy, npy_out)
                .unwrap();
            ort_session
                .infer_as("application/x-npy", &npy, npy_out)
                .unwrap();
            let (mut tm, mut om, mut tp, mut op) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut tb, mut ob, mut py) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                if let Ok(p) = &mut python {
                    py.push(p.round(per_round));
                }
                tm.push(round(per_round, &mut || {
                    std::hint::black_box(model.run(&tensors).unwrap());
                }));
                om.push(round(per_round, &mut || {
                    std::hint::black_box(ort_model.run(&tensors).unwrap());
                }));
                tp.push(round(per_round, &mut || {
                    std::hint::black_box(session.infer("application/x-npy", &npy).unwrap());
                }));
                op.push(round(per_round, &mut || {
                    std::hint::black_box(ort_session.infer("application/x-npy", &npy).unwrap());
                }));
                tb.push(round(per_round, &mut || {
                    std::hint::black_box(
                        session
                            .infer_as("application/x-npy", &npy, npy_out)
                            .unwrap(),
                    );
                }));
                ob.push(round(per_round, &mut || {
                    std::hint::black_box(
                        ort_session
                            .infer_as("application/x-npy", &npy, npy_out)
                            .unwrap(),
                    );
                }));
            }
            let (tm, om, tp, op, tb, ob) = (
                us(median(tm)),
                us(median(om)),
                us(median(tp)),
                us(median(op)),
                us(median(tb)),
                us(median(ob)),
            );
            let (py, py_ratio, best_json, best_npy) = match &python {
                Ok(_) => {
                    let t = us(median(py));
                    (
                        format!("{t:.1}"),
                        format!("{:.2}", om / t),
                        format!("{:.2}", tp.min(op) / t),
                        format!("{:.2}", tb.min(ob) / t),
                    )
                }
                Err(_) => ("(skipped)".into(), "".into(), "".into(), "".into()),
            };
            engine_rows.push(format!(
                "| {} | {py} | {tm:.1} | {om:.1} | {tp:.1} | {op:.1} | {tb:.1} | {ob:.1} | {:.2} | {py_ratio} | {best_json} | {best_npy} | {} |",
                c.name,
                tm / om,
                if tm <= om { "tract" } else { "onnxruntime" }
            ));
        }
        println!(
            "| {} | {ort} | {s:.1} | {b:.1} | {p:.1} | {bin:.1} | {:.2}x | {ratio} | {:.1} |",
            c.name,
            s / b,
            bin - b
        );
    }

    if !engine_rows.is_empty() {
        println!(
            "\n## Engines: tract vs onnxruntime through Ferry, one thread, batch 1 (same run)\n"
        );
        println!(
            "| model | onnxruntime (Python) µs | tract (batch-1 plan) µs | onnxruntime via Ferry µs | pipeline .npy → JSON on tract µs | pipeline .npy → JSON on onnxruntime µs | pipeline .npy → .npy on tract µs | pipeline .npy → .npy on onnxruntime µs | tract / onnxruntime | onnxruntime via Ferry / Python | best .npy → JSON / Python | best .npy → .npy / Python | faster |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for row in &engine_rows {
            println!("{row}");
        }
    }

    // The image path on mobilenet: JPEG/PNG decoded, resized to 224x224 and
    // normalised in the guest, then the model, then a classification response.
    let mobilenet = models.join("mobilenet_v3_small.onnx");
    if !mobilenet.exists() {
        return;
    }
    let project = dir.path().join("mobilenet-image");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::copy(&mobilenet, project.join("model.onnx")).unwrap();
    std::fs::write(
        project.join("ferry.toml"),
        r#"[model]
name = "mobilenet-image"
version = "1.0.0"
path = "model.onnx"

[preprocess]
kind = "image"
width = 224
height = 224
color = "rgb"
layout = "nchw"
resize = "triangle"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[postprocess]
kind = "classification"
activation = "softmax"
top_k = 5
include_outputs = false
"#,
    )
    .unwrap();
    let bundle = d("mobilenet-image.ferry");
    ferry(&[
        "pack",
        project.to_str().unwrap(),
        "--key",
        &d("k.key"),
        "-o",
        &bundle,
        "--precompile",
        std::env::consts::ARCH,
    ]);
    let session =
        Session::load_with(&std::fs::read(&bundle).unwrap(), &trust, &tract_only).unwrap();
    let photo = |w: u32, h: u32| {
        image::RgbImage::from_fn(w, h, |x, y| {
            let n = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) >> 7;
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, (n & 0xff) as u8])
        })
    };
    let encode = |img: &image::RgbImage, format: image::ImageFormat| {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    let requests = [
        (
            "JPEG 224x224",
            "image/jpeg",
            encode(&photo(224, 224), image::ImageFormat::Jpeg),
        ),
        (
            "JPEG 640x480 (resized)",
            "image/jpeg",
            encode(&photo(640, 480), image::ImageFormat::Jpeg),
        ),
        (
            "PNG 224x224",
            "image/png",
            encode(&photo(224, 224), image::ImageFormat::Png),
        ),
    ];
    println!(
        "\n## The image path on mobilenet_v3_small (224x224 RGB, ImageNet normalisation, top-5 classification; same run)\n"
    );
    println!(
        "| request | body bytes | preprocess µs | tract µs | whole pipeline µs | pipeline − tract µs |"
    );
    println!("|---|---|---|---|---|---|");
    let (rounds, per_round) = if quick { (2, 1) } else { (30, 5) };
    for (label, ct, body) in &requests {
        let tensors = session.preprocess(ct, body).unwrap().tensors;
        session.infer(ct, body).unwrap();
        let (mut pre, mut model, mut whole) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            pre.push(round(per_round, &mut || {
                std::hint::black_box(session.preprocess(ct, body).unwrap());
            }));
            model.push(round(per_round, &mut || {
                std::hint::black_box(session.run_model(&tensors).unwrap());
            }));
            whole.push(round(per_round, &mut || {
                std::hint::black_box(session.infer(ct, body).unwrap());
            }));
        }
        let (p, m, w) = (us(median(pre)), us(median(model)), us(median(whole)));
        println!(
            "| {label} | {} | {p:.0} | {m:.0} | {w:.0} | {:.0} |",
            body.len(),
            w - m
        );
    }
}
