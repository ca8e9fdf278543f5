//! `calibration quantize`: an fp32 export → a complete export folder whose selected graphs run their
//! checkpoint-weight MatMuls as `com.microsoft.MatMulNBits` (weight-only int8 or int4, symmetric,
//! blockwise; packing in [`crate::nbits`]).
//!
//! What changes and what does not:
//! - In each selected graph, every `MatMul` whose B input is a checkpoint weight — an fp32 2-D initializer
//!   stored in the export's external-data file (the exporter's `[in, out]` linear weights) — becomes
//!   `MatMulNBits(A, B_Q, scales)` with `K`, `N`, `bits`, `block_size` and (when not 0) `accuracy_level`,
//!   named like ONNX Runtime's reference quantizer names them (`NODE_Q4`, `WEIGHT_Q4`, `WEIGHT_scales`).
//!   MatMuls of two activations (attention) and MatMuls with an inline constant (the ±1 RoPE pair rotation:
//!   symmetric quantization cannot store its +1 exactly — it would become 7/8 in int4) stay.
//!   `--keep` keeps chosen weights at fp32.
//! - Graph inputs/outputs (names, dtypes, shapes) are untouched, so `runtime generate` needs nothing else;
//!   the runtime only has to load `com.microsoft` ops, which every ONNX Runtime build has.
//! - The output has its own `weights.bin`: the quantized blocks and scales (each once, shared by
//!   `ar_prefill` and `ar_step` as the fp32 weights were) and every untouched tensor, re-pointed; graphs
//!   not quantized (the decoder by default) are rewritten only to point there, so the folder stands alone.
//!   fp32 weights no graph uses any more are dropped.
//! - `manifest.json` is the input's with per-graph [`GraphPrecision`] for every graph (kind, block size,
//!   accuracy level, quantized MatMul count, kept weights, weight bytes per call) and the new weights size.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use exporter::onnx::{
    ai, external_ref, external_tensor, import_ms_domain_if_used, initializer_bytes, read_model, write_model,
    ExternalDataWriter, ExternalRef, MS_DOMAIN,
};
use exporter::ExportError;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::{ModelProto, NodeProto, TensorProto};
use spherear_core::fsutil::{check_folder_output, write_folder_atomically, FolderOutput};
use spherear_core::manifest::{
    GraphPrecision, Manifest, PrecisionKind, TensorDType, MANIFEST_FILE, MAX_ACCURACY_LEVEL, MIN_BLOCK_SIZE,
};

use crate::error::{CalibError, Result};
use crate::nbits::{self, BLOCK_SIZES};

/// Graphs quantized unless `--graphs` says otherwise (the decoder is conv-heavy and stays fp32).
pub const DEFAULT_GRAPHS: [&str; 3] = ["ar_prefill", "ar_step", "head_step"];
/// Default block size for int4 (one fp32 scale per 32 weights: 4.5 bits per weight).
pub const DEFAULT_BLOCK_INT4: usize = 32;
/// Default block size for int8: 128, the reference quantizer's own default (8.25 bits per weight; at 32 the
/// scales would add 12.5 % to the bytes every call reads, for an int8 rounding error already ~1/256 of a
/// block's largest weight).
pub const DEFAULT_BLOCK_INT8: usize = 128;
/// Default MatMulNBits accuracy level: 4 (int8 compute), the level with fast x86 kernels.
pub const DEFAULT_ACCURACY_LEVEL: u8 = 4;

/// Operators that hold quantized weights (or quantize on the fly): a graph with one of them is not a
/// source for weight-only quantization. (Other `com.microsoft` ops, e.g. fused attention, are fine.)
pub(crate) const QUANTIZED_OPS: [&str; 8] = [
    "MatMulNBits",
    "GatherBlockQuantized",
    "DequantizeLinear",
    "QuantizeLinear",
    "MatMulInteger",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
];

/// Weight width of `--weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightBits {
    Int8,
    Int4,
}

impl WeightBits {
    pub fn bits(self) -> u32 {
        match self {
            WeightBits::Int8 => 8,
            WeightBits::Int4 => 4,
        }
    }
    /// The manifest precision of a graph quantized to this width.
    pub fn kind(self) -> PrecisionKind {
        match self {
            WeightBits::Int8 => PrecisionKind::W8,
            WeightBits::Int4 => PrecisionKind::W4,
        }
    }
    pub fn default_block_size(self) -> usize {
        match self {
            WeightBits::Int8 => DEFAULT_BLOCK_INT8,
            WeightBits::Int4 => DEFAULT_BLOCK_INT4,
        }
    }
}

