//! A small typed builder over the ONNX protos (crate `onnx-protobuf`, IR 10, opset 21).
//!
//! Values are named by strings. Graph inputs and outputs are declared with a dtype, a shape whose first
//! axis may be the symbolic `batch`, and a meaning that also goes into the manifest. Checkpoint weights
//! are not embedded: [`WeightFile`] appends each one once (in the export dtype, optionally transposed) to
//! a single external-data file that every graph of an export references by offset, so `ar_prefill` and
//! `ar_step` share their transformer weights on disk and no `.onnx` file comes near protobuf's 2 GB limit,
//! whatever the model size. Derived constants (RoPE tables, masks, frequencies) are small and inline.

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
use serde::Serialize;

use crate::checkpoint::{Checkpoint, Tensor};
use crate::error::{io_err, ExportError, Result};

/// ONNX IR version written (IR 10 = ONNX 1.16+; read by ONNX Runtime ≥ 1.17 and TensorRT 10).
pub const IR_VERSION: i64 = 10;
/// Default-domain opset written.
pub const OPSET: i64 = 21;

/// Element types used by the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Dim {
    Sym(&'static str),
    N(usize),
}

/// The symbolic batch axis.
pub const BATCH: Dim = Dim::Sym("batch");

/// A graph input or output as the manifest describes it.
#[derive(Debug, Clone, Serialize)]
pub struct IoSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub meaning: String,
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

/// The external-data file that receives every checkpoint weight used by the graphs, once.
pub struct WeightFile<'c> {
    ckpt: &'c dyn WeightSource,
    dtype: DType,
    file_name: String,
    out: BufWriter<File>,
    path: PathBuf,
    offset: u64,
    parameters: usize,
    placed: HashMap<(String, Layout), (Vec<i64>, u64, u64)>,
}

impl<'c> WeightFile<'c> {
    /// Creates `dir/file_name`; weights are converted to `dtype` as they are written.
    pub fn create(ckpt: &'c dyn WeightSource, dir: &Path, file_name: &str, dtype: DType) -> Result<Self> {
        let path = dir.join(file_name);
        let out = BufWriter::new(File::create(&path).map_err(io_err(format!("cannot create {}", path.display())))?);
        Ok(WeightFile {
            ckpt,
            dtype,
            file_name: file_name.to_string(),
            out,
            path,
            offset: 0,
            parameters: 0,
            placed: HashMap::new(),
        })
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
        self.offset
    }

    /// Flushes and syncs the file.
    pub fn finish(mut self) -> Result<()> {
        let what = format!("cannot write {}", self.path.display());
        self.out.flush().map_err(io_err(&what))?;
        self.out.get_ref().sync_all().map_err(io_err(&what))
    }

    /// Dims, offset and length of `key` in `layout`, writing it on first use.
    fn place(&mut self, key: &str, layout: Layout) -> Result<(Vec<i64>, u64, u64)> {
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
        self.out.write_all(&bytes).map_err(io_err(format!("cannot write {}", self.path.display())))?;
        let placed = (dims.iter().map(|&d| d as i64).collect(), self.offset, bytes.len() as u64);
        self.offset += bytes.len() as u64;
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
        self.input_specs.push(IoSpec { name: name.into(), dtype, shape, meaning: meaning.into() });
        name.to_string()
    }

    /// Declares a graph output; `value` must be the output of a node named with [`Builder::op_to`] as `name`,
    /// or any value (then an `Identity` names it).
    pub fn output(&mut self, value: &str, name: &str, dtype: DType, shape: Vec<Dim>, meaning: &str) {
        if value != name {
            self.op_to("Identity", &[value], vec![], name);
        }
        self.outputs.push(value_info(name, dtype, &shape));
        self.output_specs.push(IoSpec { name: name.into(), dtype, shape, meaning: meaning.into() });
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
        let (dims, offset, length) = self.weights.place(key, layout)?;
        let entry = |k: &str, v: String| StringStringEntryProto { key: k.into(), value: v, ..Default::default() };
        self.inits.push(TensorProto {
            name: name.clone(),
            dims,
            data_type: self.act.onnx() as i32,
            data_location: DataLocation::EXTERNAL.into(),
            external_data: vec![
                entry("location", self.weights.file_name.clone()),
                entry("offset", offset.to_string()),
                entry("length", length.to_string()),
            ],
            ..Default::default()
        });
        self.init_names.insert(name.clone());
        Ok(name)
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
        let model = model_proto(graph, doc);
        let bytes =
            model.write_to_bytes().map_err(|e| ExportError::Graph(format!("cannot serialise graph {name}: {e}")))?;
        std::fs::write(path, bytes).map_err(io_err(format!("cannot write {}", path.display())))
    }
}

/// A model around `graph`: IR [`IR_VERSION`], default-domain opset [`OPSET`], our producer name.
fn model_proto(graph: GraphProto, doc: &str) -> ModelProto {
    ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET, ..Default::default() }],
        producer_name: "spherear-exporter".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph).into(),
        doc_string: doc.to_string(),
        ..Default::default()
    }
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
