//! A small typed builder over the ONNX protos (crate `onnx-protobuf`, IR 10, opset 21).
//!
//! Every value of a graph being built is a [`Value`]: its name, element type and rank where known. Nodes
//! are wired through [`Builder::op`], which checks the operand dtypes of the ops the graphs use (one
//! small table of rules, `infer`) and gives the output its dtype and rank, so a mistake such as adding
//! an fp16 activation to an fp32 one is an [`ExportError::Graph`] naming the node when the graph is
//! built, not a load failure in ONNX Runtime. An op without a rule is refused; contrib ops state their
//! outputs at the call site ([`Builder::op_ms`]).
//!
//! Names follow the official checkpoint keys through one scope: `b.pp("layers.3").pp("attention")`
//! reads `layers.3.attention.wqkv.weight` with `.w("wqkv", ..)`, and names the nodes it wires
//! `layers.3.attention/MatMul_17`, so an error or a profile points at the layer.
//!
//! Graph inputs and outputs are declared with a dtype, a shape whose first axis may be the symbolic
//! `batch`, and a meaning that also goes into the manifest. Checkpoint weights are not embedded:
//! [`WeightFile`] appends each one once (in the export dtype, optionally transposed) to a single
//! external-data file that every graph of an export references by offset, so `ar_prefill` and `ar_step`
//! share their transformer weights on disk and no `.onnx` file comes near protobuf's 2 GB limit, whatever
//! the model size. Derived constants (RoPE tables, masks, frequencies) are small and inline.
//!
//! Tools that rewrite an export (the `calibration` crate) use the same pieces rather than their own:
//! [`read_model`]/[`write_model`], [`external_ref`]/[`external_tensor`] for the external-data entries,
//! [`ExternalDataWriter`] for a new weights file, and [`initializer_bytes`] for the weight bytes a graph
//! reads per call (which the manifest records per graph).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::{DataLocation, DataType};
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{self, Value as TypeValue};
use onnx_protobuf::{
    AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use protobuf::Enum;
use spherear_core::manifest::{Dim as ManifestDim, TensorDType};

use crate::checkpoint::{Checkpoint, Tensor};
use crate::error::{io_err, ExportError, Result};

/// ONNX IR version written (IR 10 = ONNX 1.16+; read by ONNX Runtime ≥ 1.17 and TensorRT 10).
pub const IR_VERSION: i64 = 10;
/// Default-domain opset written.
pub const OPSET: i64 = 21;

/// Element types of the graphs' values. Graph inputs, outputs and weights use the first three (the
/// manifest's dtypes); `Int32` (GroupQueryAttention's lengths) and `Bool` (comparisons) occur only inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Float32,
    Float16,
    Int64,
    Int32,
    Bool,
}

impl DType {
    pub(crate) fn onnx(self) -> DataType {
        match self {
            DType::Float32 => DataType::FLOAT,
            DType::Float16 => DataType::FLOAT16,
            DType::Int64 => DataType::INT64,
            DType::Int32 => DataType::INT32,
            DType::Bool => DataType::BOOL,
        }
    }
    /// The dtype of ONNX `TensorProto.DataType` code `code` (a `Cast`'s `to`), if it is one of ours.
    pub fn from_onnx(code: i64) -> Option<DType> {
        [DType::Float32, DType::Float16, DType::Int64, DType::Int32, DType::Bool]
            .into_iter()
            .find(|d| d.onnx() as i64 == code)
    }
    pub fn size(self) -> usize {
        match self {
            DType::Float32 | DType::Int32 => 4,
            DType::Float16 => 2,
            DType::Int64 => 8,
            DType::Bool => 1,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::Float32 | DType::Float16)
    }
    /// Little-endian bytes of `data` in this dtype (integers truncate, bool is `v != 0`).
    fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
            DType::Float16 => data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            DType::Int64 => data.iter().flat_map(|v| (*v as i64).to_le_bytes()).collect(),
            DType::Float32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::Int32 => data.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect(),
            DType::Bool => data.iter().map(|v| u8::from(*v != 0.0)).collect(),
        }
    }
    /// The manifest's name of this dtype, `None` for the two that never are a graph input or output.
    fn io(self) -> Option<TensorDType> {
        match self {
            DType::Float32 => Some(TensorDType::Float32),
            DType::Float16 => Some(TensorDType::Float16),
            DType::Int64 => Some(TensorDType::Int64),
            DType::Int32 | DType::Bool => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::Float32 => "float32",
            DType::Float16 => "float16",
            DType::Int64 => "int64",
            DType::Int32 => "int32",
            DType::Bool => "bool",
        })
    }
}

/// One axis of a declared shape: the symbolic batch or a fixed size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Sym(&'static str),
    N(usize),
}

/// The symbolic batch axis.
pub const BATCH: Dim = Dim::Sym("batch");

/// A graph input or output as the manifest describes it (core's type, the one every reader uses).
pub use spherear_core::manifest::IoSpec;

impl Dim {
    /// The manifest's form of this axis.
    pub fn manifest(&self) -> ManifestDim {
        match self {
            Dim::Sym(s) => ManifestDim::Sym(s.to_string()),
            Dim::N(n) => ManifestDim::N(*n),
        }
    }
}

fn spec(name: &str, dtype: TensorDType, shape: &[Dim], meaning: &str) -> IoSpec {
    IoSpec { name: name.into(), dtype, shape: shape.iter().map(Dim::manifest).collect(), meaning: meaning.into() }
}

