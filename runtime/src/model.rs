//! Model execution. The only module that names tract types.
//!
//! Loading: parse the ONNX protobuf, read each input's declared element type
//! and shape (unknown or named dimensions become the symbolic batch
//! dimension `N`), refuse operators tract does not implement with their
//! names, then optimise into a runnable plan. Running is `&self`, so one
//! [`Model`] serves many threads.
//!
//! # Batch-specialised plans
//! tract optimises a graph much better when every shape is concrete
//! (convolutions above all: the small CNN runs 2-3x faster), so a model whose
//! inputs carry the symbolic batch dimension keeps several plans made from the
//! same analysed graph:
//! - a plan for batch 1, made at load: the common request, and the only plan
//!   a model with symbolic inputs pays for before its first prediction (if
//!   tract cannot make it, the symbolic plan is made at load instead and
//!   serves batch 1 too, as before these plans existed);
//! - the symbolic plan, made on the first call whose batch has no plan of its
//!   own, and kept: it serves every batch size;
//! - plans for batch sizes that recur: a size seen [`SPECIALISE_AFTER`] times
//!   gets its own plan, made on the calling thread (that call pays the
//!   optimisation once), at most [`MAX_SPECIALISED_PLANS`] of them and fewer
//!   for large models ([`SPECIALISED_PLANS_BUDGET`]), the least recently used
//!   one dropped first.
//!
//! A model whose inputs are all fixed has one plan. Every plan computes the
//! same function; the tests compare their outputs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use ferry_guest_abi::{DType, Tensor};
use tract_onnx::pb::tensor_shape_proto::dimension;
use tract_onnx::pb::type_proto;
use tract_onnx::prelude::*;

/// ONNX's protobuf types, for `external.rs` (tract stays named in this file).
pub(crate) use tract_onnx::pb as onnx_pb;

use crate::error::ModelError;
use ferry_format::TensorSpec;

/// Name of the symbolic batch dimension.
pub const BATCH_SYMBOL: &str = "N";

/// Calls with one batch size (other than 1) before it gets a plan of its
/// own: a size seen once or twice is not worth an optimisation.
pub const SPECIALISE_AFTER: u32 = 3;

/// Batch-specialised plans kept besides the batch-1 and symbolic ones.
pub const MAX_SPECIALISED_PLANS: usize = 4;

/// What the extra specialised plans may cost, in bytes of ONNX model each
/// (a plan holds its own packed copy of the weights): a 10 MB model gets 3
/// plans, a 40 MB one none.
pub const SPECIALISED_PLANS_BUDGET: usize = 32 << 20;

/// Batch sizes counted while waiting for [`SPECIALISE_AFTER`]; the counts
/// start again when a caller sends more distinct sizes than this.
const MAX_COUNTED_SIZES: usize = 64;

/// Run states kept for the batch-1 plan: one per thread that ran it at the
/// same time, up to this many (a call finding every slot busy makes a state
/// for itself and drops it after). A state holds the plan's per-run
/// bookkeeping (a slot per node, op states); making it afresh on every call
/// cost ~0.5 µs, a tenth of a small MLP's run.
pub const MAX_RUN_STATES: usize = 8;

/// Models up to this size (bytes of ONNX) give each run state but the first
/// its own copy of the plan's constants. tract hands constants to the ops as
/// reference-counted values, so every run increments and decrements each
/// constant's count; shared by two cores, those counts (and the tensor
/// headers on the same cache lines) move between them on every run. With
/// the plan's reference count and one shared pool of states, that cost the
/// 4-feature MLP 2-17% of its 2-thread throughput of the model alone
/// (docs/PERFORMANCE.md); larger models run long enough for it not to
/// show, and their weights are not worth copying: at most
/// `MAX_RUN_STATES - 1` copies of 1 MiB, made only for slots a thread
/// reached because the ones before were busy.
pub const PRIVATE_CONSTANTS_BUDGET: usize = 1 << 20;

type Plan = Arc<TypedRunnableModel>;

/// One run state of the batch-1 plan, alone on its cache lines: a thread
/// keeps using the slot it last ran in, so in steady state each slot's lock
/// and state are touched by one core only.
#[repr(align(128))]
#[derive(Default)]
struct StateSlot(Mutex<Option<TypedSimpleState>>);