/// What to quantize and where.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// The fp32 export folder (`exporter onnx` output).
    pub model: PathBuf,
    /// The new export folder.
    pub out: PathBuf,
    pub weights: WeightBits,
    /// Weights per block along K (default by width: [`WeightBits::default_block_size`]).
    pub block_size: Option<usize>,
    /// Graphs to quantize (default [`DEFAULT_GRAPHS`]).
    pub graphs: Option<Vec<String>>,
    pub accuracy_level: u8,
    /// Checkpoint keys or key prefixes of MatMul weights to keep at fp32.
    pub keep: Vec<String>,
    /// Replace an existing export at `out`.
    pub force: bool,
}

impl QuantizeOptions {
    /// Options with the defaults for `model` → `out` at `weights`.
    pub fn new(model: impl Into<PathBuf>, out: impl Into<PathBuf>, weights: WeightBits) -> Self {
        QuantizeOptions {
            model: model.into(),
            out: out.into(),
            weights,
            block_size: None,
            graphs: None,
            accuracy_level: DEFAULT_ACCURACY_LEVEL,
            keep: Vec::new(),
            force: false,
        }
    }

    /// The block size used, after checking it (a power of two the reference implements: 16..=256).
    pub fn effective_block_size(&self) -> Result<usize> {
        let bs = self.block_size.unwrap_or(self.weights.default_block_size());
        if bs < MIN_BLOCK_SIZE || !bs.is_power_of_two() {
            return Err(CalibError::Invalid(format!(
                "--block-size must be a power of two >= {MIN_BLOCK_SIZE} (got {bs})"
            )));
        }
        if !BLOCK_SIZES.contains(&bs) {
            return Err(CalibError::Invalid(format!(
                "--block-size {bs} is not supported: ONNX Runtime's quantizer (MLAS) implements blocks of {}",
                BLOCK_SIZES.map(|b| b.to_string()).join(", ")
            )));
        }
        Ok(bs)
    }

    fn validate(&self) -> Result<usize> {
        if self.accuracy_level > MAX_ACCURACY_LEVEL {
            return Err(CalibError::Invalid(format!(
                "--accuracy-level must be in 0..={MAX_ACCURACY_LEVEL} (got {})",
                self.accuracy_level
            )));
        }
        if let Some(k) = self.keep.iter().find(|k| k.trim().is_empty()) {
            return Err(CalibError::Invalid(format!("--keep has an empty name ('{k}')")));
        }
        self.effective_block_size()
    }
}

/// What happened to one graph.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphReport {
    pub name: String,
    pub precision: GraphPrecision,
    /// Checkpoint-weight MatMuls in the graph (quantized + kept; 0 for graphs not selected).
    pub candidates: usize,
    /// Weight bytes per call before (the fp32 graph) and after.
    pub weight_bytes_before: u64,
    pub weight_bytes_after: u64,
    /// Largest relative RMS rounding error of a quantized weight, ‖W − dequant(Q)‖ / ‖W‖ (0 if none).
    pub max_weight_rel_rms: f64,
}

/// Result of [`quantize_export`].
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub manifest: Manifest,
    pub block_size: usize,
    pub graphs: Vec<GraphReport>,
    /// Sizes of the input's and the output's weights file.
    pub weights_bytes_before: u64,
    pub weights_bytes_after: u64,
}

/// Loads the manifest of the export a command quantizes from (`verb`: "quantize", "calibrate"): an existing
/// `exporter onnx` folder, not already quantized, fp32 (`fp16_why`: why an fp16 source is refused).
pub(crate) fn load_fp32_source(dir: &Path, verb: &str, fp16_why: &str) -> Result<Manifest> {
    if !dir.is_dir() {
        let what = if dir.exists() { "is not a folder" } else { "does not exist" };
        return Err(model_err(dir, format!("{what} (expected an `exporter onnx` folder)")));
    }
    let manifest = Manifest::load(dir)?;
    let compute = manifest.precision.compute;
    if manifest.is_quantized() {
        let q: Vec<String> =
            manifest.graphs.iter().map(|(n, g)| format!("{n} {}", g.precision_or(compute).kind)).collect();
        return Err(model_err(
            dir,
            format!("is already quantized ({}); {verb} the fp32 export it was made from", q.join(", ")),
        ));
    }
    if compute != TensorDType::Float32 {
        return Err(model_err(
            dir,
            format!(
                "is an fp16 export, which is not supported: {verb} the fp32 export of the same checkpoint \
                 (`exporter onnx` without --fp16) — {fp16_why}"
            ),
        ));
    }
    Ok(manifest)
}

