//! [`Generator`]: an export loaded once (immutable: four sessions, the manifest, the provider decision)
//! and the per-batch generation state that owns the KV cache and every input/output buffer.
//!
//! The sampling procedure is the reference sampler's (`trainer::sample`): both run the token loop of
//! [`spherear_core::sampler`] (token plan, noise order, Euler–Maruyama loop, final Euler step, projection,
//! feeding the token to both CFG halves, non-finite checks, timing); this module is its ONNX Runtime
//! [`TokenBackend`]. Only the graphs differ (ONNX Runtime vs libtorch).
//!
//! Buffers: per batch, the KV cache ([2B or B, heads, T, head_dim] per layer and key/value, in the export's
//! KV dtype) is allocated once and bound both as `ar_prefill`'s `present.*` outputs and as `ar_step`'s
//! `past_key_values.*` inputs *and* `present.*` outputs, so every step updates it in place (the graph
//! writes each row's position). Condition, token, position, x_t, t and velocity tensors are allocated once per
//! batch and bound through [`IoBinding`]s; the token loop allocates nothing proportional to the cache.
//!
//! Observer hook ([`GraphObserver`], [`Generator::set_observer`]): a caller may watch the host inputs of
//! every graph run (e.g. `calibration calibrate` records activation ranges from real rollouts instead of
//! running a sampling loop of its own). Without an observer the hook costs one `Option` check per run and
//! allocates nothing.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, Tensor, TensorElementType};
use spherear_core::manifest::{GraphEntry, Manifest, Stage, TensorDType};
use spherear_core::sampler::{sample_request, Feed, LoopShape, TokenBackend};
use spherear_core::schedule::token_plan;
use spherear_core::timing::Timing;
use spherear_core::CoreError;

use crate::error::{ort_err, Result, RuntimeError};
use crate::ortlib;
use crate::provider::{self, Provider, ProviderOptions, ProviderReport};

/// How to load an export.
#[derive(Debug, Clone, Default)]
pub struct GeneratorOptions {
    pub provider: ProviderOptions,
    /// Threads of the intra-op pool all sessions of the process share (default: one per CPU; the first
    /// load in a process fixes it, see [`ortlib::environment`]).
    pub threads: Option<usize>,
    /// The ONNX Runtime library (else `ORT_DYLIB_PATH`, else the workspace `.venv`; see [`ortlib`]).
    pub ort_lib: Option<PathBuf>,
}

/// Values of one graph input as a [`GraphObserver`] sees them (host memory, borrowed for the call).
#[derive(Debug, Clone, Copy)]
pub enum ObservedData<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

/// One input of a graph run: its name in the graph, its shape and its values.
#[derive(Debug, Clone, Copy)]
pub struct ObservedInput<'a> {
    pub name: &'a str,
    pub shape: &'a [i64],
    pub data: ObservedData<'a>,
}

/// Watches graph runs of a [`Generator`] (see [`Generator::set_observer`]).
///
/// Before every run of `ar_prefill`, `ar_step`, `head_step` (token sampling) and `decoder`
/// ([`Generator::decode`]) the generator asks [`GraphObserver::wants`]; when it says yes it calls
/// [`GraphObserver::observe`] with every input of that run exactly as the graph is about to read it
/// (for `ar_step` the KV cache before this step's position is written). The slices borrow the generator's
/// buffers for the duration of the call only: copy what you keep. An `Err` stops the generation with
/// [`RuntimeError::Model`]. Both methods run on the generating thread, inside the token loop: keep
/// `wants` cheap (a counter), do heavy work only for the runs you take.
pub trait GraphObserver: Send + Sync {
    /// Whether the next run of `graph` should be passed to [`GraphObserver::observe`].
    fn wants(&self, graph: &str) -> bool;
    /// The inputs of a run of `graph` that [`GraphObserver::wants`] accepted, just before it runs.
    fn observe(&self, graph: &str, inputs: &[ObservedInput<'_>]) -> std::result::Result<(), String>;
}

impl std::fmt::Debug for dyn GraphObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GraphObserver")
    }
}

/// Calls `observer` for a run of `graph` when it wants it; `inputs` builds the input views only then.
fn notify<'a>(
    observer: Option<&dyn GraphObserver>,
    graph: &str,
    inputs: impl FnOnce() -> Result<Vec<ObservedInput<'a>>>,
) -> Result<()> {
    let Some(o) = observer else { return Ok(()) };
    if !o.wants(graph) {
        return Ok(());
    }
    let inputs = inputs()?;
    o.observe(graph, &inputs).map_err(|e| RuntimeError::Model(format!("{graph} observer: {e}")))
}

