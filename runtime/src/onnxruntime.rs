//! The onnxruntime engine. The only module that names `ort` types.
//!
//! `libonnxruntime` is opened at run time (`ort`'s `load-dynamic`): nothing
//! is downloaded or compiled when Ferry is built, and a machine without the
//! library runs everything on tract. The library is loaded once per process
//! (onnxruntime allows one environment per process); asking for another path
//! afterwards is an error that names both. No `ort` function is called before
//! the library is loaded: `ort` would otherwise look for it on its own.
//!
//! A model keeps a small pool of onnxruntime sessions (`ort`'s `run` takes
//! `&mut self`): a call takes an idle session or makes one, up to
//! [`MAX_ORT_SESSIONS`]; each runs on one intra-op thread, like tract, so
//! concurrency comes from the callers' threads.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_guest_abi::{DType, Tensor};
use ort::session::Session as OrtSession;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

use crate::error::ModelError;
use crate::model::Description;
use ferry_format::TensorSpec;

/// Sessions a model keeps for concurrent calls: each holds its own copy of
/// the optimised weights, so the pool is small; callers beyond it wait.
pub const MAX_ORT_SESSIONS: usize = 4;

/// The environment variable onnxruntime reads when it initialises to decide
/// whether its own telemetry runs. Its PyPI builds for Linux and macOS
/// (1.32 checked) otherwise start Microsoft's 1DS telemetry as the library
/// loads, unless they detect a CI system (`CI`, `GITHUB_ACTIONS`, ...): a
/// persistent device id and an offline event store (SQLite, growing to
/// megabytes) under `~/.cache/Microsoft/DeveloperTools`, uploaded over
/// libcurl when the network allows. `DisableTelemetryEvents`, which the
/// environment below calls, only drops events afterwards; `1` in this
/// variable, set before the library loads, creates none of it.
pub const ONNXRUNTIME_TELEMETRY_VARIABLE: &str = "ORT_DISABLE_TELEMETRY";

/// The name a later onnxruntime change reads for the same opt-out; set too,
/// so a library of another version is covered (1.32 ignores it).
const ONNXRUNTIME_TELEMETRY_VARIABLE_ALT: &str = "ORT_TELEMETRY_DISABLED";

/// Keeps onnxruntime's own telemetry off in this process: sets
/// [`ONNXRUNTIME_TELEMETRY_VARIABLE`] (and the name other versions read) to
/// `1`, unless the environment already sets either to something other than
/// blanks (an operator's explicit choice, `0` included, stands). Ferry's
/// binaries call it first thing; a program embedding `ferry-runtime` with
/// the onnxruntime engine should too, or set the variable itself.
///
/// # Safety
///
/// It sets environment variables, which is only sound while no other
/// thread may read the environment: call it at the top of `main`, before the
/// process starts any thread (an async runtime included).
pub unsafe fn keep_onnxruntime_telemetry_off() {
    let names = [
        ONNXRUNTIME_TELEMETRY_VARIABLE,
        ONNXRUNTIME_TELEMETRY_VARIABLE_ALT,
    ];
    let chosen = names
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.to_string_lossy().trim().is_empty()));
    if !chosen {
        for name in names {
            // SAFETY: the caller guarantees no other thread exists yet.
            unsafe { std::env::set_var(name, "1") };
        }
    }
}

/// The loaded library: where from, and the process's environment.
struct Library {
    path: PathBuf,
    build_info: String,
    env: ort::environment::Environment,
}

static LIBRARY: Mutex<Option<Arc<Library>>> = Mutex::new(None);

/// Loads `libonnxruntime` from `path` (once per process) and returns its
/// build information.
pub(crate) fn load_library(path: &Path) -> Result<String, ModelError> {
    Ok(library(path)?.build_info.clone())
}