/// Bytes of an fp32 tensor with `dims` as read from a file: `None` unless every dim is positive and the
/// count fits a `u64`.
pub(crate) fn fp32_bytes(dims: &[i64]) -> Option<u64> {
    dims.iter().try_fold(4u64, |acc, &d| u64::try_from(d).ok().filter(|&d| d > 0)?.checked_mul(acc))
}

pub(crate) fn model_err(dir: &Path, msg: impl Into<String>) -> CalibError {
    CalibError::Model { path: dir.display().to_string(), msg: msg.into() }
}

/// The message of an error of the exporter's ONNX layer, without the variant's prefix.
pub(crate) fn onnx_msg(e: ExportError) -> String {
    match e {
        ExportError::Graph(m) | ExportError::Io(m) => m,
        other => other.to_string(),
    }
}

/// The official checkpoint key of a MatMul weight initializer (`KEY.T` → `KEY`).
pub fn checkpoint_key(init_name: &str) -> &str {
    init_name.strip_suffix(".T").unwrap_or(init_name)
}

/// Whether `--keep NAME` selects checkpoint key `key`: the exact key or a prefix of it.
fn keep_matches(name: &str, key: &str) -> bool {
    key.starts_with(name)
}

/// A MatMul whose B is a checkpoint weight: node index, B initializer name, its location, K, N.
#[derive(Debug, Clone)]
struct Candidate {
    node: usize,
    init: String,
    at: ExternalRef,
    k: usize,
    n: usize,
}

/// The checkpoint-weight MatMuls of `model` (see the module doc), in node order.
fn candidates(model: &ModelProto, weights_file: &str) -> std::result::Result<Vec<Candidate>, String> {
    let g = &model.graph;
    let inits: HashMap<&str, &TensorProto> = g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = Vec::new();
    for (i, node) in g.node.iter().enumerate() {
        if node.op_type != "MatMul" || !node.domain.is_empty() || node.input.len() != 2 {
            continue;
        }
        let Some(t) = inits.get(node.input[1].as_str()) else { continue };
        let Some(at) = external_ref(t).map_err(onnx_msg)? else { continue };
        if at.location != weights_file || t.data_type != DataType::FLOAT as i32 || t.dims.len() != 2 {
            continue;
        }
        if fp32_bytes(&t.dims) != Some(at.length) {
            return Err(format!("initializer {}: {} bytes for a {:?} fp32 weight", t.name, at.length, t.dims));
        }
        // Both dims positive and their byte count a u64, so they fit a usize here.
        let (k, n) = (t.dims[0] as usize, t.dims[1] as usize);
        out.push(Candidate { node: i, init: t.name.clone(), at, k, n });
    }
    Ok(out)
}

/// Reads byte ranges of the input export's weights file (`quantize` and `calibrate` read their source
/// weights through it).
pub(crate) struct Source {
    file: File,
    path: PathBuf,
    /// Length of the file in bytes.
    pub(crate) len: u64,
}

impl Source {
    /// Opens `weights_file` of the export folder `dir`.
    pub(crate) fn open(dir: &Path, weights_file: &str) -> Result<Source> {
        let path = dir.join(weights_file);
        let file = File::open(&path).map_err(|e| model_err(dir, format!("cannot open {weights_file}: {e}")))?;
        let len = file.metadata().map_err(|e| model_err(dir, format!("{weights_file}: {e}")))?.len();
        Ok(Source { file, path, len })
    }

    pub(crate) fn read(&mut self, at: &ExternalRef) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; at.length as usize];
        self.file
            .seek(SeekFrom::Start(at.offset))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(|e| CalibError::Io(format!("cannot read {}: {e}", self.path.display())))?;
        Ok(buf)
    }
}