fn f32_view<'a, T: ort::value::TensorValueTypeMarker + ?Sized>(
    name: &'a str,
    t: &'a ort::value::Value<T>,
) -> Result<ObservedInput<'a>> {
    let (shape, data) = t.try_extract_tensor::<f32>().map_err(ort_err(format!("observing {name}")))?;
    Ok(ObservedInput { name, shape, data: ObservedData::F32(data) })
}

fn i64_view<'a>(name: &'a str, t: &'a Tensor<i64>) -> Result<ObservedInput<'a>> {
    let (shape, data) = t.try_extract_tensor::<i64>().map_err(ort_err(format!("observing {name}")))?;
    Ok(ObservedInput { name, shape, data: ObservedData::I64(data) })
}

/// A generation request: the core sampling request (classes, cfg, steps, seed, batch).
pub use spherear_core::request::SampleRequest as GenerateRequest;

/// Checks a request against an export (the same rules as the reference sampler).
pub fn validate_request(req: &GenerateRequest, manifest: &Manifest) -> Result<()> {
    req.validate(manifest.num_classes).map_err(|e| RuntimeError::Invalid(strip_invalid(e.to_string())))
}

fn strip_invalid(s: String) -> String {
    s.strip_prefix("invalid argument: ").map(str::to_string).unwrap_or(s)
}

/// Generated tokens [n, num_tokens, dim], on the radius-R sphere (unless the manifest's posterior is gaussian).
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub data: Vec<f32>,
    pub n: usize,
    pub num_tokens: usize,
    pub dim: usize,
}

/// Work and time of a generation: the core sampler's stats (`trainer sample` reports the same type).
pub use spherear_core::sampler::SampleStats as GenerateStats;

/// An export loaded into ONNX Runtime: sessions are created once; generation takes `&self`.
pub struct Generator {
    dir: PathBuf,
    manifest: Manifest,
    pub(crate) prefill: Mutex<Session>,
    pub(crate) step: Mutex<Session>,
    pub(crate) head: Mutex<Session>,
    decoder: Mutex<Session>,
    provider: ProviderReport,
    options: GeneratorOptions,
    ort_lib: PathBuf,
    /// See [`Generator::set_observer`].
    observer: Option<Arc<dyn GraphObserver>>,
}

const AR_GRAPHS: [&str; 4] = ["ar_prefill", "ar_step", "head_step", "decoder"];

pub(crate) fn kv_names(i: usize) -> [String; 4] {
    [
        format!("past_key_values.{i}.key"),
        format!("past_key_values.{i}.value"),
        format!("present.{i}.key"),
        format!("present.{i}.value"),
    ]
}

/// The names and dtypes the runtime binds, per graph: (inputs, outputs).
type Signature = Vec<(String, TensorDType)>;

fn expected_io(m: &Manifest, graph: &str) -> (Signature, Signature) {
    let f = TensorDType::Float32;
    let kv = m.kv_cache.as_ref().map(|k| k.dtype).unwrap_or(f);
    let layers = m.kv_cache.as_ref().map(|k| k.layers).unwrap_or(0);
    let s = |n: &str, d| (n.to_string(), d);
    let present = (0..layers).flat_map(|i| {
        let [_, _, k, v] = kv_names(i);
        [(k, kv), (v, kv)]
    });
    let past = (0..layers).flat_map(|i| {
        let [k, v, _, _] = kv_names(i);
        [(k, kv), (v, kv)]
    });
    match graph {
        "ar_prefill" => {
            (vec![s("class_ids", TensorDType::Int64)], std::iter::once(s("condition", f)).chain(present).collect())
        }
        "ar_step" => (
            [s("token", f), s("position", TensorDType::Int64)].into_iter().chain(past).collect(),
            std::iter::once(s("condition", f)).chain(present).collect(),
        ),
        "head_step" => (vec![s("x_t", f), s("t", f), s("condition", f)], vec![s("velocity", f)]),
        _ => (vec![s("tokens", f)], vec![s("image", f)]),
    }
}