/// A value of the graph being built: a graph input, constant, weight or node output, with its element
/// type and, where known, its rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub name: String,
    pub dtype: DType,
    pub rank: Option<usize>,
}

impl Value {
    pub fn new(name: impl Into<String>, dtype: DType, rank: Option<usize>) -> Self {
        Value { name: name.into(), dtype, rank }
    }
    /// `Ok` when this value is of `dtype`, else an error naming `context` (a node or an input slot).
    pub fn expect(&self, dtype: DType, context: &str) -> Result<()> {
        if self.dtype == dtype {
            Ok(())
        } else {
            Err(ExportError::Graph(format!("{context}: {self} where {dtype} is required")))
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank {
            Some(r) => write!(f, "'{}' ({}, rank {r})", self.name, self.dtype),
            None => write!(f, "'{}' ({})", self.name, self.dtype),
        }
    }
}

/// How a checkpoint tensor is laid out in the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// As stored.
    AsIs,
    /// A 2-D `[out, in]` linear weight transposed to `[in, out]` for `MatMul`.
    Transposed,
    /// A 1-D per-channel vector `[C]` viewed as `[C, 1, 1]` (broadcasts over NCHW).
    Channel,
}

/// Where [`WeightFile`] reads the weights it writes: a model checkpoint or a judge checkpoint.
pub trait WeightSource {
    /// The f32 tensor `key`, or an error naming it.
    fn tensor(&self, key: &str) -> Result<&Tensor>;
}

impl WeightSource for Checkpoint {
    fn tensor(&self, key: &str) -> Result<&Tensor> {
        Checkpoint::tensor(self, key)
    }
}

/// Where an initializer's bytes are in an external-data file (ONNX `external_data` entries `location`,
/// `offset`, `length`; the location is relative to the `.onnx` file's folder).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExternalRef {
    pub location: String,
    pub offset: u64,
    pub length: u64,
}

/// An initializer of `data_type` and `dims` whose bytes are at `r` in an external-data file.
pub fn external_tensor(name: &str, dims: Vec<i64>, data_type: DataType, r: &ExternalRef) -> TensorProto {
    let entry = |k: &str, v: String| StringStringEntryProto { key: k.into(), value: v, ..Default::default() };
    TensorProto {
        name: name.to_string(),
        dims,
        data_type: data_type as i32,
        data_location: DataLocation::EXTERNAL.into(),
        external_data: vec![
            entry("location", r.location.clone()),
            entry("offset", r.offset.to_string()),
            entry("length", r.length.to_string()),
        ],
        ..Default::default()
    }
}

/// Where `t`'s bytes are when it is stored as external data (`None` for an inline tensor). Entries other
/// than location/offset/length (e.g. a checksum) are refused, as are a missing location or length.
pub fn external_ref(t: &TensorProto) -> Result<Option<ExternalRef>> {
    if t.data_location.enum_value_or_default() != DataLocation::EXTERNAL {
        return Ok(None);
    }
    let bad = |m: String| ExportError::Graph(format!("initializer {}: {m}", t.name));
    let (mut location, mut offset, mut length) = (None, 0u64, None);
    for e in &t.external_data {
        let num = |v: &str| v.parse::<u64>().map_err(|_| bad(format!("external-data {} '{v}' is not a number", e.key)));
        match e.key.as_str() {
            "location" => location = Some(e.value.clone()),
            "offset" => offset = num(&e.value)?,
            "length" => length = Some(num(&e.value)?),
            other => return Err(bad(format!("unsupported external-data entry '{other}'"))),
        }
    }
    let location = location.ok_or_else(|| bad("external data without a location".into()))?;
    let length = length.ok_or_else(|| bad("external data without a length".into()))?;
    Ok(Some(ExternalRef { location, offset, length }))
}

/// Bytes of an element of ONNX `data_type` (int4/uint4 count as one: see [`tensor_bytes`]); 0 if unknown.
fn elem_bytes(data_type: i32) -> u64 {
    match DataType::from_i32(data_type) {
        Some(DataType::FLOAT | DataType::INT32 | DataType::UINT32) => 4,
        Some(DataType::FLOAT16 | DataType::BFLOAT16 | DataType::INT16 | DataType::UINT16) => 2,
        Some(DataType::DOUBLE | DataType::INT64 | DataType::UINT64) => 8,
        Some(DataType::UINT8 | DataType::INT8 | DataType::BOOL | DataType::INT4 | DataType::UINT4) => 1,
        _ => 0,
    }
}

/// Stored bytes of an initializer: its external-data length, its raw data, or elements × element size.
pub fn tensor_bytes(t: &TensorProto) -> u64 {
    if let Ok(Some(r)) = external_ref(t) {
        return r.length;
    }
    if !t.raw_data.is_empty() {
        return t.raw_data.len() as u64;
    }
    let n: u64 = t.dims.iter().map(|&d| d.max(0) as u64).product();
    match DataType::from_i32(t.data_type) {
        Some(DataType::INT4 | DataType::UINT4) => n.div_ceil(2),
        _ => n * elem_bytes(t.data_type),
    }
}