pub(crate) fn to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A weight quantized into the output: where B_Q and the scales went, their dims, its rounding error.
#[derive(Debug, Clone)]
struct Placed {
    data: ExternalRef,
    data_dims: Vec<i64>,
    scales: ExternalRef,
    scale_dims: Vec<i64>,
    rel_rms: f64,
}

/// One graph of the input, read and checked.
struct Input {
    name: String,
    file: String,
    model: ModelProto,
    /// Candidates to quantize (selected graphs only, `--keep` applied later).
    cands: Vec<Candidate>,
}

/// Quantizes `opts.model` into `opts.out` (see the module doc). `progress(done, total)` is called as
/// weight bytes are processed. Nothing is written at `opts.out` unless everything succeeds.
/// Everything [`quantize_export`] checks before it reads a graph: the options, the source export (an
/// fp32, unquantized `exporter onnx` folder), the graphs asked for and the output folder. Returns the block
/// size, the source manifest and the selected graphs.
pub fn preflight(opts: &QuantizeOptions) -> Result<(usize, Manifest, BTreeSet<String>)> {
    let block_size = opts.validate()?;
    let dir = &opts.model;
    let manifest = load_fp32_source(
        dir,
        "quantize",
        "its weights are unrounded, and at accuracy level 4 MatMulNBits computes in int8 whatever the activation \
         dtype, so an fp16 source would only add a second rounding",
    )?;
    let selected = select_graphs(opts, &manifest)?;
    let keys = quantizable_keys(&manifest.config, &selected);
    check_keep(&opts.keep, &keys.iter().map(String::as_str).collect(), &selected)?;
    let ours = |p: &Path| exporter::export::holds_export(p);
    check_folder_output(&FolderOutput {
        out: &opts.out,
        force: opts.force,
        kind: "an export",
        is_ours: &ours,
        inputs: &[dir.as_path()],
    })?;
    Ok((block_size, manifest, selected))
}

/// The checkpoint keys of the MatMul weights the graphs `selected` use, from the official key layout: the
/// 2-D `.weight` keys except the looked-up tables (`cls_embedding`, `pos_for_diff`); the head's in
/// `head_step`, the others in `ar_prefill`/`ar_step`.
pub fn quantizable_keys(cfg: &spherear_core::ModelConfig, selected: &BTreeSet<String>) -> Vec<String> {
    let (ar, head) = (selected.contains("ar_prefill") || selected.contains("ar_step"), selected.contains("head_step"));
    spherear_core::keys::ar_keys(cfg)
        .into_iter()
        .filter(|k| k.shape.len() == 2 && k.name.ends_with(".weight"))
        .filter(|k| !k.name.starts_with("cls_embedding.") && !k.name.starts_with("pos_for_diff."))
        .filter(|k| if k.name.starts_with("head.") { head } else { ar })
        .map(|k| k.name)
        .collect()
}

