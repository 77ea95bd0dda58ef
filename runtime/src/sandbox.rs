//! The WASM sandbox. The only module that names wasmtime types.
//!
//! One [`GuestRuntime`] per loaded bundle owns a wasmtime `Engine` configured
//! once here (epoch interruption for deadlines, a resource limiter for
//! memory), the compiled module and a pre-linked `InstancePre`. Calls borrow
//! a configured instance from a small pool; an instance that trapped, timed
//! out or ran out of memory is dropped, never reused, so one bad request
//! cannot poison the next.
//!
//! What the guest gets from WASI preview 1: nothing it could use to escape
//! or to wait. Only the functions in [`WASI_LINKED`] are real, implemented
//! in the `wasi` module below over the guest's memory alone: no preopened
//! directories (every path operation fails), no environment variables, no
//! arguments, an empty stdin, stdout/stderr discarded; clocks and random
//! numbers are available (Rust's std needs them). Every other WASI function
//! a guest imports (`poll_oneoff`, sockets, paths...) is linked to a stub
//! that answers `ENOSYS` at once, so a guest still loads but nothing it
//! calls can block: the epoch deadline interrupts WebAssembly code only,
//! never a host call in progress.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use wasmtime::{
    Config, Engine, ExternType, InstancePre, Linker, Memory, Module, ResourceLimiter, Store, Trap,
    TypedFunc, Val, ValType, WasmFeatures,
};
#[cfg(feature = "compiler")]
use wasmtime::{OptLevel, Strategy};

use crate::error::GuestError;
use ferry_format::PrecompiledGuest;
use ferry_guest_abi::{ABI_VERSION, STATUS_BAD_INPUT, STATUS_OK};

/// Period of the epoch ticker. Deadlines are enforced to this resolution;
/// 10 ms keeps an idle device's wake-ups rare while stopping a runaway guest
/// well within any sensible timeout.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Most idle instances kept per guest. Each holds the guest's memory (a few
/// MiB for the standard guest), so the pool is small; concurrent calls past it
/// instantiate fresh instances (tens of microseconds).
pub const MAX_POOLED_INSTANCES: usize = 8;
/// Cap on wasm tables (function pointers); generous for any real guest.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The WASI preview-1 module name.
const WASI_MODULE: &str = "wasi_snapshot_preview1";
/// The WASI functions a guest gets for real: what Rust's std and wasi-libc
/// need to start, print (discarded), read the clocks and random numbers,
/// and exit. None of them can block: stdin is empty, stdout and stderr are
/// sinks, no descriptor beyond them exists.
pub const WASI_LINKED: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_close",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_filestat_get",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_read",
    "fd_seek",
    "fd_tell",
    "fd_write",
    "proc_exit",
    "random_get",
    "sched_yield",
];
/// WASI's "function not supported" errno, answered by every other function.
const ERRNO_NOSYS: i32 = 52;

/// Which compiler turns a guest's WebAssembly into machine code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCompiler {
    /// Cranelift, optimising: what `ferry pack --precompile` uses. Slow to
    /// compile (the standard guest: ~0.35 s on 2 cores), fast code.
    Cranelift,
    /// Winch, wasmtime's single-pass baseline compiler: compiles the standard
    /// guest ~6x faster, its code runs slower (docs/PERFORMANCE.md).
    Winch,
}

/// The compiler of a guest compiled where it runs (a portable bundle, or a
/// precompiled artifact that does not fit this host): Winch, because the
/// compilation is on the cold start's critical path and the standard guest's
/// work per request is small next to the model's (the measurements and the
/// decision: docs/PERFORMANCE.md, "Cold starts of portable bundles"). A host
/// where Winch cannot compile the guest falls back to Cranelift.
pub const ON_DEVICE_COMPILER: GuestCompiler = GuestCompiler::Winch;

/// Whether this build compiles guests where they run (the `compiler`
/// feature). The lean device build does not: it runs only guests
/// precompiled for one of its [`runnable_targets`].
pub const CAN_COMPILE: bool = cfg!(feature = "compiler");

/// Whether wasmtime runs native code on this architecture (it has a Cranelift
/// backend for it); elsewhere (armv7) guests run on Pulley.
const NATIVE_CODE: bool = cfg!(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "s390x"
));

/// The Pulley (wasmtime's portable bytecode interpreter) target that runs on
/// this host: same pointer width and byte order.
pub const PULLEY_TARGET: &str = match (
    cfg!(target_pointer_width = "64"),
    cfg!(target_endian = "big"),
) {
    (true, false) => "pulley64",
    (true, true) => "pulley64be",
    (false, false) => "pulley32",
    (false, true) => "pulley32be",
};

/// The targets whose precompiled guests this runtime loads, best first: the
/// host's native code where wasmtime has it, then Pulley bytecode (slower:
/// an interpreter).
pub fn runnable_targets() -> Vec<&'static str> {
    let mut targets = Vec::with_capacity(2);
    if NATIVE_CODE {
        targets.push(HOST_TARGET);
    }
    targets.push(PULLEY_TARGET);
    targets
}

/// Checks, without compiling or running anything, that this build can run
/// the guest of a verified bundle: one of its precompiled guests fits a
/// [`runnable_targets`] entry, or this build compiles guests. What the agent
/// asks before it activates an update. Judged from the signed manifest (the
/// guests precompiled for other targets may not have been decompressed: see
/// `verify_for_host`); a bundle without trusted signatures offers no
/// precompiled guest.
pub fn check_runnable_bundle(bundle: &ferry_format::VerifiedBundle) -> Result<(), GuestError> {
    if CAN_COMPILE {
        return Ok(());
    }
    let signed = !bundle.signed_by().is_empty();
    check_precompiled_fits(
        bundle
            .manifest()
            .artifacts
            .iter()
            .filter(|a| signed && a.role == ferry_format::role::GUEST_PRECOMPILED)
            .filter_map(|a| a.target.as_deref()),
    )
}