/// Weight bytes of a graph per call: `(weights, lookups)`. `lookups` are the initializers used only as
/// the table (input 0) of `Gather` nodes — embedding rows, RoPE rows: a call reads only the rows it looks
/// up; `weights` are all other initializers, read whole by every call. Each initializer counts once
/// however many nodes use it; initializers no node uses count nowhere.
pub fn initializer_bytes(nodes: &[NodeProto], inits: &[TensorProto]) -> (u64, u64) {
    let mut whole: HashSet<&str> = HashSet::new();
    let mut table: HashSet<&str> = HashSet::new();
    for n in nodes {
        for (i, input) in n.input.iter().enumerate() {
            if n.op_type == "Gather" && n.domain.is_empty() && i == 0 {
                table.insert(input);
            } else {
                whole.insert(input);
            }
        }
    }
    let (mut weights, mut lookups) = (0, 0);
    for t in inits {
        if whole.contains(t.name.as_str()) {
            weights += tensor_bytes(t);
        } else if table.contains(t.name.as_str()) {
            lookups += tensor_bytes(t);
        }
    }
    (weights, lookups)
}

/// Reads and parses an `.onnx` file (external data is not loaded: see [`external_ref`]).
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(io_err(format!("cannot read {}", path.display())))?;
    ModelProto::parse_from_bytes(&bytes)
        .map_err(|e| ExportError::Graph(format!("{} is not a valid ONNX model: {e}", path.display())))
}

/// Serialises `model` to `path`.
pub fn write_model(model: &ModelProto, path: &Path) -> Result<()> {
    let what = path.display();
    let bytes = model.write_to_bytes().map_err(|e| ExportError::Graph(format!("cannot serialise {what}: {e}")))?;
    std::fs::write(path, bytes).map_err(io_err(format!("cannot write {what}")))
}

/// An external-data file being written: byte blocks are appended and located by [`ExternalRef`]s.
pub struct ExternalDataWriter {
    file_name: String,
    path: PathBuf,
    out: BufWriter<File>,
    offset: u64,
}

impl ExternalDataWriter {
    /// Creates `dir/file_name` (the `location` every [`ExternalRef`] it returns names).
    pub fn create(dir: &Path, file_name: &str) -> Result<Self> {
        let path = dir.join(file_name);
        let out = BufWriter::new(File::create(&path).map_err(io_err(format!("cannot create {}", path.display())))?);
        Ok(ExternalDataWriter { file_name: file_name.to_string(), path, out, offset: 0 })
    }
    /// Appends `bytes`, returning where they are.
    pub fn append(&mut self, bytes: &[u8]) -> Result<ExternalRef> {
        self.out.write_all(bytes).map_err(io_err(format!("cannot write {}", self.path.display())))?;
        let r = ExternalRef { location: self.file_name.clone(), offset: self.offset, length: bytes.len() as u64 };
        self.offset += bytes.len() as u64;
        Ok(r)
    }
    pub fn file_name(&self) -> &str {
        &self.file_name
    }
    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.offset
    }
    /// Flushes and syncs the file.
    pub fn finish(mut self) -> Result<()> {
        let what = format!("cannot write {}", self.path.display());
        self.out.flush().map_err(io_err(&what))?;
        self.out.get_ref().sync_all().map_err(io_err(&what))
    }
}

/// The external-data file that receives every checkpoint weight used by the graphs, once.
pub struct WeightFile<'c> {
    ckpt: &'c dyn WeightSource,
    dtype: DType,
    data: ExternalDataWriter,
    parameters: usize,
    placed: HashMap<(String, Layout), (Vec<i64>, ExternalRef)>,
}

impl<'c> WeightFile<'c> {
    /// Creates `dir/file_name`; weights are converted to `dtype` (float32 or float16) as they are written.
    pub fn create(ckpt: &'c dyn WeightSource, dir: &Path, file_name: &str, dtype: DType) -> Result<Self> {
        if !dtype.is_float() {
            return Err(ExportError::Graph(format!("weights cannot be stored as {dtype}")));
        }
        let data = ExternalDataWriter::create(dir, file_name)?;
        Ok(WeightFile { ckpt, dtype, data, parameters: 0, placed: HashMap::new() })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Scalars written so far.
    pub fn parameters(&self) -> usize {
        self.parameters
    }
    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.data.bytes()
    }

    /// Flushes and syncs the file.
    pub fn finish(self) -> Result<()> {
        self.data.finish()
    }

    /// Dims and location of `key` in `layout`, writing it on first use.
    fn place(&mut self, key: &str, layout: Layout) -> Result<(Vec<i64>, ExternalRef)> {
        if let Some(p) = self.placed.get(&(key.to_string(), layout)) {
            return Ok(p.clone());
        }
        let t = self.ckpt.tensor(key)?;
        let (dims, data): (Vec<usize>, std::borrow::Cow<[f32]>) = match (layout, t.shape.as_slice()) {
            (Layout::AsIs, s) => (s.to_vec(), t.data.as_slice().into()),
            (Layout::Channel, &[c]) => (vec![c, 1, 1], t.data.as_slice().into()),
            (Layout::Transposed, &[o, i]) => {
                let mut tr = vec![0f32; o * i];
                for (r, row) in t.data.chunks_exact(i).enumerate() {
                    for (c, v) in row.iter().enumerate() {
                        tr[c * o + r] = *v;
                    }
                }
                (vec![i, o], tr.into())
            }
            (l, s) => return Err(ExportError::Graph(format!("{key}: layout {l:?} does not apply to shape {s:?}"))),
        };
        let bytes = self.dtype.encode(&data);
        let placed = (dims.iter().map(|&d| d as i64).collect(), self.data.append(&bytes)?);
        // A weight used in two layouts would be stored twice; no graph does that, and the byte-count test
        // would catch it.
        self.parameters += data.len();
        self.placed.insert((key.to_string(), layout), placed.clone());
        Ok(placed)
    }
}

