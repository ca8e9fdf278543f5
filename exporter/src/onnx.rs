//! A small typed builder over the ONNX protos (crate `onnx-protobuf`, IR 10, opset 21).
//!
//! Values are named by strings. Graph inputs and outputs are declared with a dtype, a shape whose first
//! axis may be the symbolic `batch`, and a meaning that also goes into the manifest. Checkpoint weights
//! are not embedded: [`WeightFile`] appends each one once (in the export dtype, optionally transposed) to
//! a single external-data file that every graph of an export references by offset, so `ar_prefill` and
//! `ar_step` share their transformer weights on disk and no `.onnx` file comes near protobuf's 2 GB limit,
//! whatever the model size. Derived constants (RoPE tables, masks, frequencies) are small and inline.
//!
//! Tools that rewrite an export (the `calibration` crate) use the same pieces rather than their own:
//! [`read_model`]/[`write_model`], [`external_ref`]/[`external_tensor`] for the external-data entries,
//! [`ExternalDataWriter`] for a new weights file, and [`initializer_bytes`] for the weight bytes a graph
//! reads per call (which the manifest records per graph).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::{DataLocation, DataType};
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{self, Value};
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

/// Element types used by the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Float32,
    Float16,
    Int64,
}

impl DType {
    pub(crate) fn onnx(self) -> DataType {
        match self {
            DType::Float32 => DataType::FLOAT,
            DType::Float16 => DataType::FLOAT16,
            DType::Int64 => DataType::INT64,
        }
    }
    pub fn size(self) -> usize {
        match self {
            DType::Float32 => 4,
            DType::Float16 => 2,
            DType::Int64 => 8,
        }
    }
    /// Little-endian bytes of `data` in this (float) dtype.
    fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
            DType::Float16 => data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            DType::Int64 => data.iter().flat_map(|v| (*v as i64).to_le_bytes()).collect(),
            DType::Float32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
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

impl DType {
    /// The manifest's name of this dtype.
    pub fn manifest(self) -> TensorDType {
        match self {
            DType::Float32 => TensorDType::Float32,
            DType::Float16 => TensorDType::Float16,
            DType::Int64 => TensorDType::Int64,
        }
    }
}

impl Dim {
    /// The manifest's form of this axis.
    pub fn manifest(&self) -> ManifestDim {
        match self {
            Dim::Sym(s) => ManifestDim::Sym(s.to_string()),
            Dim::N(n) => ManifestDim::N(*n),
        }
    }
}

fn spec(name: &str, dtype: DType, shape: &[Dim], meaning: &str) -> IoSpec {
    IoSpec {
        name: name.into(),
        dtype: dtype.manifest(),
        shape: shape.iter().map(Dim::manifest).collect(),
        meaning: meaning.into(),
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
    /// Creates `dir/file_name`; weights are converted to `dtype` as they are written.
    pub fn create(ckpt: &'c dyn WeightSource, dir: &Path, file_name: &str, dtype: DType) -> Result<Self> {
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

fn value_info(name: &str, dtype: DType, shape: &[Dim]) -> ValueInfoProto {
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
        type_: Some(TypeProto { value: Some(Value::TensorType(tensor)), ..Default::default() }).into(),
        ..Default::default()
    }
}

/// Builds one graph. `act` is the activation/weight dtype (fp32, or fp16 with fp32 islands).
pub struct Builder<'w, 'c> {
    pub act: DType,
    weights: &'w mut WeightFile<'c>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    init_names: HashSet<String>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    pub input_specs: Vec<IoSpec>,
    pub output_specs: Vec<IoSpec>,
    memo: HashMap<String, String>,
    next: usize,
}

impl<'w, 'c> Builder<'w, 'c> {
    pub fn new(weights: &'w mut WeightFile<'c>) -> Self {
        Builder {
            act: weights.dtype(),
            weights,
            nodes: Vec::new(),
            inits: Vec::new(),
            init_names: HashSet::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            input_specs: Vec::new(),
            output_specs: Vec::new(),
            memo: HashMap::new(),
            next: 0,
        }
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, dtype: DType, shape: Vec<Dim>, meaning: &str) -> String {
        self.inputs.push(value_info(name, dtype, &shape));
        self.input_specs.push(spec(name, dtype, &shape, meaning));
        name.to_string()
    }

    /// Declares a graph output; `value` must be the output of a node named with [`Builder::op_to`] as `name`,
    /// or any value (then an `Identity` names it).
    pub fn output(&mut self, value: &str, name: &str, dtype: DType, shape: Vec<Dim>, meaning: &str) {
        if value != name {
            self.op_to("Identity", &[value], vec![], name);
        }
        self.outputs.push(value_info(name, dtype, &shape));
        self.output_specs.push(spec(name, dtype, &shape, meaning));
    }

    fn fresh(&mut self, op: &str) -> String {
        self.next += 1;
        format!("{}_{}", op.to_lowercase(), self.next)
    }

    /// A node with one output named `out`.
    pub fn op_to(&mut self, op: &str, ins: &[&str], attrs: Vec<AttributeProto>, out: &str) -> String {
        let name = format!("n{}_{op}", self.nodes.len());
        self.nodes.push(NodeProto {
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            name,
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        });
        out.to_string()
    }

    /// A node with one fresh output.
    pub fn op(&mut self, op: &str, ins: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.op_to(op, ins, attrs, &out)
    }

    /// A fresh value name (for outputs of [`Builder::op_ms`]).
    pub fn fresh_name(&mut self, label: &str) -> String {
        self.fresh(label)
    }

    /// A `com.microsoft` contrib node with the named outputs.
    pub fn op_ms(&mut self, op: &str, ins: &[&str], attrs: Vec<AttributeProto>, outs: &[&str]) {
        let name = format!("n{}_{op}", self.nodes.len());
        self.nodes.push(NodeProto {
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: outs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op.to_string(),
            domain: MS_DOMAIN.into(),
            attribute: attrs,
            ..Default::default()
        });
    }

    /// A node with `n` fresh outputs.
    pub fn op_n(&mut self, op: &str, ins: &[&str], attrs: Vec<AttributeProto>, n: usize) -> Vec<String> {
        let outs: Vec<String> = (0..n).map(|_| self.fresh(op)).collect();
        let name = format!("n{}_{op}", self.nodes.len());
        self.nodes.push(NodeProto {
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: outs.clone(),
            name,
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        });
        outs
    }

    fn constant(&mut self, dtype: DType, dims: &[usize], data: &[f32]) -> String {
        let name = self.fresh("const");
        self.inits.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dtype.onnx() as i32,
            raw_data: dtype.encode(data),
            ..Default::default()
        });
        name
    }

    /// A constant in the activation dtype.
    pub fn c_act(&mut self, dims: &[usize], data: &[f32]) -> String {
        self.constant(self.act, dims, data)
    }
    /// An fp32 constant.
    pub fn c_f32(&mut self, dims: &[usize], data: &[f32]) -> String {
        self.constant(DType::Float32, dims, data)
    }
    /// An int64 constant.
    pub fn c_i64(&mut self, dims: &[usize], data: &[i64]) -> String {
        let name = self.fresh("const");
        self.inits.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::INT64 as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    /// A constant built once per graph under `label`.
    pub fn memo(&mut self, label: &str, make: impl FnOnce(&mut Self) -> String) -> String {
        if let Some(v) = self.memo.get(label) {
            return v.clone();
        }
        let v = make(self);
        self.memo.insert(label.to_string(), v.clone());
        v
    }

    /// The checkpoint tensor `key` in `layout`, as an external-data initializer of the activation dtype.
    pub fn w(&mut self, key: &str, layout: Layout) -> Result<String> {
        let name = match layout {
            Layout::AsIs => key.to_string(),
            Layout::Transposed => format!("{key}.T"),
            Layout::Channel => format!("{key}.C11"),
        };
        if self.init_names.contains(&name) {
            return Ok(name);
        }
        let (dims, r) = self.weights.place(key, layout)?;
        self.inits.push(external_tensor(&name, dims, self.act.onnx(), &r));
        self.init_names.insert(name.clone());
        Ok(name)
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
fn model_proto(graph: GraphProto, doc: &str) -> ModelProto {
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

/// A one-node graph `C = A · B` with A [m, k] and B [k, n] as inputs, in `dtype` (float32 or float16):
/// the probe the benchmarks use to measure a machine's matrix-multiply rate through ONNX Runtime.
pub fn matmul_model(m: usize, k: usize, n: usize, dtype: DType) -> Result<Vec<u8>> {
    let node = NodeProto {
        op_type: "MatMul".into(),
        input: vec!["A".into(), "B".into()],
        output: vec!["C".into()],
        name: "matmul".into(),
        ..Default::default()
    };
    let graph = GraphProto {
        node: vec![node],
        name: "matmul_probe".into(),
        input: vec![value_info("A", dtype, &[Dim::N(m), Dim::N(k)]), value_info("B", dtype, &[Dim::N(k), Dim::N(n)])],
        output: vec![value_info("C", dtype, &[Dim::N(m), Dim::N(n)])],
        ..Default::default()
    };
    model_proto(graph, "matmul probe")
        .write_to_bytes()
        .map_err(|e| ExportError::Graph(format!("cannot serialise the matmul probe: {e}")))
}
