//! Int8 QDQ graphs: which tensors `calibration calibrate` records, the augmented graphs that expose them,
//! and the rewrite of an fp32 graph into a QDQ graph from calibrated ranges.
//!
//! Quantized nodes ([`targets`]): `MatMul`, `Conv` and `ConvTranspose` whose weight (input 1) is a
//! checkpoint weight (an fp32 initializer in the export's weights file). The inline ±1 RoPE pair-swap
//! constant and activation × activation MatMuls (attention) stay fp32.
//!
//! The rewrite ([`quantize_graph`]):
//! - weights: per-output-channel symmetric int8 initializers (scale = max |w| / 127 per channel, values
//!   rounded half to even and clamped to ±127, as QuantizeLinear rounds) read through
//!   `DequantizeLinear(axis)`: axis 1 for MatMul `[K, N]` and ConvTranspose `[C_in, C_out, kh, kw]`,
//!   axis 0 for Conv `[C_out, C_in, kh, kw]`;
//! - activations: per-tensor symmetric int8 (zero point 0, scale = amax / 127 from the calibrated range)
//!   `QuantizeLinear → DequantizeLinear` before the node — one pair (with its own scale and zero-point
//!   initializers) per consuming node, since ONNX Runtime fuses a DequantizeLinear into its consumer only
//!   when it has no other consumer;
//! - outputs of MatMuls that feed a single `Add` with a rank-2 activation (the [batch, dim] graphs
//!   `ar_step` and `head_step`: bias and residual adds) also get a calibrated `QuantizeLinear →
//!   DequantizeLinear`: without it ONNX Runtime's MatMulAddFusion turns the MatMul + Add into a float
//!   Gemm, which has no int8 kernel; with it the MatMul becomes `QLinearMatMul`. The other quantized
//!   MatMuls become `MatMulIntegerToFloat`.
//!
//! Graph inputs and outputs keep their names, dtypes and shapes, so `runtime generate` runs the result
//! unchanged. Zero points are 0 and ranges symmetric, as TensorRT's explicit quantization requires.

use std::collections::{BTreeMap, HashMap, HashSet};

use exporter::onnx::{ai, external_ref, external_tensor, ExternalDataWriter, ExternalRef};
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::type_proto::{self, Value};
use onnx_protobuf::{ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto};

use crate::error::{CalibError, Result};
use crate::histogram::int8_scale;

/// Operators whose weight input is quantized.
pub const QUANTIZED_NODE_OPS: [&str; 3] = ["MatMul", "Conv", "ConvTranspose"];

/// A quantized node: a MatMul/Conv/ConvTranspose with a checkpoint weight.
#[derive(Debug, Clone)]
pub struct Target {
    /// Index in the graph's node list.
    pub node: usize,
    pub op: String,
    pub name: String,
    /// The activation input (input 0).
    pub activation: String,
    /// The weight initializer (input 1), its location and dims.
    pub weight: String,
    pub at: ExternalRef,
    pub dims: Vec<i64>,
    pub output: String,
    /// MatMul whose output's only consumer is an Add (and is no graph output): its output is recorded
    /// too and gets a QDQ pair when the activation is rank 2 (see the module doc).
    pub output_to_add: bool,
}

impl Target {
    /// The per-channel axis of the weight.
    pub fn axis(&self) -> usize {
        if self.op == "Conv" {
            0
        } else {
            1
        }
    }
}

