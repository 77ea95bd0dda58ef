//! Model execution. The only module that names tract types.
//!
//! Loading: parse the ONNX protobuf, read each input's declared element type
//! and shape (unknown or named dimensions become the symbolic batch
//! dimension `N`), refuse operators tract does not implement with their
//! names, then optimise once into a runnable plan. Running is `&self` and
//! allocation-light, so one [`Model`] serves many threads.

use std::sync::Arc;

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

type Plan = Arc<TypedRunnableModel>;

/// A loaded, optimised model.
pub struct Model {
    plan: Plan,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    dropped_outputs: Vec<String>,
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

impl Model {
    /// Loads and optimises an ONNX model.
    pub fn load(onnx_bytes: &[u8]) -> Result<Model, ModelError> {
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(&mut &onnx_bytes[..])
            .map_err(|e| ModelError::Load(format!("not a valid ONNX model: {e}")))?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| ModelError::Load("ONNX model has no graph".into()))?;
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let mut inputs = Vec::new();
        let mut input_types = Vec::new();
        for vi in graph
            .input
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
        let all_outputs = graph
            .output
            .iter()
            .map(|vi| spec_of(vi, "output"))
            .collect::<Result<Vec<_>, _>>()?;

        let mut model = onnx
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
        for ((spec, dt), outlet) in all_outputs.into_iter().zip(model.outputs.clone()) {
            if dt.is_some() {
                outputs.push(spec);
                keep.push(outlet);
            } else {
                dropped_outputs.push(format!("{} ({})", spec.name, spec.dtype));
            }
        }
        if outputs.is_empty() {
            return Err(ModelError::Load(format!(
                "no model output has a supported element type (f32 f64 i64 i32 u8 bool): {}",
                dropped_outputs.join(", ")
            )));
        }
        model
            .select_output_outlets(&keep)
            .map_err(|e| ModelError::Load(format!("{e:#}")))?;
        let batch = model.sym(BATCH_SYMBOL);
        for (i, (spec, dt)) in inputs.iter().zip(&input_types).enumerate() {
            let dims: TVec<TDim> = spec
                .shape
                .iter()
                .map(|d| {
                    d.map(|v| TDim::from(v as i64))
                        .unwrap_or_else(|| batch.clone().into())
                })
                .collect();
            model = model
                .with_input_fact(i, InferenceFact::dt_shape(*dt, dims))
                .map_err(|e| ModelError::Load(format!("{e:#}")))?;
        }
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| ModelError::Load(format!("{e:#}")))?;
        Ok(Model {
            plan,
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

    /// Runs the model. `tensors` must hold every input, by name.
    pub fn run(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
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
        let outputs = self
            .plan
            .run(values)
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        outputs
            .iter()
            .zip(&self.outputs)
            .map(|(v, spec)| from_tract(v, spec))
            .collect()
    }
}

fn to_tract(t: &Tensor, spec: &TensorSpec) -> Result<tract_onnx::prelude::Tensor, ModelError> {
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