thread_local! {
    /// The state slot this thread last ran in (any model's: a start for the
    /// search, not a claim).
    static LAST_SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Which plan ran a call (for tests and benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanChoice {
    /// The plan with the batch dimension symbolic, whatever the batch.
    Symbolic,
    /// The plan made for this batch size.
    Batch(u64),
}

/// A loaded, optimised model.
pub struct Model {
    /// The analysed graph with the batch symbol, from which plans are made;
    /// `None` when every input dimension is fixed (one plan, `fixed`).
    source: Option<Source>,
    /// The only plan of a model without symbolic inputs; the batch-1 plan
    /// otherwise.
    first: Plan,
    symbolic: OnceLock<Result<Plan, String>>,
    cache: Mutex<PlanCache>,
    /// Run states of `first`, reused call after call (tract resets a
    /// state's values after each run; a state whose run failed is dropped).
    /// Empty when states may not be reused: only when no op of the plan
    /// keeps a state of its own may they be. Recurrent ops (GRU, LSTM, Scan)
    /// keep their hidden state there and carry it into the next run (tract's
    /// streaming mode), which would leak one request into the next.
    states: Box<[StateSlot]>,
    /// Whether run states after the first get their own copies of the
    /// plan's constants ([`PRIVATE_CONSTANTS_BUDGET`]).
    private_constants: bool,
    /// How many specialised plans (besides batch 1) this model may keep.
    max_plans: usize,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    dropped_outputs: Vec<String>,
}

struct Source {
    model: InferenceModel,
    input_types: Vec<DatumType>,
}

#[derive(Default)]
struct PlanCache {
    /// Calls seen per batch size without a plan.
    seen: HashMap<u64, u32>,
    /// (batch, plan, last use); at most `Model::max_plans`.
    plans: Vec<(u64, Plan, u64)>,
    clock: u64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

fn onnx_dtype(code: i32) -> Option<(DType, DatumType)> {
    // Codes from onnx.proto's TensorProto.DataType.
    Some(match code {
        1 => (DType::F32, f32::datum_type()),
        2 => (DType::U8, u8::datum_type()),
        6 => (DType::I32, i32::datum_type()),
        7 => (DType::I64, i64::datum_type()),
        9 => (DType::Bool, bool::datum_type()),
        11 => (DType::F64, f64::datum_type()),
        _ => return None,
    })
}

fn datum_of(dtype: DType) -> DatumType {
    match dtype {
        DType::F32 => f32::datum_type(),
        DType::F64 => f64::datum_type(),
        DType::I64 => i64::datum_type(),
        DType::I32 => i32::datum_type(),
        DType::U8 => u8::datum_type(),
        DType::Bool => bool::datum_type(),
    }
}

fn spec_of(
    vi: &tract_onnx::pb::ValueInfoProto,
    what: &str,
) -> Result<(TensorSpec, Option<DatumType>), ModelError> {
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(ModelError::Load(format!(
            "{what} `{}` is not a tensor (sequences and maps are not supported; for scikit-learn classifiers export with skl2onnx option zipmap=False)",
            vi.name
        )));
    };
    let dtype = onnx_dtype(t.elem_type);
    let shape = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(dimension::Value::DimValue(v)) if v > 0 => Some(v as u64),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let name = dtype
        .map(|d| d.0.name().to_string())
        .unwrap_or_else(|| format!("onnx-type-{}", t.elem_type));
    Ok((
        TensorSpec {
            name: vi.name.clone(),
            dtype: name,
            shape,
        },
        dtype.map(|d| d.1),
    ))
}

/// What an ONNX file declares, read without optimising it: the engines'
/// common view of a model (the onnxruntime engine takes its specs from here,
/// so both engines check requests the same way).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Description {
    pub inputs: Vec<TensorSpec>,
    /// Outputs Ferry carries, in the file's order.
    pub outputs: Vec<TensorSpec>,
    /// Outputs of element types Ferry does not carry (left out), as `name (type)`.
    pub dropped_outputs: Vec<String>,
    /// The opset of the default (`ai.onnx`) domain.
    pub opset: Option<i64>,
}

struct Declared {
    proto: tract_onnx::pb::ModelProto,
    inputs: Vec<TensorSpec>,
    input_types: Vec<DatumType>,
    /// Every output, with whether its element type is carried.
    outputs: Vec<(TensorSpec, bool)>,
}

fn declared(onnx_bytes: &[u8]) -> Result<Declared, ModelError> {
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &onnx_bytes[..])
        .map_err(|e| ModelError::Load(format!("not a valid ONNX model: {e}")))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| ModelError::Load("ONNX model has no graph".into()))?;
    let (inputs, input_types, outputs) = interface(
        graph.initializer.iter().map(|t| t.name.as_str()),
        &graph.input,
        &graph.output,
    )?;
    Ok(Declared {
        proto,
        inputs,
        input_types,
        outputs,
    })
}