fn library(path: &Path) -> Result<Arc<Library>, ModelError> {
    let mut slot = LIBRARY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(lib) = slot.as_ref() {
        let same = lib.path == path
            || (lib.path.canonicalize().ok()).is_some_and(|a| path.canonicalize().ok() == Some(a));
        if same {
            return Ok(lib.clone());
        }
        return Err(ModelError::EngineUnavailable(format!(
            "this process already loaded onnxruntime from {}; it cannot load {} too",
            lib.path.display(),
            path.display()
        )));
    }
    if !path.is_file() {
        return Err(ModelError::EngineUnavailable(format!(
            "no library at {}",
            path.display()
        )));
    }
    let env = ort::init_from(path)
        .map_err(|e| ModelError::EngineUnavailable(e.to_string()))?
        .with_name("ferry")
        .with_telemetry(false)
        .build()
        .map_err(|e| ModelError::EngineUnavailable(format!("{}: {e}", path.display())))?;
    let lib = Arc::new(Library {
        path: path.to_path_buf(),
        build_info: ort::info().to_string(),
        env,
    });
    *slot = Some(lib.clone());
    Ok(lib)
}

struct Pool {
    idle: Vec<OrtSession>,
    /// Sessions made so far (idle or in use).
    made: usize,
}

/// A model loaded into onnxruntime.
pub struct OrtModel {
    lib: Arc<Library>,
    onnx: Arc<[u8]>,
    pool: Mutex<Pool>,
    freed: std::sync::Condvar,
    description: Description,
}

impl std::fmt::Debug for OrtModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtModel")
            .field("library", &self.lib.path)
            .field("inputs", &self.description.inputs)
            .finish()
    }
}

impl OrtModel {
    /// Loads a model into onnxruntime, from the library at `library_path`;
    /// `describe` reads what the ONNX file declares.
    pub(crate) fn load(
        library_path: &Path,
        onnx: &[u8],
        describe: impl FnOnce() -> Result<Description, ModelError> + Send,
    ) -> Result<OrtModel, ModelError> {
        // `describe` (what the ONNX file declares) runs beside onnxruntime's
        // load; its error wins (it explains an opset onnxruntime refuses).
        let (description, loaded) = std::thread::scope(|s| {
            let description = s.spawn(describe);
            let loaded = library(library_path)
                .and_then(|lib| new_session(&lib, onnx).map(|session| (lib, session)));
            let description = description
                .join()
                .unwrap_or_else(|_| Err(ModelError::Load("reading the model panicked".into())));
            (description, loaded)
        });
        let description = description?;
        let (lib, session) = loaded?;
        for spec in &description.outputs {
            if !session.outputs().iter().any(|o| o.name() == spec.name) {
                return Err(ModelError::Load(format!(
                    "onnxruntime does not list the model output `{}`",
                    spec.name
                )));
            }
        }
        Ok(OrtModel {
            lib,
            onnx: onnx.into(),
            pool: Mutex::new(Pool {
                idle: vec![session],
                made: 1,
            }),
            freed: std::sync::Condvar::new(),
            description,
        })
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.description.inputs
    }

    pub fn outputs(&self) -> &[TensorSpec] {
        &self.description.outputs
    }

    pub fn dropped_outputs(&self) -> &[String] {
        &self.description.dropped_outputs
    }

    /// The library this model runs on.
    pub fn library_path(&self) -> &Path {
        &self.lib.path
    }

    /// Runs the model. `tensors` must hold every input, by name.
    pub fn run(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        let mut inputs: Vec<(String, DynValue)> = Vec::with_capacity(self.inputs().len());
        for spec in self.inputs() {
            let t = tensors
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| {
                    ModelError::BadInput(format!("model input `{}` is missing", spec.name))
                })?;
            crate::model::check_input(t, spec)?;
            inputs.push((spec.name.clone(), to_ort(t)?));
        }
        let mut session = self.take()?;
        let result = run_session(&mut session, inputs, &self.description.outputs);
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .idle
            .push(session);
        self.freed.notify_one();
        result
    }

    /// An idle session, a new one while fewer than [`MAX_ORT_SESSIONS`]
    /// exist, or the next one freed.
    fn take(&self) -> Result<OrtSession, ModelError> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(s) = pool.idle.pop() {
                return Ok(s);
            }
            if pool.made < MAX_ORT_SESSIONS {
                pool.made += 1;
                drop(pool);
                return new_session(&self.lib, &self.onnx).inspect_err(|_| {
                    self.pool.lock().unwrap_or_else(|e| e.into_inner()).made -= 1;
                });
            }
            pool = self.freed.wait(pool).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn new_session(lib: &Library, onnx: &[u8]) -> Result<OrtSession, ModelError> {
    let load = |e: ort::Error| ModelError::Load(format!("onnxruntime: {e}"));
    OrtSession::builder(&lib.env)
        .map_err(load)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| load(e.into()))?
        .with_intra_threads(1)
        .map_err(|e| load(e.into()))?
        .with_inter_threads(1)
        .map_err(|e| load(e.into()))?
        .commit_from_memory(onnx)
        .map_err(load)
}