fn check_graph_entry(m: &Manifest, name: &str, g: &GraphEntry) -> Result<()> {
    let (ins, outs) = expected_io(m, name);
    for (kind, want, have) in [("input", &ins, &g.inputs), ("output", &outs, &g.outputs)] {
        for (n, dt) in want {
            match have.iter().find(|s| &s.name == n) {
                None => {
                    return Err(RuntimeError::Model(format!("graph {name}: the manifest declares no {kind} '{n}'")))
                }
                Some(s) if s.dtype != *dt => {
                    return Err(RuntimeError::Model(format!(
                        "graph {name}: {kind} '{n}' is {:?} in the manifest, expected {dt:?}",
                        s.dtype
                    )))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// The external-data file must exist with exactly the manifest's byte count: a truncated or replaced
/// `weights.bin` is one clear error here instead of an ONNX Runtime exception later.
fn check_weights_file(dir: &Path, m: &Manifest) -> Result<()> {
    let path = dir.join(&m.weights.file);
    let len = std::fs::metadata(&path)
        .map_err(|e| RuntimeError::Model(format!("weights file {} cannot be read: {e}", path.display())))?
        .len();
    if len != m.weights.bytes {
        return Err(RuntimeError::Model(format!(
            "weights file {} has {len} bytes but the manifest records {}: it is truncated or from another export; \
             export again",
            path.display(),
            m.weights.bytes
        )));
    }
    Ok(())
}

pub(crate) fn lock<'a>(m: &'a Mutex<Session>, what: &str) -> Result<MutexGuard<'a, Session>> {
    m.lock().map_err(|_| RuntimeError::Model(format!("{what} session lock poisoned by an earlier panic")))
}

impl Generator {
    /// Loads `dir` (an `exporter onnx` folder): manifest (format version checked), provider decision, sessions.
    pub fn load(dir: &Path, options: &GeneratorOptions) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        Self::with_manifest(dir, manifest, options)
    }

    /// [`Generator::load`] with a manifest already read (and a request already validated against it).
    pub fn with_manifest(dir: &Path, manifest: Manifest, options: &GeneratorOptions) -> Result<Self> {
        if manifest.stage != Stage::Ar {
            return Err(RuntimeError::Model(format!(
                "{} is a decoder-only (stage vae) export; generation needs an export of an AR checkpoint",
                dir.display()
            )));
        }
        if options.threads == Some(0) {
            return Err(RuntimeError::Invalid("--threads must be >= 1".into()));
        }
        options.provider.validate()?;
        for name in AR_GRAPHS {
            let g =
                manifest.graphs.get(name).ok_or_else(|| RuntimeError::Model(format!("manifest lacks graph {name}")))?;
            check_graph_entry(&manifest, name, g)?;
            let file = dir.join(&g.file);
            if !file.is_file() {
                return Err(RuntimeError::Model(format!("graph file {} is missing", file.display())));
            }
        }
        check_weights_file(dir, &manifest)?;
        let (env, ort_lib) = ortlib::environment_with_threads(options.ort_lib.as_deref(), options.threads)?;
        let provider = provider::resolve(&options.provider)?;
        if let Some(dir) = &options.provider.tensorrt.engine_cache {
            std::fs::create_dir_all(dir).map_err(|e| {
                RuntimeError::Io(format!("cannot create the TensorRT engine cache {}: {e}", dir.display()))
            })?;
        }
        let mut provider = provider;
        let mut sessions = Vec::with_capacity(4);
        for name in AR_GRAPHS {
            let g = &manifest.graphs[name];
            let (session, report) = Self::session(&env, dir, name, g, &manifest, options, &provider)?;
            provider = report;
            sessions.push(Mutex::new(session));
        }
        let mut it = sessions.into_iter();
        let mut next = || it.next().ok_or_else(|| RuntimeError::Model("internal: session list".into()));
        let (prefill, step, head, decoder) = (next()?, next()?, next()?, next()?);
        Ok(Generator {
            dir: dir.to_path_buf(),
            manifest,
            prefill,
            step,
            head,
            decoder,
            provider,
            options: options.clone(),
            ort_lib,
            observer: None,
        })
    }

    /// Installs (`Some`) or removes (`None`) the [`GraphObserver`] that sees the inputs of every graph run
    /// from then on. Only with the CPU provider: elsewhere the KV cache lives in device memory.
    pub fn set_observer(&mut self, observer: Option<Arc<dyn GraphObserver>>) -> Result<()> {
        if observer.is_some() && self.provider.active != Provider::Cpu {
            return Err(RuntimeError::Invalid(format!(
                "a graph observer needs the CPU provider (active: {})",
                self.provider.active.name()
            )));
        }
        self.observer = observer;
        Ok(())
    }

    /// One session. A provider whose registration fails falls back to CPU (logged once) unless strict; a
    /// fallback applies to the graphs loaded after it too.
    fn session(
        env: &ort::environment::Environment,
        dir: &Path,
        name: &str,
        g: &GraphEntry,
        m: &Manifest,
        options: &GeneratorOptions,
        report: &ProviderReport,
    ) -> Result<(Session, ProviderReport)> {
        let file = dir.join(&g.file);
        let ctx = format!("loading {}", file.display());
        let mut builder = Session::builder(env).map_err(ort_err(ctx.clone()))?;
        if let Some(n) = options.threads {
            builder = builder.with_intra_threads(n).map_err(ort_err(ctx.clone()))?;
        }
        let mut report = report.clone();
        if let Err(why) = provider::register(&mut builder, &report, &options.provider, g, name, m.max_batch) {
            report = provider::fallback_or_fail(&options.provider, Err(why))?;
            // The builder may hold a half-registered provider: start over on CPU.
            builder = Session::builder(env).map_err(ort_err(ctx.clone()))?;
            if let Some(n) = options.threads {
                builder = builder.with_intra_threads(n).map_err(ort_err(ctx.clone()))?;
            }
        }
        let session = builder.commit_from_file(&file).map_err(|e| {
            RuntimeError::Model(format!(
                "cannot load graph {}: {}",
                file.display(),
                crate::error::one_line(&e.to_string())
            ))
        })?;
        let mut have: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let mut want: Vec<&str> = g.inputs.iter().map(|s| s.name.as_str()).collect();
        have.sort_unstable();
        want.sort_unstable();
        if have != want {
            return Err(RuntimeError::Model(format!(
                "graph {} has inputs {have:?} but the manifest declares {want:?}",
                file.display()
            )));
        }
        Ok((session, report))
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The provider actually used (and why not the requested one).
    pub fn provider(&self) -> &ProviderReport {
        &self.provider
    }
    /// The ONNX Runtime library in use.
    pub fn ort_library(&self) -> &Path {
        &self.ort_lib
    }

    /// Images per batch actually used: `req.batch`, capped for TensorRT so that the AR rows (2B under CFG)
    /// stay within the optimisation profile's max batch.
    pub fn effective_batch(&self, req: &GenerateRequest) -> usize {
        if self.provider.active == Provider::TensorRt {
            let per_image = if token_plan(req.cfg, 0, self.manifest.num_tokens).doubled_batch { 2 } else { 1 };
            req.batch.min((self.manifest.max_batch / per_image).max(1))
        } else {
            req.batch
        }
    }

    /// Samples the tokens of every image of `req`, in batches; `on_tokens(n)` is called after each token
    /// step with the number of images of the batch (progress in tokens). A graph that produces NaN/Inf
    /// stops it with [`RuntimeError::NonFinite`] naming the graph and the token.
    pub fn generate_tokens(
        &self,
        req: &GenerateRequest,
        mut on_tokens: impl FnMut(usize),
    ) -> Result<(Tokens, GenerateStats)> {
        self.generate_tokens_until(req, |n| {
            on_tokens(n);
            ControlFlow::Continue(())
        })
    }

    /// [`Generator::generate_tokens`] that stops with [`RuntimeError::Cancelled`] as soon as `on_tokens`
    /// returns `ControlFlow::Break` (checked after every token step).
    pub fn generate_tokens_until(
        &self,
        req: &GenerateRequest,
        mut on_tokens: impl FnMut(usize) -> ControlFlow<()>,
    ) -> Result<(Tokens, GenerateStats)> {
        validate_request(req, &self.manifest)?;
        let m = &self.manifest;
        let shape = LoopShape {
            num_tokens: m.num_tokens,
            latent_dim: m.latent_dim,
            radius: m.token_radius(),
            null_class: m.null_class_id as i64,
        };
        let mut backend = OrtBackend {
            g: self,
            s: Sessions {
                prefill: lock(&self.prefill, "ar_prefill")?,
                step: lock(&self.step, "ar_step")?,
                head: lock(&self.head, "head_step")?,
            },
            state: None,
        };
        let run = sample_request(&mut backend, &shape, req, self.effective_batch(req), |p| on_tokens(p.images))
            .map_err(|e| match e {
                RuntimeError::Core(CoreError::NonFinite { graph, what, at }) => {
                    RuntimeError::NonFinite { graph, what, at }
                }
                e => e,
            })?;
        let ControlFlow::Continue((data, stats)) = run else {
            return Err(RuntimeError::Cancelled);
        };
        Ok((Tokens { data, n: req.classes.len(), num_tokens: shape.num_tokens, dim: shape.latent_dim }, stats))
    }

    /// Decodes tokens to images [n, 3, H, W] in [−1, 1], `batch` images per decoder run.
    pub fn decode(&self, tokens: &Tokens, batch: usize) -> Result<Vec<f32>> {
        self.decode_timed(tokens, batch, &mut Timing::default())
    }

    /// Samples and decodes every image of `req`: images [n, 3, H, W] in [−1, 1] in request order
    /// (`on_tokens` as in [`Generator::generate_tokens`]). What quality evaluation generates from.
    pub fn generate_images(&self, req: &GenerateRequest, on_tokens: impl FnMut(usize)) -> Result<Vec<f32>> {
        let (tokens, _) = self.generate_tokens(req, on_tokens)?;
        self.decode(&tokens, self.effective_batch(req))
    }

    /// [`Generator::decode`] that adds its time and calls to `timing`.
    pub fn decode_timed(&self, tokens: &Tokens, batch: usize, timing: &mut Timing) -> Result<Vec<f32>> {
        let m = &self.manifest;
        if tokens.num_tokens != m.num_tokens
            || tokens.dim != m.latent_dim
            || tokens.data.len() != tokens.n * m.num_tokens * m.latent_dim
        {
            return Err(RuntimeError::Invalid(format!(
                "tokens [{}, {}, {}] do not fit this model ([n, {}, {}])",
                tokens.n, tokens.num_tokens, tokens.dim, m.num_tokens, m.latent_dim
            )));
        }
        let per_tok = m.num_tokens * m.latent_dim;
        let per_img = 3 * m.image_size * m.image_size;
        let mut images = Vec::with_capacity(tokens.n * per_img);
        let mut session = lock(&self.decoder, "decoder")?;
        for chunk in tokens.data.chunks(batch.max(1) * per_tok) {
            let n = chunk.len() / per_tok;
            let t0 = Instant::now();
            let input = Tensor::from_array(([n, m.num_tokens, m.latent_dim], chunk.to_vec()))
                .map_err(ort_err("decoder input"))?;
            notify(self.observer.as_deref(), "decoder", || Ok(vec![f32_view("tokens", &input)?]))?;
            let outputs = session.run(ort::inputs!["tokens" => input]).map_err(ort_err("decoder"))?;
            let image =
                outputs.get("image").ok_or_else(|| RuntimeError::Model("decoder returned no 'image'".into()))?;
            let (_, v) = image.try_extract_tensor::<f32>().map_err(ort_err("decoder output"))?;
            if v.len() != n * per_img {
                return Err(RuntimeError::Model(format!("decoder returned {} values for {n} images", v.len())));
            }
            if !all_finite(v) {
                let first = images.len() / per_img;
                return Err(RuntimeError::NonFinite {
                    graph: "decoder".into(),
                    what: "image".into(),
                    at: format!("images {first}..{} of this decode", first + n),
                });
            }
            images.extend(v.iter().map(|x| x.clamp(-1.0, 1.0)));
            timing.stages.decoder += t0.elapsed().as_secs_f64();
            timing.decoder_calls += 1;
        }
        Ok(images)
    }

    /// The options this generator was loaded with.
    pub fn options(&self) -> &GeneratorOptions {
        &self.options
    }
}

struct Sessions<'a> {
    prefill: MutexGuard<'a, Session>,
    step: MutexGuard<'a, Session>,
    head: MutexGuard<'a, Session>,
}

/// Per-batch generation state: the KV cache and every bound buffer.
struct BatchState {
    /// AR rows (2B under CFG, else B); head_step always runs this many rows too.
    rows: usize,
    /// Kept alive for the bindings (they hold references to the same ORT values).
    _kv: Vec<DynTensor>,
    class_ids: Tensor<i64>,
    condition: Tensor<f32>,
    token: Tensor<f32>,
    position: Tensor<i64>,
    x_t: Tensor<f32>,
    t: Tensor<f32>,
    velocity: Tensor<f32>,
    prefill_io: IoBinding,
    step_io: IoBinding,
    head_io: IoBinding,
}

fn kv_allocator(g: &Generator, session: &Session) -> Option<Allocator> {
    if g.provider.active == Provider::Cpu {
        return None;
    }
    let info = MemoryInfo::new(
        AllocationDevice::CUDA,
        g.options.provider.device_id,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .ok()?;
    match Allocator::new(session, info) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!("cannot allocate the KV cache on the GPU ({e}); keeping it in host memory");
            None
        }
    }
}

fn host<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug>(
    shape: Vec<usize>,
    what: &str,
) -> Result<Tensor<T>> {
    Tensor::<T>::new(&Allocator::default(), shape).map_err(ort_err(format!("allocating {what}")))
}

fn write<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug>(
    t: &mut Tensor<T>,
    src: &[T],
    what: &str,
) -> Result<()> {
    let (_, dst) = t.try_extract_tensor_mut::<T>().map_err(ort_err(format!("writing {what}")))?;
    if dst.len() != src.len() {
        return Err(RuntimeError::Model(format!("{what}: {} values for a buffer of {}", src.len(), dst.len())));
    }
    dst.copy_from_slice(src);
    Ok(())
}

pub(crate) fn all_finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

fn read<'a>(t: &'a Tensor<f32>, what: &str) -> Result<&'a [f32]> {
    t.try_extract_tensor::<f32>().map(|(_, v)| v).map_err(ort_err(format!("reading {what}")))
}