/// [`check_runnable_bundle`] for a build without a compiler, over the targets
/// (compatibility keys) a bundle offers.
fn check_precompiled_fits<'a>(
    offered: impl Iterator<Item = &'a str> + Clone,
) -> Result<(), GuestError> {
    let runnable = runnable_targets();
    let fits = offered
        .clone()
        .any(|k| runnable.iter().any(|t| compatibility_key(Some(t)) == k));
    if fits {
        Ok(())
    } else {
        Err(no_runnable_guest(offered))
    }
}

/// The refusal of a bundle none of whose precompiled guests runs here.
fn no_runnable_guest<'a>(offered: impl Iterator<Item = &'a str>) -> GuestError {
    GuestError::NoRunnableGuest {
        offered: offered.map(str::to_owned).collect(),
        runnable: runnable_targets()
            .into_iter()
            .map(|t| compatibility_key(Some(t)))
            .collect(),
    }
}

/// The wasmtime configuration every guest runs under. The packager uses the
/// same one (with Cranelift) to precompile, so precompiled artifacts are
/// compatible. Epoch interruption works under Winch too: the sandbox tests
/// run their deadline and memory cases on both compilers.
fn engine_config(compiler: GuestCompiler) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    // A precompiled guest records the engine's WebAssembly features, and
    // wasmtime refuses one that declares a feature the loading engine lacks.
    // The component model was on by default while wasmtime-wasi pulled in
    // wasmtime's `component-model` (before the WASI functions moved to
    // the `wasi` module below): declaring it still keeps guests precompiled by an
    // older `ferry` loading here, and ours loading on older agents. It only
    // lets the validator accept components, which this runtime never loads.
    config.wasm_features(WasmFeatures::COMPONENT_MODEL, true);
    #[cfg(feature = "compiler")]
    match compiler {
        GuestCompiler::Cranelift => {
            config.strategy(Strategy::Cranelift);
            config.cranelift_opt_level(OptLevel::Speed);
        }
        GuestCompiler::Winch => {
            config.strategy(Strategy::Winch);
        }
    }
    #[cfg(not(feature = "compiler"))]
    let _ = compiler;
    config
}

/// Creates a Cranelift engine, for `target` (a target triple) or the host.
fn engine_for(target: Option<&str>) -> Result<Engine, GuestError> {
    engine_with(target, GuestCompiler::Cranelift)
}

/// Creates an engine with a compiler, for `target` or the host.
fn engine_with(target: Option<&str>, compiler: GuestCompiler) -> Result<Engine, GuestError> {
    let mut config = engine_config(compiler);
    if let Some(t) = target {
        config
            .target(t)
            .map_err(|e| GuestError::Compile(format!("unknown target `{t}`: {e}")))?;
    }
    Engine::new(&config).map_err(|e| GuestError::Compile(e.to_string()))
}

/// The wasmtime release this runtime embeds (pinned with `=` in Cargo.toml):
/// precompiled guests are only valid for the same release.
pub const WASMTIME_VERSION: &str = "48.0.8";
/// The target triple this runtime was compiled for.
pub const HOST_TARGET: &str = env!("FERRY_TARGET");

/// The key under which a precompiled guest is stored: target (a triple, or
/// a Pulley target such as `pulley32`) and wasmtime release. The runtime
/// tries a precompiled guest only when the key is that of one of its
/// [`runnable_targets`]; wasmtime then checks the artifact's engine settings
/// and CPU features against the host and refuses a mismatch, in which case
/// the next one is tried, then the portable module is compiled (where this
/// build has a compiler).
pub fn compatibility_key(target: Option<&str>) -> String {
    format!(
        "{}:wasmtime-{WASMTIME_VERSION}",
        target.unwrap_or(HOST_TARGET)
    )
}

/// Compiles a guest ahead of time for a target; returns the artifact bytes
/// and the compatibility key to store beside them.
#[cfg(feature = "compiler")]
pub fn precompile(wasm: &[u8], target: Option<&str>) -> Result<(Vec<u8>, String), GuestError> {
    let engine = engine_for(target)?;
    let bytes = engine
        .precompile_module(wasm)
        .map_err(|e| GuestError::Compile(e.to_string()))?;
    Ok((bytes, compatibility_key(target)))
}

/// Checks that bytes are a compilable WebAssembly module exporting the ABI,
/// without running anything.
#[cfg(feature = "compiler")]
pub fn validate(wasm: &[u8]) -> Result<(), GuestError> {
    let engine = engine_for(None)?;
    let module = Module::new(&engine, wasm).map_err(|e| GuestError::Compile(e.to_string()))?;
    check_exports(&module)
}

const REQUIRED_EXPORTS: [&str; 8] = [
    "memory",
    "ferry_abi_version",
    "ferry_alloc",
    "ferry_init",
    "ferry_preprocess",
    "ferry_postprocess",
    "ferry_result_ptr",
    "ferry_result_len",
];

fn check_exports(module: &Module) -> Result<(), GuestError> {
    for name in REQUIRED_EXPORTS {
        if module.get_export(name).is_none() {
            return Err(GuestError::Abi(format!("missing export `{name}`")));
        }
    }
    Ok(())
}