/// What a model's interface is, from its graph's declared inputs (less those
/// that are initializers, as older exporters list them) and outputs.
#[allow(clippy::type_complexity)]
fn interface<'a>(
    initializers: impl Iterator<Item = &'a str>,
    graph_inputs: &[tract_onnx::pb::ValueInfoProto],
    graph_outputs: &[tract_onnx::pb::ValueInfoProto],
) -> Result<(Vec<TensorSpec>, Vec<DatumType>, Vec<(TensorSpec, bool)>), ModelError> {
    let initializers: std::collections::HashSet<&str> = initializers.collect();
    let mut inputs = Vec::new();
    let mut input_types = Vec::new();
    for vi in graph_inputs
        .iter()
        .filter(|vi| !initializers.contains(vi.name.as_str()))
    {
        let (spec, dt) = spec_of(vi, "input")?;
        let dt = dt.ok_or_else(|| {
            ModelError::Load(format!(
                "input `{}` has element type {}, which Ferry does not support",
                spec.name, spec.dtype
            ))
        })?;
        input_types.push(dt);
        inputs.push(spec);
    }
    let outputs = graph_outputs
        .iter()
        .map(|vi| spec_of(vi, "output").map(|(spec, dt)| (spec, dt.is_some())))
        .collect::<Result<Vec<_>, _>>()?;
    if !outputs.iter().any(|(_, carried)| *carried) {
        return Err(ModelError::Load(format!(
            "no model output has a supported element type (f32 f64 i64 i32 u8 bool): {}",
            outputs
                .iter()
                .map(|(s, _)| format!("{} ({})", s.name, s.dtype))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok((inputs, input_types, outputs))
}

/// The fields of an ONNX `ModelProto` (onnx.proto: `graph` = 7,
/// `opset_import` = 8) that say what a model declares; prost skips every
/// other field, so the weights are stepped over, not decoded.
#[derive(Clone, PartialEq, prost::Message)]
struct ModelHead {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphHead>,
    #[prost(message, repeated, tag = "8")]
    opset_import: Vec<tract_onnx::pb::OperatorSetIdProto>,
}

/// `GraphProto`'s `initializer` (5, names only), `input` (11), `output` (12).
#[derive(Clone, PartialEq, prost::Message)]
struct GraphHead {
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorName>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<tract_onnx::pb::ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<tract_onnx::pb::ValueInfoProto>,
}

/// `TensorProto`'s `name` (8) alone.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorName {
    #[prost(string, tag = "8")]
    name: String,
}

/// Reads what an ONNX file declares (inputs, outputs, opset) without an
/// engine, and without decoding its weights: for mobilenet 0.1 ms where
/// decoding the whole protobuf took 15-24 ms. Must say what
/// [`Model::load`]'s full decoding says (`describe_reads_what_loading_reads`).
pub(crate) fn describe(onnx_bytes: &[u8]) -> Result<Description, ModelError> {
    use prost::Message as _;
    let head = ModelHead::decode(onnx_bytes)
        .map_err(|e| ModelError::Load(format!("not a valid ONNX model: {e}")))?;
    let graph = head
        .graph
        .as_ref()
        .ok_or_else(|| ModelError::Load("ONNX model has no graph".into()))?;
    let (inputs, _, outputs) = interface(
        graph.initializer.iter().map(|t| t.name.as_str()),
        &graph.input,
        &graph.output,
    )?;
    let opset = head
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version);
    let (outputs, dropped): (Vec<_>, Vec<_>) = outputs.into_iter().partition(|(_, c)| *c);
    Ok(Description {
        inputs,
        outputs: outputs.into_iter().map(|(s, _)| s).collect(),
        dropped_outputs: dropped
            .into_iter()
            .map(|(s, _)| format!("{} ({})", s.name, s.dtype))
            .collect(),
        opset,
    })
}

impl Model {
    /// Loads and optimises an ONNX model.
    pub fn load(onnx_bytes: &[u8]) -> Result<Model, ModelError> {
        unpanicked("loading the model", || Model::load_unguarded(onnx_bytes))
            .map_err(ModelError::Load)?
    }

    fn load_unguarded(onnx_bytes: &[u8]) -> Result<Model, ModelError> {
        let Declared {
            proto,
            inputs,
            input_types,
            outputs: all_outputs,
        } = declared(onnx_bytes)?;
        let mut model = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .map_err(|e| ModelError::Load(format!("{e:#}")))?;
        let missing: Vec<String> = model
            .nodes()
            .iter()
            .filter_map(|n| {
                n.op()
                    .name()
                    .strip_prefix("Unimplemented(")
                    .map(|s| s.trim_end_matches(')').to_string())
            })
            .collect();
        if !missing.is_empty() {
            return Err(ModelError::Load(format!(
                "the model uses operator(s) tract does not implement: {}",
                missing.join(", ")
            )));
        }
        // Outputs of types Ferry does not carry (strings, e.g. a scikit-learn
        // label with string classes) are left out; the others still run.
        let mut outputs = Vec::new();
        let mut dropped_outputs = Vec::new();
        let mut keep = Vec::new();
        for ((spec, carried), outlet) in all_outputs.into_iter().zip(model.outputs.clone()) {
            if carried {
                outputs.push(spec);
                keep.push(outlet);
            } else {
                dropped_outputs.push(format!("{} ({})", spec.name, spec.dtype));
            }
        }
        model
            .select_output_outlets(&keep)
            .map_err(|e| ModelError::Load(format!("{e:#}")))?;
        let symbolic = inputs.iter().any(|s| s.shape.iter().any(Option::is_none));
        let source = Source { model, input_types };
        let symbolic_plan = OnceLock::new();
        let first = match source.plan(&inputs, symbolic.then_some(1)) {
            Ok(plan) => plan,
            // A graph tract can optimise with the batch symbolic but not at
            // batch 1: the symbolic plan serves batch 1 too, as before.
            Err(e) if symbolic => {
                let plan = source
                    .plan(&inputs, None)
                    .map_err(|_| ModelError::Load(e))?;
                let _ = symbolic_plan.set(Ok(plan.clone()));
                plan
            }
            Err(e) => return Err(ModelError::Load(e)),
        };
        let max_plans =
            MAX_SPECIALISED_PLANS.min(SPECIALISED_PLANS_BUDGET / onnx_bytes.len().max(1));
        Ok(Model {
            source: symbolic.then_some(source),
            symbolic: symbolic_plan,
            cache: Mutex::new(PlanCache::default()),
            states: if first
                .spawn()
                .is_ok_and(|s| s.op_states.iter().all(Option::is_none))
            {
                (0..MAX_RUN_STATES).map(|_| StateSlot::default()).collect()
            } else {
                Box::default()
            },
            private_constants: onnx_bytes.len() <= PRIVATE_CONSTANTS_BUDGET,
            first,
            max_plans,
            inputs,
            outputs,
            dropped_outputs,
        })
    }

    /// The model's inputs as declared in the ONNX file.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// The model's outputs as declared in the ONNX file.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// Outputs left out because their element type is not supported.
    pub fn dropped_outputs(&self) -> &[String] {
        &self.dropped_outputs
    }

    /// Runs the model. `tensors` must hold every input, by name. The plan is
    /// chosen by the call's batch size (see the module's header).
    pub fn run(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        let values = self.values(tensors)?;
        let batch = self.batch_of(&values);
        // The batch-1 plan (the only plan of a model without symbolic
        // inputs) is run without touching its reference count.
        if self.source.is_none() || batch == Some(1) {
            return self.run_first(values);
        }
        let plan = self.plan_for(batch)?;
        self.run_plan(&plan, values)
    }

    /// Runs the model with the plan given, making it if needed (tests and
    /// benchmarks: every plan must compute the same outputs).
    pub fn run_with(
        &self,
        tensors: &[Tensor],
        choice: PlanChoice,
    ) -> Result<Vec<Tensor>, ModelError> {
        let values = self.values(tensors)?;
        let plan = match (choice, &self.source) {
            (_, None) => self.first.clone(),
            (PlanChoice::Symbolic, Some(_)) => self.symbolic_plan()?,
            (PlanChoice::Batch(1), Some(_)) => self.first.clone(),
            (PlanChoice::Batch(b), Some(source)) => source
                .plan(&self.inputs, Some(b))
                .map_err(ModelError::Run)?,
        };
        self.run_plan(&plan, values)
    }

    /// The batch sizes with a plan of their own, besides 1, most recently
    /// used last.
    pub fn specialised_batches(&self) -> Vec<u64> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut plans: Vec<_> = cache.plans.iter().map(|(b, _, t)| (*t, *b)).collect();
        plans.sort_unstable();
        plans.into_iter().map(|(_, b)| b).collect()
    }

    /// Whether the inputs carry the symbolic batch dimension (so the model
    /// keeps more than one plan).
    pub fn has_symbolic_batch(&self) -> bool {
        self.source.is_some()
    }

    fn values(&self, tensors: &[Tensor]) -> Result<TVec<TValue>, ModelError> {
        let mut values: TVec<TValue> = TVec::with_capacity(self.inputs.len());
        for spec in &self.inputs {
            let t = tensors
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| {
                    ModelError::BadInput(format!("model input `{}` is missing", spec.name))
                })?;
            values.push(to_tract(t, spec)?.into());
        }
        Ok(values)
    }

    /// The value of the batch symbol in a call: `None` when the model has no
    /// symbolic input, the size is 0, or the inputs disagree (the symbolic
    /// plan then says what is wrong).
    fn batch_of(&self, values: &[TValue]) -> Option<u64> {
        self.source.as_ref()?;
        let mut batch = None;
        for (spec, v) in self.inputs.iter().zip(values) {
            for (want, &got) in spec.shape.iter().zip(v.shape()) {
                if want.is_none() {
                    match batch {
                        None => batch = Some(got as u64),
                        Some(b) if b == got as u64 => {}
                        Some(_) => return None,
                    }
                }
            }
        }
        batch.filter(|&b| b > 0)
    }

    fn symbolic_plan(&self) -> Result<Plan, ModelError> {
        let Some(source) = &self.source else {
            return Ok(self.first.clone());
        };
        self.symbolic
            .get_or_init(|| source.plan(&self.inputs, None))
            .clone()
            .map_err(ModelError::Run)
    }

    /// The plan for a call of batch `batch` (see the module's header).
    fn plan_for(&self, batch: Option<u64>) -> Result<Plan, ModelError> {
        let (Some(source), Some(batch)) = (&self.source, batch) else {
            return self.symbolic_plan();
        };
        if batch == 1 {
            return Ok(self.first.clone());
        }
        if self.max_plans == 0 {
            return self.symbolic_plan();
        }
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.clock += 1;
            let now = cache.clock;
            if let Some(entry) = cache.plans.iter_mut().find(|(b, _, _)| *b == batch) {
                entry.2 = now;
                return Ok(entry.1.clone());
            }
            if cache.seen.len() >= MAX_COUNTED_SIZES && !cache.seen.contains_key(&batch) {
                cache.seen.clear();
            }
            let seen = cache.seen.entry(batch).or_insert(0);
            *seen += 1;
            if *seen < SPECIALISE_AFTER {
                drop(cache);
                return self.symbolic_plan();
            }
            // This call makes the plan; calls of the same size meanwhile
            // count on (and take the symbolic plan) until it is in.
            cache.seen.remove(&batch);
        }
        let plan = match source.plan(&self.inputs, Some(batch)) {
            Ok(plan) => plan,
            // A plan that cannot be made for this size: the symbolic one serves.
            Err(_) => return self.symbolic_plan(),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.clock += 1;
        let now = cache.clock;
        if !cache.plans.iter().any(|(b, _, _)| *b == batch) {
            if cache.plans.len() >= self.max_plans
                && let Some(oldest) = (0..cache.plans.len()).min_by_key(|&i| cache.plans[i].2)
            {
                cache.plans.swap_remove(oldest);
            }
            cache.plans.push((batch, plan.clone(), now));
        }
        Ok(plan)
    }

    fn run_plan(&self, plan: &Plan, values: TVec<TValue>) -> Result<Vec<Tensor>, ModelError> {
        if Arc::ptr_eq(plan, &self.first) {
            return self.run_first(values);
        }
        let outputs = run_fresh(plan, values)?;
        self.outputs_of(&outputs)
    }

    /// Runs the batch-1 plan in a run state of its own: the slot this
    /// thread last ran in when it is free, else the next free one; a fresh
    /// state when every slot is busy (or states may not be reused).
    fn run_first(&self, values: TVec<TValue>) -> Result<Vec<Tensor>, ModelError> {
        let slots = self.states.len();
        let start = LAST_SLOT.get();
        for i in 0..slots {
            let at = (start + i) % slots;
            let slot = &self.states[at].0;
            let mut state = match slot.try_lock() {
                Ok(state) => state,
                Err(std::sync::TryLockError::WouldBlock) => continue,
                // Nothing panics while a slot is held (runs are
                // `unpanicked`); whatever the state was, it goes.
                Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                    slot.clear_poison();
                    let mut state = poisoned.into_inner();
                    *state = None;
                    state
                }
            };
            LAST_SLOT.set(at);
            let run = match &mut *state {
                Some(state) => unpanicked("running the model", || state.run(values)),
                None => {
                    let mut fresh = self.spawn_state(at)?;
                    let run = unpanicked("running the model", || fresh.run(values));
                    *state = Some(fresh);
                    run
                }
            };
            let outputs = match run {
                Ok(Ok(outputs)) => outputs,
                // The state is dropped: its turn may be half done.
                Ok(Err(e)) => {
                    *state = None;
                    return Err(run_error(e));
                }
                Err(panicked) => {
                    *state = None;
                    return Err(ModelError::Run(panicked));
                }
            };
            drop(state);
            return self.outputs_of(&outputs);
        }
        let outputs = run_fresh(&self.first, values)?;
        self.outputs_of(&outputs)
    }

    /// A run state of the batch-1 plan for slot `slot`: past the first slot
    /// (and for models within [`PRIVATE_CONSTANTS_BUDGET`]), with its own
    /// copies of the plan's constants, so that concurrent runs touch no
    /// reference count in common. tract fills a state's constant values from
    /// the plan on its first run only when none are there yet; they are
    /// filled here the same way (every `Const` node's value), from copies.
    fn spawn_state(&self, slot: usize) -> Result<TypedSimpleState, ModelError> {
        let mut state = self.first.spawn().map_err(run_error)?;
        if slot > 0 && self.private_constants {
            let model = self.first.model();
            let mut values = vec![None; model.nodes().len()];
            for node in model.nodes() {
                if let Some(k) = node.op_as::<tract_onnx::tract_core::ops::konst::Const>() {
                    let copy = Arc::new(k.val().as_ref().clone());
                    values[node.id] = Some(tvec!(TValue::from_const(copy)));
                }
            }
            state.turn_state.values = values;
        }
        Ok(state)
    }

    fn outputs_of(&self, outputs: &[TValue]) -> Result<Vec<Tensor>, ModelError> {
        outputs
            .iter()
            .zip(&self.outputs)
            .map(|(v, spec)| from_tract(v, spec))
            .collect()
    }
}