fn attr(name: &str, ty: AttributeType) -> AttributeProto {
    AttributeProto { name: name.to_string(), type_: ty.into(), ..Default::default() }
}
/// Integer attribute.
pub fn ai(name: &str, v: i64) -> AttributeProto {
    AttributeProto { i: v, ..attr(name, AttributeType::INT) }
}
/// Float attribute.
pub fn af(name: &str, v: f32) -> AttributeProto {
    AttributeProto { f: v, ..attr(name, AttributeType::FLOAT) }
}
/// Integer-list attribute.
pub fn ais(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { ints: v.to_vec(), ..attr(name, AttributeType::INTS) }
}

/// A graph input/output declaration of `dtype` and `shape`.
pub fn value_info(name: &str, dtype: DType, shape: &[Dim]) -> ValueInfoProto {
    let dim = shape
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Sym(s) => dimension::Value::DimParam(s.to_string()),
                Dim::N(n) => dimension::Value::DimValue(*n as i64),
            }),
            ..Default::default()
        })
        .collect();
    let tensor = type_proto::Tensor {
        elem_type: dtype.onnx() as i32,
        shape: Some(TensorShapeProto { dim, ..Default::default() }).into(),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.to_string(),
        type_: Some(TypeProto { value: Some(TypeValue::TensorType(tensor)), ..Default::default() }).into(),
        ..Default::default()
    }
}

fn attr_int(attrs: &[AttributeProto], name: &str) -> Option<i64> {
    attrs.iter().find(|a| a.name == name).map(|a| a.i)
}
fn attr_ints<'a>(attrs: &'a [AttributeProto], name: &str) -> Option<&'a [i64]> {
    attrs.iter().find(|a| a.name == name).map(|a| a.ints.as_slice())
}

type Rule = std::result::Result<(DType, Option<usize>), String>;

/// The builder's type rules: the output dtype and rank (where it follows from the operands' ranks) of
/// default-domain `op` on `ins`, after checking the operand dtypes it relies on. Ops missing here are
/// refused; contrib ops go through [`Builder::op_ms`]. Not a full ONNX type checker: what an op allows
/// beyond what these graphs use (e.g. int32 indices for ScatterND) is refused too.
fn infer(op: &str, ins: &[&Value], attrs: &[AttributeProto]) -> Rule {
    let n = ins.len();
    let arity = |want: usize| if n == want { Ok(()) } else { Err(format!("takes {want} inputs, got {n}")) };
    // Operands that must share one dtype (the first one's).
    let same = |vs: &[&Value]| match vs.iter().find(|v| v.dtype != vs[0].dtype) {
        None => Ok(vs[0].dtype),
        Some(v) => Err(format!("operands {} and {v} differ in dtype", vs[0])),
    };
    let is =
        |v: &Value, d: DType, slot: &str| if v.dtype == d { Ok(()) } else { Err(format!("{slot} {v} must be {d}")) };
    let int64s = |vs: &[&Value]| vs.iter().try_for_each(|v| is(v, DType::Int64, "operand"));
    // Rank of an elementwise result under broadcasting.
    let bcast = ins.iter().try_fold(0, |m, v| Some(m.max(v.rank?)));
    let x = *ins.first().ok_or("has no inputs")?;
    Ok(match op {
        "Add" | "Sub" | "Mul" | "Div" => {
            arity(2)?;
            (same(ins)?, bcast)
        }
        "MatMul" => {
            arity(2)?;
            (same(ins)?, bcast.filter(|_| ins.iter().all(|v| v.rank.is_some_and(|r| r >= 2))))
        }
        "Greater" => {
            arity(2)?;
            same(ins)?;
            (DType::Bool, bcast)
        }
        "Where" => {
            arity(3)?;
            is(x, DType::Bool, "condition")?;
            (same(&ins[1..])?, bcast)
        }
        "Identity" | "Sigmoid" | "Sqrt" | "Cos" | "Sin" | "Relu" | "Softmax" | "MaxPool" => {
            arity(1)?;
            (x.dtype, x.rank)
        }
        "Clip" | "Conv" | "ConvTranspose" | "LayerNormalization" | "InstanceNormalization" | "Concat" => {
            (same(ins)?, x.rank)
        }
        "Gemm" => (same(ins)?, Some(2)),
        "Flatten" => {
            arity(1)?;
            (x.dtype, Some(2))
        }
        "Cast" => {
            arity(1)?;
            let to = attr_int(attrs, "to").ok_or("has no `to` attribute")?;
            (DType::from_onnx(to).ok_or(format!("casts to ONNX type {to}, which the builder does not know"))?, x.rank)
        }
        "Shape" => {
            arity(1)?;
            (DType::Int64, Some(1))
        }
        "Gather" => {
            arity(2)?;
            if !matches!(ins[1].dtype, DType::Int64 | DType::Int32) {
                return Err(format!("indices {} must be int64 or int32", ins[1]));
            }
            (x.dtype, x.rank.zip(ins[1].rank).map(|(r, i)| r.saturating_sub(1) + i))
        }
        // The result's rank depends on the shape's contents: see Builder::reshape/unsqueeze.
        "Reshape" | "Expand" | "Unsqueeze" => {
            arity(2)?;
            int64s(&ins[1..])?;
            (x.dtype, None)
        }
        "Transpose" => {
            arity(1)?;
            let perm = attr_ints(attrs, "perm").ok_or("has no `perm` attribute")?;
            if let Some(r) = x.rank.filter(|&r| r != perm.len()) {
                return Err(format!("perm {perm:?} does not fit operand {x} of rank {r}"));
            }
            (x.dtype, Some(perm.len()))
        }
        "Split" | "Pad" | "Slice" => {
            int64s(&ins[1..])?;
            (x.dtype, x.rank)
        }
        "ReduceMean" | "ReduceMax" => {
            int64s(&ins[1..])?;
            let keep = attr_int(attrs, "keepdims").unwrap_or(1) != 0;
            (x.dtype, x.rank.filter(|_| keep))
        }
        "Range" => {
            arity(3)?;
            (same(ins)?, Some(1))
        }
        "ScatterND" => {
            arity(3)?;
            is(ins[1], DType::Int64, "indices")?;
            (same(&[x, ins[2]])?, x.rank)
        }
        _ => return Err(format!("{op} has no dtype rule in the graph builder (add one to `infer`)")),
    })
}