/// The directory precompiled guests are mapped from, when set
/// ([`map_precompiled_guests_in`]).
static GUEST_MAP_DIR: RwLock<Option<PathBuf>> = RwLock::new(None);

/// Makes every precompiled guest loaded after this call run from a file in
/// `dir` (the agent's state directory) instead of a copy in anonymous
/// memory: its code and data become clean file pages, read in as the guest
/// touches them and dropped by the kernel under memory pressure, where the
/// copy stayed resident for as long as the bundle served (about 2 MiB for
/// the standard guest; docs/PERFORMANCE.md, "The lean device build").
///
/// The file is written by this process from the verified bytes and never
/// has a name (Linux `O_TMPFILE`, created read-only for its owner): there
/// is nothing in `dir` that another process could swap or rewrite after
/// verification, and nothing to clean up after an update, a rollback or a
/// crash (the kernel frees it with the last mapping). Where the file system
/// or the OS cannot do this, or writing fails (disk full), the guest is
/// copied into memory as before. Process-wide: the last call wins.
pub fn map_precompiled_guests_in(dir: &Path) {
    *GUEST_MAP_DIR.write().unwrap() = Some(dir.to_owned());
}

/// The verified bytes of a precompiled guest in an unnamed file of the
/// directory set by [`map_precompiled_guests_in`], positioned anywhere
/// (wasmtime maps it whole). `None`: no directory set, or this system or
/// file system cannot make one.
#[cfg(target_os = "linux")]
fn unnamed_copy(bytes: &[u8]) -> Option<std::fs::File> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = GUEST_MAP_DIR.read().unwrap().clone()?;
    // O_EXCL: the file can never be given a name (linkat) later.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o400)
        .custom_flags(libc::O_TMPFILE | libc::O_EXCL | libc::O_CLOEXEC)
        .open(dir)
        .ok()?;
    file.write_all(bytes).ok()?;
    Some(file)
}

#[cfg(not(target_os = "linux"))]
fn unnamed_copy(_bytes: &[u8]) -> Option<std::fs::File> {
    None
}

/// Loads a verified precompiled guest for `engine`: mapped from an unnamed
/// file ([`map_precompiled_guests_in`]) where possible, else copied into
/// memory. The `bool` says whether it was mapped.
///
/// # Safety
///
/// `bytes` must be the output of `Engine::precompile_module` for a
/// configuration compatible with `engine` (what a verified bundle's
/// `PrecompiledGuest` guarantees; see the caller).
unsafe fn deserialize_verified(engine: &Engine, bytes: &[u8]) -> Option<(Module, bool)> {
    if let Some(file) = unnamed_copy(bytes) {
        // SAFETY: the file holds exactly `bytes` (written above by this
        // process), has no name, and no descriptor of it exists outside
        // this process; the caller vouches for the bytes.
        if let Ok(m) = unsafe { Module::deserialize_open_file(engine, file) } {
            return Some((m, true));
        }
    }
    // SAFETY: as the caller vouches.
    unsafe { Module::deserialize(engine, bytes) }
        .ok()
        .map(|m| (m, false))
}

/// Limits of one guest.
#[derive(Debug, Clone, Copy)]
pub struct SandboxLimits {
    pub memory_bytes: u64,
    pub timeout_ms: u64,
}

struct StoreState {
    stdio: wasi::Stdio,
    limiter: Limiter,
}