fn run_error(e: TractError) -> ModelError {
    ModelError::Run(format!("{e:#}"))
}

/// Runs `plan` in a state made for this call.
fn run_fresh(plan: &Plan, values: TVec<TValue>) -> Result<TVec<TValue>, ModelError> {
    unpanicked("running the model", || plan.run(values))
        .map_err(ModelError::Run)?
        .map_err(run_error)
}

/// `f`'s result, or an error saying tract panicked while `what` (a panic
/// in the engine is an error of the request or the load that caused it, not
/// the end of the process; tract-onnx 0.23.9 unwraps a symbolic batch size
/// while optimising a GRU without initial state, for one).
fn unpanicked<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    let outer = CATCHING.replace(true);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.set(outer);
    result.map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        format!("tract panicked while {what}: {message}")
    })
}

thread_local! {
    /// Whether this thread is inside [`unpanicked`]: a panic now becomes an
    /// error of the call, not a crash.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs a panic hook for a program serving models: a panic the runtime
/// catches (inside tract: it becomes that request's `model failed` error and
/// the model keeps serving) goes to `report` (a log line, or nothing where
/// the error reaches the user anyway) instead of the default hook's "thread
/// ... panicked at" report on stderr, which reads like a crash. Any other
/// panic goes to the hook installed before, as it did.
pub fn quiet_caught_panics(report: impl Fn(&str) + Send + Sync + 'static) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !CATCHING.get() {
            return previous(info);
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        match info.location() {
            Some(at) => report(&format!("{message} (at {at})")),
            None => report(&message),
        }
    }));
}