/// Builds one graph. Weights and activations are in the export dtype [`Builder::act`] (fp32, or fp16
/// with fp32 islands). Ops, weights and constants are named below the current scope ([`Builder::pp`]).
pub struct Builder<'w, 'c> {
    weights: &'w mut WeightFile<'c>,
    scope: String,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    placed: HashMap<String, Value>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    pub input_specs: Vec<IoSpec>,
    pub output_specs: Vec<IoSpec>,
    memo: HashMap<String, Value>,
    next: usize,
}

/// A [`Builder`] below a scope (see [`Builder::pp`]); the scope ends when this guard is dropped.
pub struct Scope<'s, 'w, 'c> {
    b: &'s mut Builder<'w, 'c>,
    restore: usize,
}

impl<'w, 'c> Deref for Scope<'_, 'w, 'c> {
    type Target = Builder<'w, 'c>;
    fn deref(&self) -> &Builder<'w, 'c> {
        self.b
    }
}
impl<'w, 'c> DerefMut for Scope<'_, 'w, 'c> {
    fn deref_mut(&mut self) -> &mut Builder<'w, 'c> {
        self.b
    }
}
impl Drop for Scope<'_, '_, '_> {
    fn drop(&mut self) {
        self.b.scope.truncate(self.restore);
    }
}

impl<'w, 'c> Builder<'w, 'c> {
    pub fn new(weights: &'w mut WeightFile<'c>) -> Self {
        Builder {
            weights,
            scope: String::new(),
            nodes: Vec::new(),
            inits: Vec::new(),
            placed: HashMap::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            input_specs: Vec::new(),
            output_specs: Vec::new(),
            memo: HashMap::new(),
            next: 0,
        }
    }

    /// The activation and weight dtype of this export.
    pub fn act(&self) -> DType {
        self.weights.dtype()
    }