/// The quantized nodes of `model` (see the module doc), in node order.
pub fn targets(model: &ModelProto, weights_file: &str) -> std::result::Result<Vec<Target>, String> {
    let g = &model.graph;
    let inits: HashMap<&str, &TensorProto> = g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut consumers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            consumers.entry(i.as_str()).or_default().push(n);
        }
    }
    let outputs: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let mut out = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        if !QUANTIZED_NODE_OPS.contains(&n.op_type.as_str()) || !n.domain.is_empty() || n.input.len() < 2 {
            continue;
        }
        let Some(t) = inits.get(n.input[1].as_str()) else { continue };
        let Some(at) = external_ref(t).map_err(|e| e.to_string())? else { continue };
        let rank = if n.op_type == "MatMul" { 2 } else { 4 };
        if at.location != weights_file || t.data_type != DataType::FLOAT as i32 || t.dims.len() != rank {
            continue;
        }
        // Every dim positive and the byte count without overflow (the dims come from the file).
        if crate::quantize::fp32_bytes(&t.dims) != Some(at.length) {
            return Err(format!("initializer {}: {} bytes for fp32 dims {:?}", t.name, at.length, t.dims));
        }
        if inits.contains_key(n.input[0].as_str()) {
            continue; // a constant input: nothing to calibrate
        }
        let output = n.output.first().cloned().unwrap_or_default();
        let output_to_add = n.op_type == "MatMul"
            && !outputs.contains(output.as_str())
            && consumers
                .get(output.as_str())
                .is_some_and(|c| c.len() == 1 && c[0].op_type == "Add" && c[0].domain.is_empty());
        out.push(Target {
            node: i,
            op: n.op_type.clone(),
            name: n.name.clone(),
            activation: n.input[0].clone(),
            weight: t.name.clone(),
            at,
            dims: t.dims.clone(),
            output,
            output_to_add,
        });
    }
    Ok(out)
}

/// The tensors to record for `targets`: every activation input and every `output_to_add` output, once,
/// in first-use order.
pub fn recorded_tensors(targets: &[Target]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for t in targets {
        for name in std::iter::once(&t.activation).chain(t.output_to_add.then_some(&t.output)) {
            if seen.insert(name.clone()) {
                out.push(name.clone());
            }
        }
    }
    out
}

fn float_output(name: &str) -> ValueInfoProto {
    let tensor = type_proto::Tensor { elem_type: DataType::FLOAT as i32, ..Default::default() };
    ValueInfoProto {
        name: name.to_string(),
        type_: Some(TypeProto { value: Some(Value::TensorType(tensor)), ..Default::default() }).into(),
        ..Default::default()
    }
}

/// `model` with every tensor of `recorded` added as a graph output: the graph the calibration replays
/// to read the activations. Graph inputs are not added (ONNX Runtime does not fill an output that is a
/// graph input: read those from the inputs), nor are tensors that already are outputs.
pub fn augmented(model: &ModelProto, recorded: &[String]) -> ModelProto {
    let mut m = model.clone();
    let g = m.graph.mut_or_insert_default();
    let have: HashSet<String> = g.output.iter().chain(&g.input).map(|o| o.name.clone()).collect();
    for r in recorded {
        if !have.contains(r) {
            g.output.push(float_output(r));
        }
    }
    m
}

/// Per-channel symmetric int8 quantization of a weight with `dims` along `axis`: (levels, scales).
pub fn quantize_weight(w: &[f32], dims: &[i64], axis: usize) -> (Vec<i8>, Vec<f32>) {
    let d: Vec<usize> = dims.iter().map(|&x| x as usize).collect();
    let channels = d[axis];
    let inner: usize = d[axis + 1..].iter().product();
    let mut amax = vec![0f32; channels];
    for (i, v) in w.iter().enumerate() {
        let c = (i / inner) % channels;
        amax[c] = amax[c].max(v.abs());
    }
    let scales: Vec<f32> = amax.iter().map(|&a| int8_scale(a)).collect();
    let q = w
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let c = (i / inner) % channels;
            (v / scales[c]).round_ties_even().clamp(-127.0, 127.0) as i8
        })
        .collect();
    (q, scales)
}

fn scalar_f32(name: &str, v: f32) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: DataType::FLOAT as i32,
        raw_data: v.to_le_bytes().to_vec(),
        ..Default::default()
    }
}

fn scalar_i8(name: &str) -> TensorProto {
    TensorProto { name: name.into(), data_type: DataType::INT8 as i32, raw_data: vec![0], ..Default::default() }
}

fn node(op: &str, name: String, inputs: Vec<String>, output: String, axis: Option<usize>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name,
        input: inputs,
        output: vec![output],
        attribute: axis.map(|a| vec![ai("axis", a as i64)]).unwrap_or_default(),
        ..Default::default()
    }
}

/// Where a weight quantized for the output went (shared by graphs that share the fp32 weight).
#[derive(Debug, Clone)]
pub struct PlacedWeight {
    pub data: ExternalRef,
    pub scales: ExternalRef,
    /// Relative RMS rounding error ‖W − dequant(Q)‖ / ‖W‖.
    pub rel_rms: f64,
}