impl Source {
    /// An optimised plan with the batch symbol set to `batch`, or left
    /// symbolic (`None`).
    fn plan(&self, inputs: &[TensorSpec], batch: Option<u64>) -> Result<Plan, String> {
        unpanicked("optimising the model", || {
            self.plan_unguarded(inputs, batch)
        })?
    }

    fn plan_unguarded(&self, inputs: &[TensorSpec], batch: Option<u64>) -> Result<Plan, String> {
        let mut model = self.model.clone();
        let symbol = model.sym(BATCH_SYMBOL);
        for (i, (spec, dt)) in inputs.iter().zip(&self.input_types).enumerate() {
            let dims: TVec<TDim> = spec
                .shape
                .iter()
                .map(|d| match (d, batch) {
                    (Some(v), _) => TDim::from(*v as i64),
                    (None, Some(b)) => TDim::from(b as i64),
                    (None, None) => symbol.clone().into(),
                })
                .collect();
            model = model
                .with_input_fact(i, InferenceFact::dt_shape(*dt, dims))
                .map_err(|e| format!("{e:#}"))?;
        }
        model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| match batch {
                Some(b) => format!("no plan for batch {b}: {e:#}"),
                None => format!("{e:#}"),
            })
    }
}

/// Checks a request tensor against the model's declared input (both engines).
pub(crate) fn check_input(t: &Tensor, spec: &TensorSpec) -> Result<(), ModelError> {
    if t.dtype.name() != spec.dtype {
        return Err(ModelError::BadInput(format!(
            "input `{}` must be {}, got {}",
            spec.name,
            spec.dtype,
            t.dtype.name()
        )));
    }
    if t.shape.len() != spec.shape.len() {
        return Err(ModelError::BadInput(format!(
            "input `{}` must have {} dimensions, got shape {:?}",
            spec.name,
            spec.shape.len(),
            t.shape
        )));
    }
    for (got, want) in t.shape.iter().zip(&spec.shape) {
        if let Some(w) = want
            && got != w
        {
            return Err(ModelError::BadInput(format!(
                "input `{}` must have shape {}, got {:?}",
                spec.name,
                fmt_shape(&spec.shape),
                t.shape
            )));
        }
    }
    Ok(())
}