impl BatchState {
    fn new(g: &Generator, s: &mut Sessions, rows: usize) -> Result<Self> {
        let m = &g.manifest;
        let kvc = m.kv_cache.as_ref().ok_or_else(|| RuntimeError::Model("manifest lacks kv_cache".into()))?;
        let (d, dim) = (m.latent_dim, m.config.ar.dim);
        let ty = match kvc.dtype {
            TensorDType::Float16 => TensorElementType::Float16,
            _ => TensorElementType::Float32,
        };
        let device = kv_allocator(g, &s.step);
        let alloc = device.unwrap_or_default();
        let shape = vec![rows, kvc.heads, kvc.seq_len, kvc.head_dim];
        let mut kv = Vec::with_capacity(2 * kvc.layers);
        for _ in 0..2 * kvc.layers {
            kv.push(DynTensor::new(&alloc, ty, shape.clone()).map_err(ort_err("allocating the KV cache"))?);
        }
        let mut st = BatchState {
            rows,
            class_ids: host(vec![rows], "class_ids")?,
            condition: host(vec![rows, dim], "condition")?,
            token: host(vec![rows, d], "token")?,
            position: host(vec![rows], "position")?,
            x_t: host(vec![rows, d], "x_t")?,
            t: host(vec![rows], "t")?,
            velocity: host(vec![rows, d], "velocity")?,
            prefill_io: s.prefill.create_binding().map_err(ort_err("ar_prefill binding"))?,
            step_io: s.step.create_binding().map_err(ort_err("ar_step binding"))?,
            head_io: s.head.create_binding().map_err(ort_err("head_step binding"))?,
            _kv: Vec::new(),
        };
        let e = |w: &str| ort_err(format!("binding {w}"));
        st.prefill_io.bind_output("condition", &mut st.condition).map_err(e("ar_prefill condition"))?;
        st.step_io.bind_output("condition", &mut st.condition).map_err(e("ar_step condition"))?;
        st.head_io.bind_output("velocity", &mut st.velocity).map_err(e("head_step velocity"))?;
        for i in 0..kvc.layers {
            let [pk, pv, nk, nv] = kv_names(i);
            for (j, (past, present)) in [(pk, nk), (pv, nv)].into_iter().enumerate() {
                let t = &mut kv[2 * i + j];
                st.prefill_io.bind_output(present.as_str(), &mut *t).map_err(e(&present))?;
                st.step_io.bind_input(past.as_str(), &*t).map_err(e(&past))?;
                st.step_io.bind_output(present.as_str(), &mut *t).map_err(e(&present))?;
            }
        }
        st._kv = kv;
        Ok(st)
    }

}