/// Every `--keep` name must select at least one of `keys`.
fn check_keep(keep: &[String], keys: &BTreeSet<&str>, selected: &BTreeSet<String>) -> Result<()> {
    for k in keep {
        if !keys.iter().any(|key| keep_matches(k, key)) {
            let example = keys.iter().next().copied().unwrap_or("layers.0.attention.wqkv.weight");
            return Err(CalibError::Invalid(format!(
                "--keep '{k}' matches no MatMul weight of the graphs being quantized ({}); names are checkpoint \
                 keys such as '{example}' or key prefixes such as 'head.net.res_blocks.0.'",
                selected.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    Ok(())
}

pub fn quantize_export(opts: &QuantizeOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<QuantizeReport> {
    let (block_size, manifest, selected) = preflight(opts)?;
    let dir = &opts.model;
    let compute = manifest.precision.compute;

    // Read every graph; refuse quantized ops the manifest did not declare.
    let weights_file = manifest.weights.file.clone();
    let mut inputs = Vec::new();
    for (name, g) in &manifest.graphs {
        let path = dir.join(&g.file);
        let model = read_model(&path).map_err(|e| model_err(dir, format!("graph {name}: {}", onnx_msg(e))))?;
        if let Some(n) = model.graph.node.iter().find(|n| QUANTIZED_OPS.contains(&n.op_type.as_str())) {
            return Err(model_err(
                dir,
                format!(
                    "graph {name} already holds {} nodes (the manifest says fp32): it is already quantized or \
                     not an `exporter onnx` graph",
                    if n.domain.is_empty() { n.op_type.clone() } else { format!("{}.{}", n.domain, n.op_type) }
                ),
            ));
        }
        let cands = if selected.contains(name) {
            candidates(&model, &weights_file).map_err(|e| model_err(dir, format!("graph {name}: {e}")))?
        } else {
            Vec::new()
        };
        inputs.push(Input { name: name.clone(), file: g.file.clone(), model, cands });
    }

    // --keep: every name must select at least one candidate weight (checked against the key layout in
    // `preflight`; here against the graphs themselves).
    let all_keys: BTreeSet<&str> =
        inputs.iter().flat_map(|i| i.cands.iter().map(|c| checkpoint_key(&c.init))).collect();
    check_keep(&opts.keep, &all_keys, &selected)?;
    let kept = |c: &Candidate| opts.keep.iter().any(|k| keep_matches(k, checkpoint_key(&c.init)));
    if inputs.iter().all(|i| i.cands.iter().all(kept)) {
        return Err(CalibError::Invalid(format!(
            "nothing to quantize: --keep keeps every MatMul weight of {}",
            selected.iter().cloned().collect::<Vec<_>>().join(", ")
        )));
    }

    // The input's weights file must hold every external range the graphs point at.
    let mut src = Source::open(dir, &weights_file)?;
    let mut ranges: HashSet<(u64, u64)> = HashSet::new();
    for i in &inputs {
        for t in &i.model.graph.initializer {
            let Some(at) = external_ref(t).map_err(|e| model_err(dir, format!("graph {}: {}", i.name, onnx_msg(e))))?
            else {
                continue;
            };
            if at.location != weights_file {
                return Err(model_err(
                    dir,
                    format!(
                        "graph {}: initializer {} is in '{}', not in the manifest's weights file {weights_file}",
                        i.name, t.name, at.location
                    ),
                ));
            }
            if at.offset.checked_add(at.length).is_none_or(|end| end > src.len) {
                return Err(model_err(
                    dir,
                    format!(
                        "{weights_file} has {} bytes but graph {} needs bytes {}..{} for {}: the export is \
                         incomplete or corrupt",
                        src.len,
                        i.name,
                        at.offset,
                        at.offset.saturating_add(at.length),
                        t.name
                    ),
                ));
            }
            ranges.insert((at.offset, at.length));
        }
    }
    let total: u64 = ranges.iter().map(|r| r.1).sum();

    let bits = opts.weights.bits();
    let weights_before = manifest.weights.bytes;
    let mut done = 0u64;
    let (manifest_out, graphs) = write_folder_atomically(&opts.out, |tmp: &Path| -> Result<_> {
        let mut out = ExternalDataWriter::create(tmp, &weights_file)?;
        let mut copied: HashMap<(u64, u64), ExternalRef> = HashMap::new();
        let mut quantized: HashMap<(u64, u64), Placed> = HashMap::new();
        let mut parameters = 0usize;
        let mut reports = Vec::new();
        let mut m = manifest.clone();
        for input in &mut inputs {
            let before = initializer_bytes(&input.model.graph.node, &input.model.graph.initializer).0;
            let g = input.model.graph.mut_or_insert_default();
            let mut new_inits: Vec<TensorProto> = Vec::new();
            let mut added: HashSet<String> = HashSet::new();
            let (mut n_quant, mut kept_keys, mut worst) = (0usize, BTreeSet::new(), 0f64);
            for c in &input.cands {
                if kept(c) {
                    kept_keys.insert(checkpoint_key(&c.init).to_string());
                    continue;
                }
                let key = (c.at.offset, c.at.length);
                let p = match quantized.entry(key) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(slot) => {
                        let w = to_f32(&src.read(&c.at)?);
                        if let Some(v) = w.iter().find(|v| !v.is_finite()) {
                            return Err(model_err(dir, format!("weight {} holds a non-finite value ({v})", c.init)));
                        }
                        let p = nbits::quantize(&w, c.k, c.n, bits, block_size);
                        let rel_rms = rel_rms(&w, &p.dequantize());
                        let data = out.append(&p.data)?;
                        let scales = out.append(&p.scale_bytes())?;
                        parameters += c.k * c.n;
                        done += c.at.length;
                        progress(done, total);
                        slot.insert(Placed {
                            data,
                            data_dims: p.data_dims(),
                            scales,
                            scale_dims: p.scale_dims(),
                            rel_rms,
                        })
                    }
                };
                worst = worst.max(p.rel_rms);
                let (q_name, s_name) = (format!("{}_Q{bits}", c.init), format!("{}_scales", c.init));
                if added.insert(c.init.clone()) {
                    new_inits.push(external_tensor(&q_name, p.data_dims.clone(), DataType::UINT8, &p.data));
                    new_inits.push(external_tensor(&s_name, p.scale_dims.clone(), DataType::FLOAT, &p.scales));
                }
                let old = &g.node[c.node];
                let mut attribute = vec![
                    ai("K", c.k as i64),
                    ai("N", c.n as i64),
                    ai("bits", bits as i64),
                    ai("block_size", block_size as i64),
                ];
                if opts.accuracy_level != 0 {
                    attribute.push(ai("accuracy_level", i64::from(opts.accuracy_level)));
                }
                let node = NodeProto {
                    name: if old.name.is_empty() { String::new() } else { format!("{}_Q{bits}", old.name) },
                    op_type: "MatMulNBits".into(),
                    domain: MS_DOMAIN.into(),
                    input: vec![old.input[0].clone(), q_name, s_name],
                    output: old.output.clone(),
                    attribute,
                    ..Default::default()
                };
                g.node[c.node] = node;
                n_quant += 1;
            }
            // Drop initializers no node uses any more (the replaced fp32 weights), re-point the rest.
            let used: HashSet<String> = g.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
            let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
            g.initializer.retain(|t| used.contains(&t.name) || outputs.contains(&t.name));
            for t in g.initializer.iter_mut() {
                let Some(at) = external_ref(t)? else { continue };
                let key = (at.offset, at.length);
                let to = match copied.get(&key) {
                    Some(r) => r.clone(),
                    None => {
                        let bytes = src.read(&at)?;
                        let r = out.append(&bytes)?;
                        parameters += element_count(t);
                        done += at.length;
                        progress(done, total);
                        copied.insert(key, r.clone());
                        r
                    }
                };
                *t = external_tensor(&t.name, t.dims.clone(), data_type(t), &to);
            }
            g.initializer.extend(new_inits);
            import_ms_domain_if_used(&mut input.model);
            let (weight_bytes, lookup_bytes) =
                initializer_bytes(&input.model.graph.node, &input.model.graph.initializer);
            let precision = if n_quant > 0 {
                GraphPrecision {
                    kind: opts.weights.kind(),
                    block_size: Some(block_size),
                    accuracy_level: Some(opts.accuracy_level),
                    quantized_matmuls: n_quant,
                    kept: kept_keys.into_iter().collect(),
                    weight_bytes: Some(weight_bytes),
                    lookup_bytes: Some(lookup_bytes),
                }
            } else {
                GraphPrecision {
                    weight_bytes: Some(weight_bytes),
                    lookup_bytes: Some(lookup_bytes),
                    ..GraphPrecision::source(compute)
                }
            };
            write_model(&input.model, &tmp.join(&input.file))?;
            if let Some(e) = m.graphs.get_mut(&input.name) {
                e.precision = Some(precision.clone());
            }
            reports.push(GraphReport {
                name: input.name.clone(),
                precision,
                candidates: input.cands.len(),
                weight_bytes_before: before,
                weight_bytes_after: weight_bytes,
                max_weight_rel_rms: worst,
            });
        }
        m.weights.bytes = out.bytes();
        m.weights.parameters = parameters;
        m.weights.doc = format!(
            "{} Quantized MatMul weights (graphs whose precision is w8/w4) are MatMulNBits inputs: uint8 blocks \
             [N, ceil(K / block_size), block_size * bits / 8] and fp32 scales [N, ceil(K / block_size)], \
             symmetric (no zero points), as ONNX Runtime's MatMulNBitsQuantizer packs them; parameters counts \
             each quantized weight's K * N once.",
            manifest.weights.doc.trim_end()
        );
        m.producer = format!(
            "spherear calibration {} (quantize --weights {} --block-size {block_size} --accuracy-level {}) from: {}",
            env!("CARGO_PKG_VERSION"),
            if bits == 8 { "int8" } else { "int4" },
            opts.accuracy_level,
            manifest.producer
        );
        out.finish()?;
        let text = m.to_json()?;
        // The manifest written must be one every reader accepts.
        let m = Manifest::from_json(&text)?;
        std::fs::write(tmp.join(MANIFEST_FILE), text)
            .map_err(|e| CalibError::Io(format!("cannot write {MANIFEST_FILE}: {e}")))?;
        Ok((m, reports))
    })?;
    let weights_bytes_after = manifest_out.weights.bytes;
    Ok(QuantizeReport {
        manifest: manifest_out,
        block_size,
        graphs,
        weights_bytes_before: weights_before,
        weights_bytes_after,
    })
}

pub(crate) fn data_type(t: &TensorProto) -> DataType {
    use protobuf::Enum;
    DataType::from_i32(t.data_type).unwrap_or(DataType::UNDEFINED)
}

/// Elements of a tensor (from its dims), for the manifest's parameter count.
pub(crate) fn element_count(t: &TensorProto) -> usize {
    t.dims.iter().map(|&d| d.max(0) as usize).product()
}

fn rel_rms(w: &[f32], d: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in w.iter().zip(d) {
        num += f64::from(a - b).powi(2);
        den += f64::from(*a).powi(2);
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        0.0
    }
}

/// The graphs to quantize: `--graphs` (deduplicated, each must exist) or [`DEFAULT_GRAPHS`].
fn select_graphs(opts: &QuantizeOptions, m: &Manifest) -> Result<BTreeSet<String>> {
    let want: Vec<String> = match &opts.graphs {
        Some(g) => g.clone(),
        None => DEFAULT_GRAPHS.iter().map(|s| s.to_string()).collect(),
    };
    if want.is_empty() {
        return Err(CalibError::Invalid("--graphs names no graph".into()));
    }
    let mut out = BTreeSet::new();
    for g in want {
        if !m.graphs.contains_key(&g) {
            let have: Vec<&str> = m.graphs.keys().map(String::as_str).collect();
            let hint = if opts.graphs.is_none() { " (the default list; pass --graphs)" } else { "" };
            return Err(CalibError::Invalid(format!(
                "--graphs: unknown graph '{g}'{hint}; this export has {}",
                have.join(", ")
            )));
        }
        out.insert(g);
    }
    Ok(out)
}

/// Per-graph summary lines for the CLI.
pub fn summary(r: &QuantizeReport) -> Vec<String> {
    let mb = |b: u64| b as f64 / 1e6;
    let mut lines: Vec<String> = r
        .graphs
        .iter()
        .map(|g| {
            let p = &g.precision;
            let what = match p.kind.weight_bits() {
                Some(_) => format!(
                    "{} ({} of {} weight MatMuls, {} kept; worst weight rel. RMS error {:.2e})",
                    p.kind,
                    p.quantized_matmuls,
                    g.candidates,
                    p.kept.len(),
                    g.max_weight_rel_rms
                ),
                None if g.candidates > 0 => format!("{} (every weight MatMul kept)", p.kind),
                None => format!("{} (not selected)", p.kind),
            };
            format!(
                "  {:<11} {what}: weights per call {:.2} MB -> {:.2} MB",
                g.name,
                mb(g.weight_bytes_before),
                mb(g.weight_bytes_after)
            )
        })
        .collect();
    lines.push(format!(
        "  weights file {:.2} MB -> {:.2} MB (block size {})",
        mb(r.weights_bytes_before),
        mb(r.weights_bytes_after),
        r.block_size
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qdq::tests::matmul_model;

    #[test]
    fn weight_dims_from_the_file_are_checked() {
        let c = candidates(&matmul_model(vec![2, 3], 24), "weights.bin").unwrap();
        assert_eq!((c.len(), c[0].k, c[0].n), (1, 2, 3));
        // [2^62 + 1, 1]: k · n · 4 wraps to 4 in usize arithmetic; a negative dim; a size that does not match.
        for (dims, length) in [(vec![(1 << 62) + 1, 1], 4), (vec![-1, 3], 12), (vec![2, 3], 20)] {
            let e = candidates(&matmul_model(dims.clone(), length), "weights.bin").unwrap_err();
            assert!(e.contains("fp32 weight"), "{dims:?}: {e}");
        }
    }
}