    /// The builder one scope further down, like the official module paths: weights are read and nodes
    /// named below `name` (which may hold dots, e.g. `layers.3`) until the guard is dropped.
    pub fn pp(&mut self, name: impl fmt::Display) -> Scope<'_, 'w, 'c> {
        let restore = self.scope.len();
        if !self.scope.is_empty() {
            self.scope.push('.');
        }
        self.scope.push_str(&name.to_string());
        Scope { b: self, restore }
    }

    /// The current scope (`""` at the root).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// A new name `scope/label_N`, unique in the graph.
    fn fresh(&mut self, label: &str) -> String {
        self.next += 1;
        match self.scope.as_str() {
            "" => format!("{label}_{}", self.next),
            s => format!("{s}/{label}_{}", self.next),
        }
    }

    /// A fresh value of a stated dtype and rank, for the outputs of [`Builder::op_ms`].
    pub fn fresh_value(&mut self, label: &str, dtype: DType, rank: Option<usize>) -> Value {
        Value::new(self.fresh(label), dtype, rank)
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, dtype: DType, shape: Vec<Dim>, meaning: &str) -> Result<Value> {
        let io = dtype.io().ok_or_else(|| ExportError::Graph(format!("graph input {name}: {dtype} is not allowed")))?;
        self.inputs.push(value_info(name, dtype, &shape));
        self.input_specs.push(spec(name, io, &shape, meaning));
        Ok(Value::new(name, dtype, Some(shape.len())))
    }

    /// Declares `value` as the graph output `name` (an `Identity` renames it when its name differs).
    /// Its dtype must be `dtype` and its rank, where known, that of `shape`.
    pub fn output(&mut self, value: &Value, name: &str, dtype: DType, shape: Vec<Dim>, meaning: &str) -> Result<()> {
        let what = format!("graph output {name}");
        value.expect(dtype, &what)?;
        let io = dtype.io().ok_or_else(|| ExportError::Graph(format!("{what}: {dtype} is not allowed")))?;
        if let Some(r) = value.rank.filter(|&r| r != shape.len()) {
            return Err(ExportError::Graph(format!(
                "{what}: {value} has rank {r} but {} axes are declared",
                shape.len()
            )));
        }
        if value.name != name {
            self.op_to("Identity", &[value], vec![], name)?;
        }
        self.outputs.push(value_info(name, dtype, &shape));
        self.output_specs.push(spec(name, io, &shape, meaning));
        Ok(())
    }

    /// A default-domain node, type-checked by [`infer`]'s rules; `out` names its single output, else its
    /// `n` outputs get fresh names.
    fn node(
        &mut self,
        op: &str,
        ins: &[&Value],
        attrs: Vec<AttributeProto>,
        out: Option<&str>,
        n: usize,
    ) -> Result<Vec<Value>> {
        let name = self.fresh(op);
        let (dtype, rank) = infer(op, ins, &attrs).map_err(|e| ExportError::Graph(format!("node {name}: {e}")))?;
        let outs: Vec<String> = match (out, n) {
            (Some(o), _) => vec![o.to_string()],
            (None, 1) => vec![name.clone()],
            (None, n) => (0..n).map(|j| format!("{name}_out{j}")).collect(),
        };
        self.nodes.push(NodeProto {
            input: ins.iter().map(|v| v.name.clone()).collect(),
            output: outs.clone(),
            name,
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        });
        Ok(outs.into_iter().map(|o| Value::new(o, dtype, rank)).collect())
    }

    /// A node with one fresh output.
    pub fn op(&mut self, op: &str, ins: &[&Value], attrs: Vec<AttributeProto>) -> Result<Value> {
        Ok(self.node(op, ins, attrs, None, 1)?.remove(0))
    }

    /// A node with one output named `out` (a graph output's name).
    pub fn op_to(&mut self, op: &str, ins: &[&Value], attrs: Vec<AttributeProto>, out: &str) -> Result<Value> {
        Ok(self.node(op, ins, attrs, Some(out), 1)?.remove(0))
    }

    /// A `com.microsoft` contrib node. These have no rule in the builder: the call site checks the operand
    /// dtypes it relies on and states each output's dtype and rank in `outs`.
    pub fn op_ms(&mut self, op: &str, ins: &[&Value], attrs: Vec<AttributeProto>, outs: &[&Value]) {
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: ins.iter().map(|v| v.name.clone()).collect(),
            output: outs.iter().map(|v| v.name.clone()).collect(),
            name,
            op_type: op.to_string(),
            domain: MS_DOMAIN.into(),
            attribute: attrs,
            ..Default::default()
        });
    }

    pub fn add(&mut self, x: &Value, y: &Value) -> Result<Value> {
        self.op("Add", &[x, y], vec![])
    }
    pub fn sub(&mut self, x: &Value, y: &Value) -> Result<Value> {
        self.op("Sub", &[x, y], vec![])
    }
    pub fn mul(&mut self, x: &Value, y: &Value) -> Result<Value> {
        self.op("Mul", &[x, y], vec![])
    }
    pub fn div(&mut self, x: &Value, y: &Value) -> Result<Value> {
        self.op("Div", &[x, y], vec![])
    }
    pub fn matmul(&mut self, x: &Value, y: &Value) -> Result<Value> {
        self.op("MatMul", &[x, y], vec![])
    }
    /// `x` converted to `to`.
    pub fn cast(&mut self, x: &Value, to: DType) -> Result<Value> {
        self.op("Cast", &[x], vec![ai("to", to.onnx() as i64)])
    }
    /// `x` reshaped to `shape` (ONNX semantics: 0 keeps the axis, -1 is inferred).
    pub fn reshape(&mut self, x: &Value, shape: &[i64]) -> Result<Value> {
        let s = self.c_i64(&[shape.len()], shape);
        let y = self.op("Reshape", &[x, &s], vec![])?;
        Ok(Value { rank: Some(shape.len()), ..y })
    }
    /// `x` with new axes of size 1 at `axes`.
    pub fn unsqueeze(&mut self, x: &Value, axes: &[i64]) -> Result<Value> {
        let a = self.c_i64(&[axes.len()], axes);
        let y = self.op("Unsqueeze", &[x, &a], vec![])?;
        Ok(Value { rank: x.rank.map(|r| r + axes.len()), ..y })
    }
    pub fn transpose(&mut self, x: &Value, perm: &[i64]) -> Result<Value> {
        self.op("Transpose", &[x], vec![ais("perm", perm)])
    }
    /// `x` split along its last axis into parts of `sizes`.
    pub fn split(&mut self, x: &Value, sizes: &[usize]) -> Result<Vec<Value>> {
        let s: Vec<i64> = sizes.iter().map(|&v| v as i64).collect();
        let sc = self.c_i64(&[s.len()], &s);
        self.node("Split", &[x, &sc], vec![ai("axis", -1)], None, sizes.len())
    }

    fn constant(&mut self, dtype: DType, dims: &[usize], raw_data: Vec<u8>) -> Value {
        let name = self.fresh("const");
        self.inits.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dtype.onnx() as i32,
            raw_data,
            ..Default::default()
        });
        Value::new(name, dtype, Some(dims.len()))
    }

    /// A constant in the activation dtype.
    pub fn c_act(&mut self, dims: &[usize], data: &[f32]) -> Value {
        let act = self.act();
        self.constant(act, dims, act.encode(data))
    }
    /// An fp32 constant.
    pub fn c_f32(&mut self, dims: &[usize], data: &[f32]) -> Value {
        self.constant(DType::Float32, dims, DType::Float32.encode(data))
    }
    /// An int64 constant.
    pub fn c_i64(&mut self, dims: &[usize], data: &[i64]) -> Value {
        self.constant(DType::Int64, dims, data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// A constant built once per graph under `label` (named at the root scope: layers share it).
    pub fn memo(&mut self, label: &str, make: impl FnOnce(&mut Self) -> Value) -> Value {
        if let Some(v) = self.memo.get(label) {
            return v.clone();
        }
        let scope = std::mem::take(&mut self.scope);
        let v = make(self);
        self.scope = scope;
        self.memo.insert(label.to_string(), v.clone());
        v
    }

    /// The checkpoint tensor `scope.name` in `layout`, as an external-data initializer of the export dtype
    /// (named after the key: `key`, `key.T` transposed, `key.C11` per channel).
    pub fn get(&mut self, name: &str, layout: Layout) -> Result<Value> {
        let key = match self.scope.as_str() {
            "" => name.to_string(),
            s => format!("{s}.{name}"),
        };
        let init = match layout {
            Layout::AsIs => key.clone(),
            Layout::Transposed => format!("{key}.T"),
            Layout::Channel => format!("{key}.C11"),
        };
        if let Some(v) = self.placed.get(&init) {
            return Ok(v.clone());
        }
        let (dims, r) = self.weights.place(&key, layout)?;
        let v = Value::new(&init, self.act(), Some(dims.len()));
        self.inits.push(external_tensor(&init, dims, v.dtype.onnx(), &r));
        self.placed.insert(init, v.clone());
        Ok(v)
    }

    /// The checkpoint tensor `scope.name.weight`: `b.pp("layers.3").pp("attention").w("wqkv", ..)` reads
    /// `layers.3.attention.wqkv.weight`.
    pub fn w(&mut self, name: &str, layout: Layout) -> Result<Value> {
        self.get(&format!("{name}.weight"), layout)
    }

    /// Weight bytes a call of the graph built so far reads: `(weights, lookups)`, see [`initializer_bytes`].
    pub fn initializer_bytes(&self) -> (u64, u64) {
        initializer_bytes(&self.nodes, &self.inits)
    }

    /// Serialises the model to `path`.
    pub fn write(self, name: &str, doc: &str, path: &Path) -> Result<()> {
        let graph = GraphProto {
            node: self.nodes,
            name: name.to_string(),
            initializer: self.inits,
            input: self.inputs,
            output: self.outputs,
            doc_string: doc.to_string(),
            ..Default::default()
        };
        write_model(&model_proto(graph, doc), path)
    }
}

/// Domain of ONNX Runtime's contrib operators (GroupQueryAttention, MatMulNBits).
pub const MS_DOMAIN: &str = "com.microsoft";

/// Adds the `com.microsoft` opset import (version 1) to `model` when one of its nodes needs it and it is
/// not there yet.
pub fn import_ms_domain_if_used(model: &mut ModelProto) {
    let used = model.graph.as_ref().is_some_and(|g| g.node.iter().any(|n| n.domain == MS_DOMAIN));
    if used && !model.opset_import.iter().any(|o| o.domain == MS_DOMAIN) {
        model.opset_import.push(OperatorSetIdProto { domain: MS_DOMAIN.into(), version: 1, ..Default::default() });
    }
}

/// A model around `graph`: IR [`IR_VERSION`], default-domain opset [`OPSET`] (plus `com.microsoft` where
/// a node uses it), our producer name.
pub fn model_proto(graph: GraphProto, doc: &str) -> ModelProto {
    let mut m = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET, ..Default::default() }],
        producer_name: "spherear-exporter".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph).into(),
        doc_string: doc.to_string(),
        ..Default::default()
    };
    import_ms_domain_if_used(&mut m);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights held in memory.
    struct Mem(HashMap<String, Tensor>);

    impl WeightSource for Mem {
        fn tensor(&self, key: &str) -> Result<&Tensor> {
            self.0.get(key).ok_or_else(|| ExportError::Graph(format!("no tensor {key}")))
        }
    }

    /// Runs `f` on a builder of `dtype` over `weights`.
    fn with_builder<T>(dtype: DType, weights: &[(&str, Vec<usize>)], f: impl FnOnce(&mut Builder) -> T) -> T {
        let mem = Mem(weights
            .iter()
            .map(|(k, s)| (k.to_string(), Tensor { shape: s.clone(), data: vec![0.5; s.iter().product()] }))
            .collect());
        let dir = tempfile::tempdir().unwrap();
        let mut file = WeightFile::create(&mem, dir.path(), "w.bin", dtype).unwrap();
        f(&mut Builder::new(&mut file))
    }

    fn graph_err<T: fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(ExportError::Graph(m)) => m,
            other => panic!("expected a graph construction error, got {other:?}"),
        }
    }

    #[test]
    fn adding_fp16_to_fp32_is_caught_when_wiring() {
        with_builder(DType::Float16, &[], |b| {
            let x = b.input("x", DType::Float32, vec![BATCH, Dim::N(4)], "fp32 input").unwrap();
            let w = b.c_act(&[4], &[1.0; 4]);
            assert_eq!(w.dtype, DType::Float16);
            let err = graph_err(b.pp("layers.3").pp("attention").add(&x, &w));
            assert!(err.starts_with("node layers.3.attention/Add_"), "{err}");
            assert!(
                err.ends_with("operands 'x' (float32, rank 2) and 'const_1' (float16, rank 1) differ in dtype"),
                "{err}"
            );
            println!("{}", ExportError::Graph(err));
            // Nothing was added, and the scope ended with its guards.
            assert!(b.nodes.is_empty());
            assert_eq!(b.scope(), "");
            // Cast first and it wires, with the dtype of its operands and the broadcast rank.
            let x16 = b.cast(&x, DType::Float16).unwrap();
            let y = b.add(&x16, &w).unwrap();
            assert_eq!((y.dtype, y.rank), (DType::Float16, Some(2)));
            let err = graph_err(b.matmul(&w, &x));
            assert!(err.starts_with("node MatMul_"), "{err}");
            assert!(err.ends_with("(float16, rank 1) and 'x' (float32, rank 2) differ in dtype"), "{err}");
        });
    }

    #[test]
    fn ops_give_their_outputs_the_right_dtype_and_rank() {
        with_builder(DType::Float32, &[], |b| {
            let x = b.input("x", DType::Float32, vec![BATCH, Dim::N(3), Dim::N(4)], "").unwrap();
            let pos = b.input("pos", DType::Int64, vec![BATCH], "").unwrap();
            let shape = b.op("Shape", &[&x], vec![]).unwrap();
            assert_eq!((shape.dtype, shape.rank), (DType::Int64, Some(1)));
            let i32s = b.cast(&pos, DType::Int32).unwrap();
            assert_eq!((i32s.dtype, i32s.rank), (DType::Int32, Some(1)));
            let table = b.c_f32(&[10, 4], &[0.0; 40]);
            let rows = b.op("Gather", &[&table, &pos], vec![ai("axis", 0)]).unwrap();
            assert_eq!((rows.dtype, rows.rank), (DType::Float32, Some(2)));
            let r = b.reshape(&x, &[0, 12]).unwrap();
            assert_eq!(r.rank, Some(2));
            let t = b.transpose(&x, &[0, 2, 1]).unwrap();
            assert_eq!(t.rank, Some(3));
            let parts = b.split(&x, &[1, 3]).unwrap();
            assert_eq!(parts.len(), 2);
            assert!(parts.iter().all(|p| p.dtype == DType::Float32 && p.rank == Some(3)));
            let zero = b.c_f32(&[], &[0.0]);
            let later = b.op("Greater", &[&x, &zero], vec![]).unwrap();
            assert_eq!((later.dtype, later.rank), (DType::Bool, Some(3)));
            let m = b.op("Where", &[&later, &x, &zero], vec![]).unwrap();
            assert_eq!(m.dtype, DType::Float32);

            // Mistakes, each named by its node.
            let err = graph_err(b.op("Where", &[&x, &x, &zero], vec![]));
            assert!(err.starts_with("node Where_"), "{err}");
            assert!(err.contains("condition 'x' (float32, rank 3) must be bool"), "{err}");
            let err = graph_err(b.transpose(&x, &[1, 0]));
            assert!(err.contains("Transpose") && err.contains("rank 3"), "{err}");
            let err = graph_err(b.op("Gather", &[&table, &x], vec![]));
            assert!(err.contains("indices 'x'"), "{err}");
            let err = graph_err(b.op("Reshape", &[&x, &i32s], vec![]));
            assert!(err.contains("must be int64"), "{err}");
            let err = graph_err(b.op("Tanh", &[&x], vec![]));
            assert!(err.contains("Tanh has no dtype rule"), "{err}");
        });
    }

    #[test]
    fn graph_inputs_and_outputs_are_checked_against_their_declaration() {
        with_builder(DType::Float16, &[], |b| {
            let x = b.input("x", DType::Float32, vec![BATCH, Dim::N(4)], "").unwrap();
            let h = b.cast(&x, DType::Float16).unwrap();
            let err = graph_err(b.output(&h, "y", DType::Float32, vec![BATCH, Dim::N(4)], ""));
            assert!(err.contains("graph output y") && err.contains("float16") && err.contains("float32"), "{err}");
            let err = graph_err(b.output(&x, "y", DType::Float32, vec![BATCH], ""));
            assert!(err.contains("rank 2 but 1 axes"), "{err}");
            assert!(b.output_specs.is_empty());
            let err = graph_err(b.input("n", DType::Int32, vec![BATCH], ""));
            assert!(err.contains("int32"), "{err}");
            b.output(&x, "y", DType::Float32, vec![BATCH, Dim::N(4)], "").unwrap();
            assert_eq!(b.nodes.last().map(|n| n.op_type.as_str()), Some("Identity"));
        });
    }

    #[test]
    fn scopes_name_weights_by_their_keys_and_nodes_by_their_layer() {
        let weights = [("layers.3.attention.wqkv.weight", vec![6, 2]), ("norm.weight", vec![2])];
        with_builder(DType::Float16, &weights, |b| {
            let x = b.input("x", DType::Float16, vec![BATCH, Dim::N(2)], "").unwrap();
            let w = b.pp("layers.3").pp("attention").w("wqkv", Layout::Transposed).unwrap();
            assert_eq!(w, Value::new("layers.3.attention.wqkv.weight.T", DType::Float16, Some(2)));
            assert_eq!(b.scope(), "");
            let y = {
                let mut l = b.pp("layers.3");
                let mut a = l.pp("attention");
                assert_eq!(a.scope(), "layers.3.attention");
                let again = a.w("wqkv", Layout::Transposed).unwrap();
                assert_eq!(again, w, "a weight is placed once");
                let eps = a.memo("eps", |b| b.c_f32(&[], &[1e-6]));
                assert!(!eps.name.contains('/'), "memoised constants are named at the root: {}", eps.name);
                a.matmul(&x, &w).unwrap()
            };
            assert!(y.name.starts_with("layers.3.attention/MatMul_"), "{}", y.name);
            assert_eq!(y.rank, Some(2));
            assert_eq!(b.nodes[0].name, y.name);
            let n = b.w("norm", Layout::AsIs).unwrap();
            assert_eq!(n.name, "norm.weight");
            let err = b.pp("layers.4").w("wqkv", Layout::AsIs).unwrap_err().to_string();
            assert!(err.contains("layers.4.wqkv.weight"), "{err}");
            // The placed weight is in the file once, in fp16.
            assert_eq!(b.weights.bytes(), (12 + 2) * 2);
        });
    }

    #[test]
    fn weights_are_stored_as_floats_only() {
        let mem = Mem(HashMap::new());
        let dir = tempfile::tempdir().unwrap();
        assert!(WeightFile::create(&mem, dir.path(), "w.bin", DType::Int64).is_err());
    }
}