fn run_session(
    session: &mut OrtSession,
    inputs: Vec<(String, DynValue)>,
    outputs: &[TensorSpec],
) -> Result<Vec<Tensor>, ModelError> {
    let results = session
        .run(inputs)
        .map_err(|e| ModelError::Run(format!("onnxruntime: {e}")))?;
    outputs
        .iter()
        .map(|spec| {
            let value = results.get(&spec.name).ok_or_else(|| {
                ModelError::Run(format!("onnxruntime returned no output `{}`", spec.name))
            })?;
            from_ort(value, spec)
        })
        .collect()
}

fn element_type(dtype: DType) -> TensorElementType {
    match dtype {
        DType::F32 => TensorElementType::Float32,
        DType::F64 => TensorElementType::Float64,
        DType::I64 => TensorElementType::Int64,
        DType::I32 => TensorElementType::Int32,
        DType::U8 => TensorElementType::Uint8,
        DType::Bool => TensorElementType::Bool,
    }
}

/// Little-endian bytes (the guest ABI's) into typed values: the copy also
/// aligns them.
macro_rules! typed {
    ($t:ty, $data:expr) => {
        $data
            .chunks_exact(size_of::<$t>())
            .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk of the element size")))
            .collect::<Vec<$t>>()
    };
}

fn to_ort(t: &Tensor) -> Result<DynValue, ModelError> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let bad = |e: ort::Error| ModelError::BadInput(format!("input `{}`: {e}", t.name));
    let value: DynValue = match t.dtype {
        DType::F32 => OrtTensor::from_array((shape, typed!(f32, t.data)))
            .map_err(bad)?
            .into_dyn(),
        DType::F64 => OrtTensor::from_array((shape, typed!(f64, t.data)))
            .map_err(bad)?
            .into_dyn(),
        DType::I64 => OrtTensor::from_array((shape, typed!(i64, t.data)))
            .map_err(bad)?
            .into_dyn(),
        DType::I32 => OrtTensor::from_array((shape, typed!(i32, t.data)))
            .map_err(bad)?
            .into_dyn(),
        DType::U8 => OrtTensor::from_array((shape, t.data.clone()))
            .map_err(bad)?
            .into_dyn(),
        DType::Bool => {
            OrtTensor::from_array((shape, t.data.iter().map(|&b| b != 0).collect::<Vec<bool>>()))
                .map_err(bad)?
                .into_dyn()
        }
    };
    Ok(value)
}

fn from_ort(value: &DynValue, spec: &TensorSpec) -> Result<Tensor, ModelError> {
    let dtype = DType::from_name(&spec.dtype).unwrap_or(DType::F32);
    let run = |e: ort::Error| ModelError::Run(format!("output `{}`: {e}", spec.name));
    let got = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(ModelError::Run(format!(
                "output `{}` is {other}, not a tensor",
                spec.name
            )));
        }
    };
    if got != element_type(dtype) {
        return Err(ModelError::Run(format!(
            "output `{}` is declared {} and onnxruntime returned {got}",
            spec.name, spec.dtype
        )));
    }
    macro_rules! bytes {
        ($t:ty) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(run)?;
            (
                shape.iter().map(|&d| d as u64).collect::<Vec<u64>>(),
                data.iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
        }};
    }
    let (shape, data) = match dtype {
        DType::F32 => bytes!(f32),
        DType::F64 => bytes!(f64),
        DType::I64 => bytes!(i64),
        DType::I32 => bytes!(i32),
        DType::U8 => bytes!(u8),
        DType::Bool => {
            let (shape, data) = value.try_extract_tensor::<bool>().map_err(run)?;
            (
                shape.iter().map(|&d| d as u64).collect(),
                data.iter().map(|&b| b as u8).collect(),
            )
        }
    };
    Ok(Tensor {
        name: spec.name.clone(),
        dtype,
        shape,
        data,
    })
}