struct Limiter {
    memory_bytes: usize,
    hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.hit = true;
            // An error traps the guest at once: a guest that ignores a failed
            // grow and retries in a loop must not spin until its deadline.
            return Err(wasmtime::Error::msg("memory limit reached"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

struct Instance {
    store: Store<StoreState>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    preprocess: TypedFunc<(i32, i32, i32, i32), i32>,
    postprocess: TypedFunc<(i32, i32), i32>,
    result_ptr: TypedFunc<(), i32>,
    result_len: TypedFunc<(), i32>,
}

/// A compiled guest, ready to serve calls from many threads.
pub struct GuestRuntime {
    engine: Engine,
    pre: InstancePre<StoreState>,
    config_json: Arc<[u8]>,
    limits: SandboxLimits,
    pool: Mutex<Vec<Instance>>,
    /// Whether a precompiled artifact was used (for diagnostics).
    pub used_precompiled: bool,
    /// Whether that artifact runs from an unnamed file
    /// ([`map_precompiled_guests_in`]) rather than a copy in memory.
    pub mapped_from_file: bool,
    /// The target of the precompiled artifact used: the host's triple, or a
    /// Pulley target (the guest is interpreted).
    pub precompiled_target: Option<&'static str>,
    /// The compiler of the guest's code (for a precompiled one, Cranelift).
    pub compiler: GuestCompiler,
}

impl std::fmt::Debug for GuestRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRuntime")
            .field("limits", &self.limits)
            .field("used_precompiled", &self.used_precompiled)
            .finish()
    }
}

impl GuestRuntime {
    /// Compiles `wasm` (or loads one of `precompiled` whose compatibility
    /// key matches this host: each is a token that only a signed, verified
    /// bundle hands out), links WASI, and creates and configures a first
    /// instance, so configuration errors surface here, not on the first
    /// request.
    pub fn new(
        wasm: &[u8],
        precompiled: &[PrecompiledGuest<'_>],
        config_json: &[u8],
        limits: SandboxLimits,
    ) -> Result<GuestRuntime, GuestError> {
        let compiler = CAN_COMPILE.then_some(ON_DEVICE_COMPILER);
        GuestRuntime::load(wasm, precompiled, config_json, limits, compiler)
    }

    /// [`GuestRuntime::new`] with the compiler used when no precompiled
    /// artifact fits (tests and benchmarks compare them).
    #[cfg(feature = "compiler")]
    pub fn with_compiler(
        wasm: &[u8],
        precompiled: &[PrecompiledGuest<'_>],
        config_json: &[u8],
        limits: SandboxLimits,
        compiler: GuestCompiler,
    ) -> Result<GuestRuntime, GuestError> {
        GuestRuntime::load(wasm, precompiled, config_json, limits, Some(compiler))
    }

    /// [`GuestRuntime::new`] as the lean device build runs it, whatever this
    /// build has: only a guest precompiled for one of [`runnable_targets`],
    /// never compiled here ([`GuestError::NoRunnableGuest`] otherwise).
    pub fn precompiled_only(
        precompiled: &[PrecompiledGuest<'_>],
        config_json: &[u8],
        limits: SandboxLimits,
    ) -> Result<GuestRuntime, GuestError> {
        GuestRuntime::load(&[], precompiled, config_json, limits, None)
    }

    /// Loads the first precompiled guest that fits a runnable target, else
    /// compiles `wasm` with `compiler` (`None`: refuses).
    fn load(
        wasm: &[u8],
        precompiled: &[PrecompiledGuest<'_>],
        config_json: &[u8],
        limits: SandboxLimits,
        compiler: Option<GuestCompiler>,
    ) -> Result<GuestRuntime, GuestError> {
        let mut loaded = None;
        'targets: for target in runnable_targets() {
            let key = compatibility_key(Some(target));
            for guest in precompiled {
                let bytes = guest.bytes();
                if guest.target() != key || Engine::detect_precompiled(bytes).is_none() {
                    continue;
                }
                // The host's own target gets the host engine (CPU features
                // detected); Pulley an engine configured for it.
                let engine = engine_for((target != HOST_TARGET).then_some(target))?;
                // SAFETY: a `PrecompiledGuest` is only made by the format
                // crate from a bundle whose signatures and digests were
                // verified against trusted keys: the bytes are the output of
                // `Engine::precompile_module` by a packager the operator
                // trusts, and the compatibility key matches this engine.
                // wasmtime additionally checks its own version and settings
                // header and refuses a mismatch.
                if let Some((m, mapped)) = unsafe { deserialize_verified(&engine, bytes) } {
                    loaded = Some((engine, m, target, mapped));
                    break 'targets;
                }
            }
        }
        let mapped = matches!(loaded, Some((.., true)));
        let (engine, module, used_compiler, precompiled_target) = match loaded {
            Some((engine, module, target, _)) => {
                (engine, module, GuestCompiler::Cranelift, Some(target))
            }
            None => match compiler {
                // Nothing fitted: no key matched, or wasmtime refused every
                // artifact whose key did.
                None => return Err(no_runnable_guest(precompiled.iter().map(|g| g.target()))),
                Some(compiler) => {
                    let (engine, module, used) = compile(wasm, compiler)?;
                    (engine, module, used, None)
                }
            },
        };
        check_exports(&module)?;
        let mut linker: Linker<StoreState> = Linker::new(&engine);
        wasi::add_to_linker(&mut linker).map_err(|e| GuestError::Compile(e.to_string()))?;
        stub_unlisted_wasi(&mut linker, &module)?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| GuestError::Abi(format!("cannot link the guest's imports: {e}")))?;
        start_ticker(&engine);
        let runtime = GuestRuntime {
            engine,
            pre,
            config_json: config_json.into(),
            limits,
            pool: Mutex::new(Vec::new()),
            used_precompiled: precompiled_target.is_some(),
            mapped_from_file: mapped,
            precompiled_target,
            compiler: used_compiler,
        };
        let first = runtime.instantiate()?;
        runtime.pool.lock().unwrap().push(first);
        Ok(runtime)
    }

    fn new_store(&self) -> Store<StoreState> {
        let limiter = Limiter {
            memory_bytes: self.limits.memory_bytes as usize,
            hit: false,
        };
        let mut store = Store::new(
            &self.engine,
            StoreState {
                stdio: wasi::Stdio::new(),
                limiter,
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store
    }

    fn deadline_ticks(&self) -> u64 {
        self.limits
            .timeout_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            .max(1)
            + 1
    }

    fn instantiate(&self) -> Result<Instance, GuestError> {
        let mut store = self.new_store();
        store.set_epoch_deadline(self.deadline_ticks());
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.classify(&store, e))?;
        let func = |name: &str| GuestError::Abi(format!("export `{name}` has the wrong type"));
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            init.call(&mut store, ())
                .map_err(|e| self.classify(&store, e))?;
        }
        let version = instance
            .get_typed_func::<(), i32>(&mut store, "ferry_abi_version")
            .map_err(|_| func("ferry_abi_version"))?
            .call(&mut store, ())
            .map_err(|e| self.classify(&store, e))?;
        if version != ABI_VERSION {
            return Err(GuestError::Abi(format!(
                "guest speaks ABI version {version}, this runtime speaks {ABI_VERSION}"
            )));
        }
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| func("memory"))?;
        let mut inst = Instance {
            memory,
            alloc: instance
                .get_typed_func(&mut store, "ferry_alloc")
                .map_err(|_| func("ferry_alloc"))?,
            preprocess: instance
                .get_typed_func(&mut store, "ferry_preprocess")
                .map_err(|_| func("ferry_preprocess"))?,
            postprocess: instance
                .get_typed_func(&mut store, "ferry_postprocess")
                .map_err(|_| func("ferry_postprocess"))?,
            result_ptr: instance
                .get_typed_func(&mut store, "ferry_result_ptr")
                .map_err(|_| func("ferry_result_ptr"))?,
            result_len: instance
                .get_typed_func(&mut store, "ferry_result_len")
                .map_err(|_| func("ferry_result_len"))?,
            store,
        };
        let init: TypedFunc<(i32, i32), i32> = instance
            .get_typed_func(&mut inst.store, "ferry_init")
            .map_err(|_| func("ferry_init"))?;
        let config = self.config_json.clone();
        let (ptr, len) = self.write_input(&mut inst, &[&config])?;
        let status = init
            .call(&mut inst.store, (ptr, len))
            .map_err(|e| self.classify(&inst.store, e))?;
        if status != STATUS_OK {
            let message = String::from_utf8_lossy(&self.read_result(&mut inst)?).into_owned();
            return Err(GuestError::Config(message));
        }
        Ok(inst)
    }

    fn classify(&self, store: &Store<StoreState>, error: wasmtime::Error) -> GuestError {
        if store.data().limiter.hit {
            return GuestError::OutOfMemory(self.limits.memory_bytes);
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => GuestError::Timeout(self.limits.timeout_ms),
            Some(trap) => GuestError::Trap(trap.to_string()),
            None => GuestError::Trap(format!("{error:#}")),
        }
    }

    /// Copies `parts`, back to back, into one `ferry_alloc` allocation;
    /// returns its pointer and total length.
    fn write_input(&self, inst: &mut Instance, parts: &[&[u8]]) -> Result<(i32, i32), GuestError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let len = i32::try_from(total)
            .map_err(|_| GuestError::BadInput("request is larger than 2 GiB".into()))?;
        let ptr = inst
            .alloc
            .call(&mut inst.store, len)
            .map_err(|e| self.classify(&inst.store, e))?;
        if ptr == 0 && len > 0 {
            return Err(GuestError::OutOfMemory(self.limits.memory_bytes));
        }
        let mut at = ptr as u32 as usize;
        for part in parts {
            inst.memory.write(&mut inst.store, at, part).map_err(|_| {
                GuestError::Abi("ferry_alloc returned memory outside the guest's memory".into())
            })?;
            at += part.len();
        }
        Ok((ptr, len))
    }