/// The ONNX Runtime graphs as the core loop's [`TokenBackend`]: the locked sessions and the batch state, reused
/// while batches keep their size (all but a short last batch).
struct OrtBackend<'g> {
    g: &'g Generator,
    s: Sessions<'g>,
    state: Option<BatchState>,
}

fn no_batch() -> RuntimeError {
    RuntimeError::Model("internal: sampling before start_batch".into())
}

impl TokenBackend for OrtBackend<'_> {
    type Error = RuntimeError;

    fn start_batch(&mut self, rows: usize) -> Result<()> {
        if self.state.as_ref().map(|s| s.rows) != Some(rows) {
            drop(self.state.take());
            self.state = Some(BatchState::new(self.g, &mut self.s, rows)?);
        }
        Ok(())
    }

    fn prefill(&mut self, class_ids: &[i64]) -> Result<&[f32]> {
        let st = self.state.as_mut().ok_or_else(no_batch)?;
        write(&mut st.class_ids, class_ids, "class_ids")?;
        st.prefill_io.bind_input("class_ids", &st.class_ids).map_err(ort_err("binding class_ids"))?;
        notify(self.g.observer.as_deref(), "ar_prefill", || Ok(vec![i64_view("class_ids", &st.class_ids)?]))?;
        self.s.prefill.run_binding(&st.prefill_io).map_err(ort_err("ar_prefill"))?;
        st.head_io.bind_input("condition", &st.condition).map_err(ort_err("binding condition"))?;
        read(&st.condition, "condition")
    }

    fn step(&mut self, tokens: Feed<'_>, token: usize) -> Result<&[f32]> {
        let st = self.state.as_mut().ok_or_else(no_batch)?;
        let cls = self.g.manifest.cls_token_num;
        {
            let (_, tok) = st.token.try_extract_tensor_mut::<f32>().map_err(ort_err("writing token"))?;
            tokens.write_to(tok)?;
            // Every row at sequence position cls + token − 1 (ar_step also takes rows at different positions).
            let (_, p) = st.position.try_extract_tensor_mut::<i64>().map_err(ort_err("writing position"))?;
            p.fill((cls + token - 1) as i64);
        }
        st.step_io.bind_input("token", &st.token).map_err(ort_err("binding token"))?;
        st.step_io.bind_input("position", &st.position).map_err(ort_err("binding position"))?;
        if let Some(o) = self.g.observer.as_deref().filter(|o| o.wants("ar_step")) {
            // The cache is bound in place: these views show it before this step writes its position.
            let names: Vec<String> = (0..st._kv.len() / 2)
                .flat_map(|l| {
                    let [k, v, _, _] = kv_names(l);
                    [k, v]
                })
                .collect();
            let mut v = vec![f32_view("token", &st.token)?, i64_view("position", &st.position)?];
            for (name, t) in names.iter().zip(&st._kv) {
                v.push(f32_view(name, t)?);
            }
            o.observe("ar_step", &v).map_err(|e| RuntimeError::Model(format!("ar_step observer: {e}")))?;
        }
        self.s.step.run_binding(&st.step_io).map_err(ort_err("ar_step"))?;
        st.head_io.bind_input("condition", &st.condition).map_err(ort_err("binding condition"))?;
        read(&st.condition, "condition")
    }

    fn velocity(&mut self, x_t: Feed<'_>, t: f32) -> Result<&[f32]> {
        let st = self.state.as_mut().ok_or_else(no_batch)?;
        {
            let (_, xt) = st.x_t.try_extract_tensor_mut::<f32>().map_err(ort_err("writing x_t"))?;
            x_t.write_to(xt)?;
            let (_, tt) = st.t.try_extract_tensor_mut::<f32>().map_err(ort_err("writing t"))?;
            tt.fill(t);
        }
        st.head_io.bind_input("x_t", &st.x_t).map_err(ort_err("binding x_t"))?;
        st.head_io.bind_input("t", &st.t).map_err(ort_err("binding t"))?;
        notify(self.g.observer.as_deref(), "head_step", || {
            Ok(vec![f32_view("x_t", &st.x_t)?, f32_view("t", &st.t)?, f32_view("condition", &st.condition)?])
        })?;
        self.s.head.run_binding(&st.head_io).map_err(ort_err("head_step"))?;
        read(&st.velocity, "velocity")
    }
}