fn to_tract(t: &Tensor, spec: &TensorSpec) -> Result<tract_onnx::prelude::Tensor, ModelError> {
    check_input(t, spec)?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    if t.dtype == DType::Bool {
        let values: Vec<bool> = t.data.iter().map(|&b| b != 0).collect();
        return tract_onnx::prelude::Tensor::from_shape(&shape, &values)
            .map_err(|e| ModelError::BadInput(e.to_string()));
    }
    // SAFETY: the element types above are plain numbers, valid for any bit
    // pattern; `from_raw_dt` checks the byte length against the shape and
    // copies into an aligned buffer. The guest ABI's little-endian bytes are
    // native ones: a `const` assertion below refuses to build elsewhere.
    unsafe { tract_onnx::prelude::Tensor::from_raw_dt(datum_of(t.dtype), &shape, &t.data) }
        .map_err(|e| ModelError::BadInput(format!("input `{}`: {e}", spec.name)))
}

/// Tensors cross the guest ABI as little-endian bytes and are copied as
/// native ones (above and in [`from_tract`]): a big-endian build would
/// silently swap every number, so it does not compile.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "ferry-runtime copies little-endian tensor bytes as native ones"
);

fn from_tract(v: &TValue, spec: &TensorSpec) -> Result<Tensor, ModelError> {
    let dtype = DType::from_name(&spec.dtype).unwrap_or(DType::F32);
    let cast = v
        .cast_to_dt(datum_of(dtype))
        .map_err(|e| ModelError::Run(format!("output `{}`: {e}", spec.name)))?;
    let data = if dtype == DType::Bool {
        cast.to_plain_array_view::<bool>()
            .map_err(|e| ModelError::Run(e.to_string()))?
            .iter()
            .map(|&b| b as u8)
            .collect()
    } else {
        cast.as_bytes().to_vec()
    };
    Ok(Tensor {
        name: spec.name.clone(),
        dtype,
        shape: cast.shape().iter().map(|&d| d as u64).collect(),
        data,
    })
}