    fn read_result(&self, inst: &mut Instance) -> Result<Vec<u8>, GuestError> {
        self.with_result(inst, <[u8]>::to_vec)
    }

    /// Calls `f` on the last call's result where it lies in the guest's
    /// memory (a large tensor set is read once, not copied out first).
    fn with_result<T>(
        &self,
        inst: &mut Instance,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, GuestError> {
        let ptr = inst
            .result_ptr
            .call(&mut inst.store, ())
            .map_err(|e| self.classify(&inst.store, e))? as u32 as usize;
        let len = inst
            .result_len
            .call(&mut inst.store, ())
            .map_err(|e| self.classify(&inst.store, e))? as u32 as usize;
        let data = inst.memory.data(&inst.store);
        data.get(ptr..ptr.saturating_add(len))
            .map(f)
            .ok_or_else(|| GuestError::Abi("result lies outside the guest's memory".into()))
    }

    /// Runs a call on a pooled instance; an instance whose call failed with a
    /// trap is discarded.
    fn with_instance<T>(
        &self,
        f: impl FnOnce(&Self, &mut Instance) -> Result<T, GuestError>,
    ) -> Result<T, GuestError> {
        let pooled = self.pool.lock().unwrap().pop();
        let mut inst = match pooled {
            Some(i) => i,
            None => self.instantiate()?,
        };
        inst.store.set_epoch_deadline(self.deadline_ticks());
        let result = f(self, &mut inst);
        let reusable = match &result {
            Ok(_) => true,
            Err(e) => matches!(e, GuestError::BadInput(_) | GuestError::Failed(_)),
        };
        if reusable {
            let mut pool = self.pool.lock().unwrap();
            if pool.len() < MAX_POOLED_INSTANCES {
                pool.push(inst);
            }
        }
        result
    }

    /// The outcome of a call that returned `status`: `ok` applied to the
    /// result, or the guest's error message.
    fn finish<T>(
        &self,
        inst: &mut Instance,
        status: i32,
        ok: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, GuestError> {
        let message = |out: &[u8]| String::from_utf8_lossy(out).into_owned();
        match status {
            STATUS_OK => self.with_result(inst, ok),
            STATUS_BAD_INPUT => Err(GuestError::BadInput(self.with_result(inst, message)?)),
            _ => Err(GuestError::Failed(self.with_result(inst, message)?)),
        }
    }

    /// Preprocessing: request → encoded tensor set.
    pub fn preprocess(&self, content_type: &str, body: &[u8]) -> Result<Vec<u8>, GuestError> {
        self.preprocess_with(content_type, body, <[u8]>::to_vec)
    }

    /// Preprocessing, with `read` applied to the encoded tensor set where
    /// the guest left it (no copy of a large request's tensors).
    pub fn preprocess_with<T>(
        &self,
        content_type: &str,
        body: &[u8],
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, GuestError> {
        self.with_instance(|this, inst| {
            let (ptr, _) = this.write_input(inst, &[content_type.as_bytes(), body])?;
            let ct_len = content_type.len() as i32;
            let status = inst
                .preprocess
                .call(
                    &mut inst.store,
                    (ptr, ct_len, ptr.wrapping_add(ct_len), body.len() as i32),
                )
                .map_err(|e| this.classify(&inst.store, e))?;
            this.finish(inst, status, read)
        })
    }

    /// Postprocessing: encoded tensor set → response JSON.
    pub fn postprocess(&self, outputs: &[u8]) -> Result<Vec<u8>, GuestError> {
        self.with_instance(|this, inst| {
            let (ptr, len) = this.write_input(inst, &[outputs])?;
            let status = inst
                .postprocess
                .call(&mut inst.store, (ptr, len))
                .map_err(|e| this.classify(&inst.store, e))?;
            this.finish(inst, status, <[u8]>::to_vec)
        })
    }
}

/// Compiles a guest here with `compiler`; a guest Winch cannot compile (an
/// unsupported proposal, an architecture without Winch) goes to Cranelift.
#[cfg(feature = "compiler")]
fn compile(
    wasm: &[u8],
    compiler: GuestCompiler,
) -> Result<(Engine, Module, GuestCompiler), GuestError> {
    if compiler == GuestCompiler::Winch
        && let Ok(engine) = engine_with(None, GuestCompiler::Winch)
        && let Ok(module) = Module::new(&engine, wasm)
    {
        return Ok((engine, module, GuestCompiler::Winch));
    }
    let engine = engine_for(None)?;
    let module = Module::new(&engine, wasm).map_err(|e| GuestError::Compile(e.to_string()))?;
    Ok((engine, module, GuestCompiler::Cranelift))
}

/// Without a compiler nothing is compiled here: the caller passes no
/// compiler, so this is never reached.
#[cfg(not(feature = "compiler"))]
fn compile(
    _wasm: &[u8],
    _compiler: GuestCompiler,
) -> Result<(Engine, Module, GuestCompiler), GuestError> {
    Err(GuestError::Compile(
        "this build has no guest compiler".into(),
    ))
}

/// Replaces every WASI function the module imports that is not in
/// [`WASI_LINKED`] with one that returns [`ERRNO_NOSYS`] immediately.
fn stub_unlisted_wasi(linker: &mut Linker<StoreState>, module: &Module) -> Result<(), GuestError> {
    linker.allow_shadowing(true);
    for import in module.imports() {
        if import.module() != WASI_MODULE || WASI_LINKED.contains(&import.name()) {
            continue;
        }
        let ExternType::Func(ty) = import.ty() else {
            continue;
        };
        let results: Vec<ValType> = ty.results().collect();
        linker
            .func_new(WASI_MODULE, import.name(), ty, move |_, _, out| {
                for (slot, t) in out.iter_mut().zip(&results) {
                    *slot = match t {
                        ValType::I64 => Val::I64(i64::from(ERRNO_NOSYS)),
                        ValType::F32 => Val::F32(0),
                        ValType::F64 => Val::F64(0),
                        _ => Val::I32(ERRNO_NOSYS),
                    };
                }
                Ok(())
            })
            .map_err(|e| GuestError::Abi(format!("cannot link `{}`: {e}", import.name())))?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// Starts a thread that advances the engine's epoch every [`EPOCH_TICK`]
/// for as long as the engine lives.
fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("ferry-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("cannot start the epoch thread");
}

mod wasi {
    //! The WASI preview-1 functions a guest gets for real ([`super::WASI_LINKED`]),
    //! implemented here over the guest's memory: no environment, no arguments,
    //! no preopened directory, an empty stdin, stdout and stderr discarded, the
    //! host's clocks and random numbers. Nothing here opens, reads or writes
    //! anything outside the guest's memory, and nothing blocks.
    //!
    //! Why not wasmtime-wasi: its preview-1 layer is built on its preview-2
    //! implementation, which brings wasmtime's component model, async support,
    //! a file system and sockets into every binary (about 0.6 MB of the lean
    //! device build, docs/PERFORMANCE.md); the guest uses none of them.
    //! Semantics follow wasmtime-wasi's for the same situation (a non-terminal
    //! stdio, no preopens), so guests behave as they did.
    //!
    //! Every pointer a guest passes is checked against its memory's bounds; an
    //! out-of-bounds one gets `EFAULT` and nothing is written. Every other WASI
    //! function a guest imports is linked to a stub that answers `ENOSYS`
    //! (`stub_unlisted_wasi` in the parent module).

    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    use wasmtime::{Caller, Extern, Linker};

    use super::{StoreState, WASI_MODULE};

    /// A WASI errno (preview 1's `errno` enum).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) struct Errno(pub i32);

    impl Errno {
        const BADF: Errno = Errno(8);
        const FAULT: Errno = Errno(21);
        const INVAL: Errno = Errno(28);
        const SPIPE: Errno = Errno(70);
    }

    /// The descriptors a guest starts with: 0 (stdin), 1 (stdout), 2 (stderr),
    /// until it closes them. No other descriptor ever exists.
    #[derive(Debug)]
    pub(super) struct Stdio {
        closed: [bool; 3],
        /// The origin of the monotonic clock: the store's creation.
        start: Instant,
    }

    impl Stdio {
        pub(super) fn new() -> Stdio {
            Stdio {
                closed: [false; 3],
                start: Instant::now(),
            }
        }

        /// Which standard stream `fd` is, if open.
        fn open(&self, fd: i32) -> Result<usize, Errno> {
            match usize::try_from(fd) {
                Ok(i) if i < 3 && !self.closed[i] => Ok(i),
                _ => Err(Errno::BADF),
            }
        }
    }

    /// Preview 1's `filetype::unknown`: what wasmtime-wasi reports for stdio
    /// that is not a terminal.
    const FILETYPE_UNKNOWN: u8 = 0;
    /// `rights::fd_read` and `rights::fd_write`.
    const RIGHT_FD_READ: u64 = 1 << 1;
    const RIGHT_FD_WRITE: u64 = 1 << 6;
    /// `clockid::realtime` and `clockid::monotonic` (the CPU-time clocks are
    /// refused with `EBADF`, as wasmtime-wasi does).
    const CLOCK_REALTIME: i32 = 0;
    const CLOCK_MONOTONIC: i32 = 1;

    /// The guest's memory, every access bounds-checked.
    struct Memory<'a>(&'a mut [u8]);

    impl Memory<'_> {
        fn range(&self, ptr: i32, len: u32) -> Result<std::ops::Range<usize>, Errno> {
            let start = ptr as u32 as usize;
            let end = start.checked_add(len as usize).ok_or(Errno::FAULT)?;
            if end > self.0.len() {
                return Err(Errno::FAULT);
            }
            Ok(start..end)
        }

        fn bytes_mut(&mut self, ptr: i32, len: u32) -> Result<&mut [u8], Errno> {
            let r = self.range(ptr, len)?;
            Ok(&mut self.0[r])
        }

        fn write(&mut self, ptr: i32, bytes: &[u8]) -> Result<(), Errno> {
            let len = u32::try_from(bytes.len()).map_err(|_| Errno::FAULT)?;
            self.bytes_mut(ptr, len)?.copy_from_slice(bytes);
            Ok(())
        }

        fn read_u32(&self, ptr: i32) -> Result<u32, Errno> {
            let r = self.range(ptr, 4)?;
            Ok(u32::from_le_bytes(self.0[r].try_into().unwrap()))
        }

        /// The lengths of a `ciovec`/`iovec` array (pointer, length pairs of
        /// u32), each buffer checked to lie in memory.
        fn iovec_lengths(&self, iovs: i32, count: i32) -> Result<Vec<u32>, Errno> {
            let count = count as u32;
            self.range(iovs, count.checked_mul(8).ok_or(Errno::FAULT)?)?;
            (0..count)
                .map(|i| {
                    let at = (iovs as u32).wrapping_add(i * 8) as i32;
                    let (buf, len) = (self.read_u32(at)?, self.read_u32(at.wrapping_add(4))?);
                    self.range(buf as i32, len)?;
                    Ok(len)
                })
                .collect()
        }
    }

    /// Runs `f` on the caller's exported memory and stdio state; its errno
    /// (0 on success) is the WASI function's result. A guest without an
    /// exported memory cannot call WASI (wasmtime-wasi traps too).
    fn with_memory(
        caller: &mut Caller<'_, StoreState>,
        f: impl FnOnce(&mut Memory<'_>, &mut Stdio) -> Result<(), Errno>,
    ) -> wasmtime::Result<i32> {
        let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
            return Err(wasmtime::Error::msg(
                "the guest called WASI without exporting its memory",
            ));
        };
        let (data, state) = memory.data_and_store_mut(caller);
        Ok(match f(&mut Memory(data), &mut state.stdio) {
            Ok(()) => 0,
            Err(Errno(e)) => e,
        })
    }

    /// Links every function of [`super::WASI_LINKED`].
    pub(super) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
        let m = WASI_MODULE;
        // Arguments and environment: none (two zero counts, nothing to copy).
        for name in ["args_sizes_get", "environ_sizes_get"] {
            linker.func_wrap(
                m,
                name,
                |mut c: Caller<'_, StoreState>, count: i32, size: i32| {
                    with_memory(&mut c, |mem, _| {
                        mem.write(count, &0u32.to_le_bytes())?;
                        mem.write(size, &0u32.to_le_bytes())
                    })
                },
            )?;
        }
        for name in ["args_get", "environ_get"] {
            linker.func_wrap(m, name, |_: Caller<'_, StoreState>, _: i32, _: i32| Ok(0))?;
        }
        linker.func_wrap(
            m,
            "clock_res_get",
            |mut c: Caller<'_, StoreState>, id: i32, out: i32| {
                with_memory(&mut c, |mem, _| match id {
                    CLOCK_REALTIME | CLOCK_MONOTONIC => mem.write(out, &1u64.to_le_bytes()),
                    2 | 3 => Err(Errno::BADF),
                    _ => Err(Errno::INVAL),
                })
            },
        )?;
        linker.func_wrap(
            m,
            "clock_time_get",
            |mut c: Caller<'_, StoreState>, id: i32, _precision: i64, out: i32| {
                with_memory(&mut c, |mem, stdio| {
                    let now = match id {
                        CLOCK_REALTIME => SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default(),
                        CLOCK_MONOTONIC => stdio.start.elapsed(),
                        2 | 3 => return Err(Errno::BADF),
                        _ => return Err(Errno::INVAL),
                    };
                    let nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
                    mem.write(out, &nanos.to_le_bytes())
                })
            },
        )?;
        linker.func_wrap(m, "fd_close", |mut c: Caller<'_, StoreState>, fd: i32| {
            with_memory(&mut c, |_, stdio| {
                let i = stdio.open(fd)?;
                stdio.closed[i] = true;
                Ok(())
            })
        })?;
        linker.func_wrap(
            m,
            "fd_fdstat_get",
            |mut c: Caller<'_, StoreState>, fd: i32, out: i32| {
                with_memory(&mut c, |mem, stdio| {
                    let rights = match stdio.open(fd)? {
                        0 => RIGHT_FD_READ,
                        _ => RIGHT_FD_WRITE,
                    };
                    // fdstat: filetype u8, flags u16 at 2, rights_base u64 at 8,
                    // rights_inheriting u64 at 16.
                    let mut stat = [0u8; 24];
                    stat[0] = FILETYPE_UNKNOWN;
                    stat[8..16].copy_from_slice(&rights.to_le_bytes());
                    stat[16..24].copy_from_slice(&rights.to_le_bytes());
                    mem.write(out, &stat)
                })
            },
        )?;
        // Flags belong to files; stdio has none to change (wasmtime-wasi: EBADF).
        linker.func_wrap(
            m,
            "fd_fdstat_set_flags",
            |_: Caller<'_, StoreState>, _fd: i32, _flags: i32| Ok(Errno::BADF.0),
        )?;
        linker.func_wrap(
            m,
            "fd_filestat_get",
            |mut c: Caller<'_, StoreState>, fd: i32, out: i32| {
                with_memory(&mut c, |mem, stdio| {
                    stdio.open(fd)?;
                    // filestat (64 bytes), all zero: filetype unknown at 16.
                    mem.write(out, &[0u8; 64])
                })
            },
        )?;
        // No preopened directory: every descriptor answers EBADF.
        linker.func_wrap(
            m,
            "fd_prestat_get",
            |_: Caller<'_, StoreState>, _fd: i32, _out: i32| Ok(Errno::BADF.0),
        )?;
        linker.func_wrap(
            m,
            "fd_prestat_dir_name",
            |_: Caller<'_, StoreState>, _fd: i32, _path: i32, _len: i32| Ok(Errno::BADF.0),
        )?;
        linker.func_wrap(
            m,
            "fd_read",
            |mut c: Caller<'_, StoreState>, fd: i32, iovs: i32, count: i32, out: i32| {
                with_memory(&mut c, |mem, stdio| {
                    if stdio.open(fd)? != 0 {
                        return Err(Errno::BADF);
                    }
                    mem.iovec_lengths(iovs, count)?;
                    // stdin is empty: end of file at once.
                    mem.write(out, &0u32.to_le_bytes())
                })
            },
        )?;
        linker.func_wrap(
            m,
            "fd_write",
            |mut c: Caller<'_, StoreState>, fd: i32, iovs: i32, count: i32, out: i32| {
                with_memory(&mut c, |mem, stdio| {
                    if stdio.open(fd)? == 0 {
                        return Err(Errno::BADF);
                    }
                    // stdout and stderr are sinks: everything is "written". A
                    // total past u32 is a short write, as POSIX allows.
                    let written = mem
                        .iovec_lengths(iovs, count)?
                        .into_iter()
                        .try_fold(0u32, |sum, len| sum.checked_add(len).ok_or(sum))
                        .unwrap_or_else(|short| short);
                    mem.write(out, &written.to_le_bytes())
                })
            },
        )?;
        // Streams do not seek.
        linker.func_wrap(
            m,
            "fd_seek",
            |mut c: Caller<'_, StoreState>, fd: i32, _offset: i64, _whence: i32, _out: i32| {
                with_memory(&mut c, |_, stdio| {
                    stdio.open(fd)?;
                    Err(Errno::SPIPE)
                })
            },
        )?;
        linker.func_wrap(
            m,
            "fd_tell",
            |mut c: Caller<'_, StoreState>, fd: i32, _out: i32| {
                with_memory(&mut c, |_, stdio| {
                    stdio.open(fd)?;
                    Err(Errno::SPIPE)
                })
            },
        )?;
        // Ends the guest's call with a trap naming the status: an instance that
        // exited is not reused.
        linker.func_wrap(
            m,
            "proc_exit",
            |_: Caller<'_, StoreState>, status: i32| -> wasmtime::Result<()> {
                Err(wasmtime::Error::msg(format!(
                    "the guest exited with status {status}"
                )))
            },
        )?;
        linker.func_wrap(
            m,
            "random_get",
            |mut c: Caller<'_, StoreState>, buf: i32, len: i32| {
                with_memory(&mut c, |mem, _| {
                    let bytes = mem.bytes_mut(buf, len as u32)?;
                    getrandom::fill(bytes).map_err(|_| Errno(29)) // EIO
                })
            },
        )?;
        linker.func_wrap(m, "sched_yield", |_: Caller<'_, StoreState>| Ok(0))?;
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn iovecs_outside_memory_are_a_fault() {
            let mut data = vec![0u8; 64];
            // One iovec at 0: buffer at 32, length 16 (inside).
            data[0..4].copy_from_slice(&32u32.to_le_bytes());
            data[4..8].copy_from_slice(&16u32.to_le_bytes());
            // One at 8: buffer at 60, length 8 (past the end).
            data[8..12].copy_from_slice(&60u32.to_le_bytes());
            data[12..16].copy_from_slice(&8u32.to_le_bytes());
            let mem = Memory(&mut data);
            assert_eq!(mem.iovec_lengths(0, 1), Ok(vec![16]));
            assert_eq!(mem.iovec_lengths(0, 2), Err(Errno::FAULT));
            // The array itself past the end, or wrapping around.
            assert_eq!(mem.iovec_lengths(60, 1), Err(Errno::FAULT));
            assert_eq!(mem.iovec_lengths(0, i32::MAX), Err(Errno::FAULT));
            assert_eq!(mem.iovec_lengths(-8, 1), Err(Errno::FAULT));
        }

        #[test]
        fn only_open_standard_streams_exist() {
            let mut s = Stdio::new();
            assert_eq!(s.open(1), Ok(1));
            assert_eq!(s.open(3), Err(Errno::BADF));
            assert_eq!(s.open(-1), Err(Errno::BADF));
            s.closed[1] = true;
            assert_eq!(s.open(1), Err(Errno::BADF));
        }
    }
}