/// What [`quantize_graph`] did to one graph.
#[derive(Debug, Clone, Default)]
pub struct GraphQdq {
    /// Quantized MatMul/Conv/ConvTranspose nodes.
    pub nodes: usize,
    /// Of those, MatMuls whose output got a QDQ pair.
    pub outputs_quantized: usize,
    /// Largest relative RMS rounding error of a weight.
    pub max_weight_rel_rms: f64,
}

/// Rewrites `model` into its QDQ form (see the module doc). `amax` gives the calibrated amplitude of every
/// recorded tensor, `rank` its observed rank; `read` reads an fp32 weight; new weights go to `out`, each
/// fp32 weight (by location) once across calls via `placed`.
pub fn quantize_graph(
    model: &mut ModelProto,
    targets: &[Target],
    amax: &BTreeMap<String, f32>,
    rank: &BTreeMap<String, usize>,
    read: &mut dyn FnMut(&ExternalRef) -> Result<Vec<f32>>,
    out: &mut ExternalDataWriter,
    placed: &mut HashMap<(u64, u64), PlacedWeight>,
) -> Result<GraphQdq> {
    let g = model.graph.mut_or_insert_default();
    let mut report = GraphQdq::default();
    let taken: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output).cloned())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .collect();
    let fresh = |base: String| -> Result<String> {
        if taken.contains(&base) {
            return Err(CalibError::Invalid(format!("name {base} is already used in the graph")));
        }
        Ok(base)
    };
    let get_amax = |t: &str| -> Result<f32> {
        amax.get(t).copied().ok_or_else(|| CalibError::Invalid(format!("no calibrated range for tensor {t}")))
    };
    let mut before: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut after: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut scaled: HashSet<String> = HashSet::new();
    // Scale and zero point initializers: one pair per QDQ pair. Shared ones would let ONNX Runtime's
    // common-subexpression elimination merge the QuantizeLinear nodes of two consumers into one with two
    // DequantizeLinear consumers, which then fuse with neither.
    let mut add_scale = |t: &str, suffix: &str, inits: &mut Vec<TensorProto>| -> Result<(String, String)> {
        let (s, z) = (format!("{t}_scale{suffix}"), format!("{t}_zero_point{suffix}"));
        if scaled.insert(s.clone()) {
            inits.push(scalar_f32(&s, int8_scale(get_amax(t)?)));
            inits.push(scalar_i8(&z));
        }
        Ok((s, z))
    };
    for tg in targets {
        let key = (tg.at.offset, tg.at.length);
        let p = match placed.get(&key) {
            Some(p) => p.clone(),
            None => {
                let w = read(&tg.at)?;
                if let Some(v) = w.iter().find(|v| !v.is_finite()) {
                    return Err(CalibError::Invalid(format!("weight {} holds a non-finite value ({v})", tg.weight)));
                }
                let (q, s) = quantize_weight(&w, &tg.dims, tg.axis());
                let deq_err = {
                    let d: Vec<usize> = tg.dims.iter().map(|&x| x as usize).collect();
                    let inner: usize = d[tg.axis() + 1..].iter().product();
                    let (mut num, mut den) = (0f64, 0f64);
                    for (i, (&wv, &qv)) in w.iter().zip(&q).enumerate() {
                        let c = (i / inner) % d[tg.axis()];
                        num += f64::from(wv - f32::from(qv) * s[c]).powi(2);
                        den += f64::from(wv).powi(2);
                    }
                    if den > 0.0 {
                        (num / den).sqrt()
                    } else {
                        0.0
                    }
                };
                let data = out.append(&q.iter().map(|&v| v as u8).collect::<Vec<u8>>())?;
                let scales = out.append(&s.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
                let p = PlacedWeight { data, scales, rel_rms: deq_err };
                placed.insert(key, p.clone());
                p
            }
        };
        report.max_weight_rel_rms = report.max_weight_rel_rms.max(p.rel_rms);
        let channels = tg.dims[tg.axis()];
        let (wq, ws, wdq) =
            (format!("{}_quantized", tg.weight), format!("{}_scale", tg.weight), format!("{}_dequantized", tg.weight));
        if !new_inits.iter().any(|t| t.name == wq) {
            new_inits.push(external_tensor(&fresh(wq.clone())?, tg.dims.clone(), DataType::INT8, &p.data));
            new_inits.push(external_tensor(&fresh(ws.clone())?, vec![channels], DataType::FLOAT, &p.scales));
        }
        let tag = if tg.name.is_empty() { format!("node{}", tg.node) } else { tg.name.clone() };
        let mut pre = vec![node(
            "DequantizeLinear",
            format!("{}_DequantizeLinear_{tag}", tg.weight),
            vec![wq, ws],
            fresh(format!("{wdq}_{tag}"))?,
            Some(tg.axis()),
        )];
        let a = &tg.activation;
        let (s, z) = add_scale(a, &format!("_{tag}"), &mut new_inits)?;
        let (aq, adq) = (fresh(format!("{a}_quantized_{tag}"))?, fresh(format!("{a}_dequantized_{tag}"))?);
        pre.push(node(
            "QuantizeLinear",
            format!("{a}_QuantizeLinear_{tag}"),
            vec![a.clone(), s.clone(), z.clone()],
            aq.clone(),
            None,
        ));
        pre.push(node("DequantizeLinear", format!("{a}_DequantizeLinear_{tag}"), vec![aq, s, z], adq.clone(), None));
        let n = &mut g.node[tg.node];
        n.input[0] = adq;
        n.input[1] = format!("{wdq}_{tag}");
        if tg.output_to_add && rank.get(a).copied() == Some(2) {
            let o = tg.output.clone();
            let (s, z) = add_scale(&o, "", &mut new_inits)?;
            let (of, oq) = (fresh(format!("{o}_float"))?, fresh(format!("{o}_quantized"))?);
            n.output[0] = of.clone();
            after.insert(
                tg.node,
                vec![
                    node(
                        "QuantizeLinear",
                        format!("{o}_QuantizeLinear"),
                        vec![of, s.clone(), z.clone()],
                        oq.clone(),
                        None,
                    ),
                    node("DequantizeLinear", format!("{o}_DequantizeLinear"), vec![oq, s, z], o, None),
                ],
            );
            report.outputs_quantized += 1;
        }
        before.insert(tg.node, pre);
        report.nodes += 1;
    }
    let old = std::mem::take(&mut g.node);
    for (i, n) in old.into_iter().enumerate() {
        if let Some(pre) = before.remove(&i) {
            g.node.extend(pre);
        }
        g.node.push(n);
        if let Some(post) = after.remove(&i) {
            g.node.extend(post);
        }
    }
    g.initializer.extend(new_inits);
    // The replaced fp32 weights are no longer read.
    let used: HashSet<String> = g.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    g.initializer.retain(|t| used.contains(&t.name) || outputs.contains(&t.name));
    Ok(report)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A one-MatMul graph whose weight `w` has `dims` and `length` bytes in `weights.bin`.
    pub(crate) fn matmul_model(dims: Vec<i64>, length: u64) -> ModelProto {
        let at = ExternalRef { location: "weights.bin".into(), offset: 0, length };
        let mut m = ModelProto::default();
        let g = m.graph.mut_or_insert_default();
        g.initializer.push(external_tensor("w", dims, DataType::FLOAT, &at));
        g.node.push(NodeProto {
            op_type: "MatMul".into(),
            input: vec!["x".into(), "w".into()],
            output: vec!["y".into()],
            ..Default::default()
        });
        m
    }

    #[test]
    fn weight_dims_from_the_file_are_checked() {
        let t = targets(&matmul_model(vec![2, 3], 24), "weights.bin").unwrap();
        assert_eq!((t.len(), t[0].dims.as_slice(), t[0].axis()), (1, [2i64, 3].as_slice(), 1));
        // Negative dims whose product is positive, a zero dim, and dims whose byte count overflows: errors,
        // never a weight of absurd size handed to the quantizer.
        for (dims, length) in [(vec![-2, -3], 24), (vec![0, 3], 0), (vec![1 << 62, 4], 0)] {
            let e = targets(&matmul_model(dims.clone(), length), "weights.bin").unwrap_err();
            assert!(e.contains("bytes for fp32 dims"), "{dims:?}: {e}");
        }
    }
}