/// Formats a shape with `N` for symbolic dimensions.
pub fn fmt_shape(shape: &[Option<u64>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| {
            d.map(|v| v.to_string())
                .unwrap_or_else(|| BATCH_SYMBOL.into())
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mlp() -> Model {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mlp.onnx");
        Model::load(&std::fs::read(path).unwrap()).unwrap()
    }

    fn input(seed: f32) -> Vec<Tensor> {
        let data: Vec<f32> = (0..4).map(|i| seed + i as f32 / 3.0).collect();
        vec![Tensor::from_f32("input", vec![1, 4], &data)]
    }

    /// The constants a state hands to the ops: `(node, value)`.
    fn constants(state: &TypedSimpleState) -> Vec<(usize, Arc<tract_onnx::prelude::Tensor>)> {
        state
            .turn_state
            .values
            .iter()
            .enumerate()
            .filter_map(|(node, v)| Some((node, v.as_ref()?.first()?.as_arc_tensor()?.clone())))
            .collect()
    }

    /// Each path of `run_first` (the thread's slot, another slot when it is
    /// busy, a fresh state when all are) answers what a fresh state of the
    /// plan answers, and only the first slot's state shares the plan's
    /// constants.
    #[test]
    fn every_run_state_answers_alike_and_only_the_first_shares_constants() {
        let model = mlp();
        assert_eq!(model.states.len(), MAX_RUN_STATES);
        assert!(model.private_constants);
        let want = |seed| {
            let values = model.values(&input(seed)).unwrap();
            model
                .outputs_of(&run_fresh(&model.first, values).unwrap())
                .unwrap()
        };
        // A thread that ran nowhere yet starts at slot 0.
        LAST_SLOT.set(0);
        assert_eq!(model.run(&input(0.5)).unwrap(), want(0.5));
        // Slot 0 busy: the call takes slot 1, which then has its own state.
        let first = model.states[0].0.lock().unwrap();
        assert_eq!(model.run(&input(1.5)).unwrap(), want(1.5));
        assert_eq!(LAST_SLOT.get(), 1);
        {
            let second = model.states[1].0.lock().unwrap();
            let (a, b) = (first.as_ref().unwrap(), second.as_ref().unwrap());
            let (shared, private) = (constants(a), constants(b));
            assert!(!shared.is_empty());
            assert_eq!(
                shared.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
                private.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            );
            for ((node, s), (_, p)) in shared.iter().zip(&private) {
                assert_eq!(s, p, "node {node}: the copy has the same value");
                assert!(!Arc::ptr_eq(s, p), "node {node}: but is a copy");
            }
        }
        // Every slot busy: a state for the call alone, none kept.
        let held: Vec<_> = model.states[1..]
            .iter()
            .map(|s| s.0.lock().unwrap())
            .collect();
        assert_eq!(model.run(&input(2.5)).unwrap(), want(2.5));
        assert!(held[1..].iter().all(|s| s.is_none()));
        drop((first, held));
        // The thread goes back to its slot, whose state answers on.
        assert_eq!(model.run(&input(3.5)).unwrap(), want(3.5));
        assert_eq!(LAST_SLOT.get(), 1);
    }

    /// A failed run drops its state (its turn may be half done); the slot
    /// makes a new one on the next call.
    #[test]
    fn a_failed_run_drops_its_state() {
        let model = mlp();
        LAST_SLOT.set(0);
        assert!(model.run(&input(0.5)).is_ok());
        assert!(model.states[0].0.lock().unwrap().is_some());
        // `Model::run` checks requests before tract sees them; a run that
        // fails in tract is made by handing the state one input too many.
        let mut values = model.values(&input(0.5)).unwrap();
        values.push(values[0].clone());
        assert!(model.run_first(values).is_err());
        assert!(model.states[0].0.lock().unwrap().is_none());
        assert!(model.run(&input(0.5)).is_ok());
        assert!(model.states[0].0.lock().unwrap().is_some());
    }

    /// A panic inside `unpanicked` goes to the reporter, with its message
    /// and where it happened, and becomes the call's error; the hook stays
    /// out of the way of panics nobody catches (they reach the hook that was
    /// there before: here, the test harness's).
    #[test]
    fn a_caught_panic_goes_to_the_reporter_not_to_stderr() {
        static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        super::quiet_caught_panics(|p| SEEN.lock().unwrap().push(p.to_string()));
        let err = super::unpanicked("testing", || -> u8 { panic!("a planted panic") }).unwrap_err();
        assert_eq!(err, "tract panicked while testing: a planted panic");
        let seen = SEEN.lock().unwrap().clone();
        assert!(
            seen.iter()
                .any(|p| p.starts_with("a planted panic (at runtime/src/model.rs:")),
            "{seen:?}"
        );
        // Outside `unpanicked`, the reporter is not called.
        let before = SEEN.lock().unwrap().len();
        assert!(std::panic::catch_unwind(|| panic!("not caught by the runtime")).is_err());
        assert_eq!(SEEN.lock().unwrap().len(), before);
    }

    /// `describe` steps over the weights; it must read the interface
    /// exactly as the full decoding `Model::load` uses, on every model the
    /// repository has (scikit-learn and PyTorch exports, opset 6, a GRU,
    /// sequences, initializers listed as inputs or not), and refuse what is
    /// not ONNX.
    #[test]
    fn describe_reads_what_loading_reads() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files: Vec<std::path::PathBuf> =
            ["examples/iris/model.onnx", "examples/digits/model.onnx"]
                .iter()
                .map(|f| root.join(f))
                .collect();
        for entry in std::fs::read_dir(root.join("runtime/tests/fixtures")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "onnx") {
                files.push(path);
            }
        }
        assert!(files.len() >= 9, "{files:?}");
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            let full = super::declared(&bytes).unwrap();
            let opset = full
                .proto
                .opset_import
                .iter()
                .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
                .map(|o| o.version);
            let described = super::describe(&bytes).unwrap();
            assert_eq!(described.inputs, full.inputs, "{}", file.display());
            let carried: Vec<_> = full
                .outputs
                .iter()
                .filter(|(_, c)| *c)
                .map(|(s, _)| s.clone())
                .collect();
            assert_eq!(described.outputs, carried, "{}", file.display());
            assert_eq!(described.opset, opset, "{}", file.display());
            assert!(opset.is_some(), "{}", file.display());
        }
        for garbage in [&b"not a model"[..], &[0xff; 64][..], &[][..]] {
            assert!(super::describe(garbage).is_err());
        }
    }
}
