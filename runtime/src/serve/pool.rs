//! The KV slot pool of the serving engine: one preallocated host buffer per layer and key/value
//! ([cap, heads, T, head_dim] in the export's KV dtype), plus the per-row condition, token, position and
//! class-id buffers and the head's x_t / t / condition / velocity buffers.
//!
//! **Active rows are contiguous at the front** (`0 .. active`). A step binds ONNX Runtime tensors of
//! shape `[active, …]` that are *views* over the front of the pool's memory (no copy): `ar_step` reads
//! `past_key_values.*` and writes `present.*` in place over rows `0 .. a`, `ar_prefill` writes the new rows
//! `a .. a + n` directly, `head_step` runs over a prefix of its own buffers. When rows leave, the last
//! active rows are moved into the holes ([`Pool::move_row`], one contiguous memcpy per layer and key/value),
//! so the pool never runs rows nobody uses.
//!
//! Views are bound with the C API's `BindInput` directly: `ort`'s `IoBinding::bind_input` deep-copies a
//! borrowed tensor before binding it (it cannot prove the borrow outlives the binding), which would copy
//! the whole KV cache at every step. Here the pool owns both the memory and the bindings, declares the
//! bindings first (so they are dropped first) and never reallocates a buffer.

use std::ffi::CString;
use std::fmt::Debug;

use half::f16;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynValueRefMut, PrimitiveTensorElementType, Shape, TensorRefMut};
use ort::AsPointer;
use spherear_core::manifest::{Manifest, TensorDType};

use crate::error::{ort_err, Result, RuntimeError};
use crate::generator::kv_names;

/// One KV buffer ([cap, heads, T, head_dim]).
enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// A tensor view over `len ≥ shape product` elements at `ptr` (host memory).
///
/// # Safety
/// `ptr` must point to at least `shape.iter().product()` initialised elements that stay alive and are not
/// reallocated while the view (or a binding holding it) exists.
unsafe fn view<T: PrimitiveTensorElementType + Debug>(ptr: *mut T, shape: &[usize]) -> Result<DynValueRefMut<'static>> {
    let info = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)
        .map_err(ort_err("host memory info"))?;
    let shape = Shape::new(shape.iter().map(|&d| d as i64));
    // SAFETY: forwarded to the caller.
    let t = unsafe { TensorRefMut::<T>::from_raw(info, ptr.cast(), shape) }.map_err(ort_err("tensor view"))?;
    Ok(t.into_dyn())
}

/// Binds `value` as input `name` without the copy `IoBinding::bind_input` makes of borrowed tensors.
fn bind_input(io: &mut IoBinding, name: &str, value: &DynValueRefMut<'static>) -> Result<()> {
    let c = CString::new(name).map_err(|_| RuntimeError::Model(format!("input name {name:?} has a NUL byte")))?;
    // SAFETY: both pointers are live ORT objects; ORT keeps its own reference to the OrtValue, whose memory
    // the pool keeps alive (see the module documentation).
    let status = unsafe { (ort::api().BindInput)(io.ptr_mut(), c.as_ptr(), value.ptr()) };
    // SAFETY: the status comes from the ORT API call above.
    unsafe { ort::Error::result_from_status(status) }.map_err(ort_err(format!("binding {name}")))
}

impl KvBuf {
    fn copy_row(&mut self, row_len: usize, from: usize, to: usize) {
        match self {
            KvBuf::F32(v) => v.copy_within(from * row_len..(from + 1) * row_len, to * row_len),
            KvBuf::F16(v) => v.copy_within(from * row_len..(from + 1) * row_len, to * row_len),
        }
    }

    /// A view of rows `first .. first + rows` with the per-row shape `tail`.
    fn rows(&mut self, first: usize, rows: usize, tail: [usize; 3]) -> Result<DynValueRefMut<'static>> {
        let row_len: usize = tail.iter().product();
        let shape = [rows, tail[0], tail[1], tail[2]];
        match self {
            KvBuf::F32(v) => {
                check_range(v.len(), first, rows, row_len)?;
                // SAFETY: in range (checked), the buffer lives in the pool and is never reallocated.
                unsafe { view(v.as_mut_ptr().add(first * row_len), &shape) }
            }
            KvBuf::F16(v) => {
                check_range(v.len(), first, rows, row_len)?;
                // SAFETY: as above.
                unsafe { view(v.as_mut_ptr().add(first * row_len), &shape) }
            }
        }
    }
}

fn check_range(len: usize, first: usize, rows: usize, row_len: usize) -> Result<()> {
    if rows == 0 || (first + rows) * row_len > len {
        return Err(RuntimeError::Model(format!(
            "internal: view of rows {first}..{} of a pool of {} rows",
            first + rows,
            len / row_len.max(1)
        )));
    }
    Ok(())
}

/// A view of rows `first .. first + rows` (each `width` values) of a host vector.
fn rows_of<T: PrimitiveTensorElementType + Debug>(
    v: &mut [T],
    first: usize,
    rows: usize,
    width: usize,
) -> Result<DynValueRefMut<'static>> {
    check_range(v.len(), first, rows, width)?;
    let shape: Vec<usize> = if width == 1 { vec![rows] } else { vec![rows, width] };
    // SAFETY: in range (checked); every vector passed here is a pool field that is never reallocated.
    unsafe { view(v.as_mut_ptr().add(first * width), &shape) }
}

/// The slot pool (see the module documentation).
pub(crate) struct Pool {
    // Bindings and the views they use come first: they are dropped before the memory below.
    step_io: IoBinding,
    prefill_io: IoBinding,
    head_io: IoBinding,
    step_held: Vec<DynValueRefMut<'static>>,
    prefill_held: Vec<DynValueRefMut<'static>>,
    head_held: Vec<DynValueRefMut<'static>>,
    /// Rows the step / head bindings are bound for.
    step_bound: usize,
    head_bound: usize,
    /// Capacity in rows (`--max-batch`).
    pub cap: usize,
    /// Rows in use: always `0 .. active`.
    pub active: usize,
    layers: usize,
    tail: [usize; 3],
    row_len: usize,
    pub d: usize,
    pub dim: usize,
    kv: Vec<KvBuf>,
    /// [cap, dim]: the AR graphs' condition of each pool row.
    pub condition: Vec<f32>,
    /// [cap, d]: each row's fed-back token (ar_step input).
    pub token: Vec<f32>,
    /// [cap]: each row's sequence position (ar_step input).
    pub position: Vec<i64>,
    /// [cap]: class id of each new row (ar_prefill input).
    pub class_ids: Vec<i64>,
    /// Head buffers in head order ([cap, d], [cap], [cap, dim], [cap, d]).
    pub head_x: Vec<f32>,
    pub head_t: Vec<f32>,
    pub head_cond: Vec<f32>,
    pub head_v: Vec<f32>,
}

/// Bytes of one pool row's KV cache (all layers, key and value).
pub(crate) fn kv_bytes_per_row(m: &Manifest) -> Result<u64> {
    let k = m.kv_cache.as_ref().ok_or_else(|| RuntimeError::Model("manifest lacks kv_cache".into()))?;
    let elem = if k.dtype == TensorDType::Float16 { 2 } else { 4 };
    Ok((2 * k.layers * k.heads * k.seq_len * k.head_dim * elem) as u64)
}

impl Pool {
    /// Allocates a pool of `cap` rows for the export `m` and creates the three bindings.
    pub fn new(m: &Manifest, prefill: &Session, step: &Session, head: &Session, cap: usize) -> Result<Pool> {
        let k = m.kv_cache.as_ref().ok_or_else(|| RuntimeError::Model("manifest lacks kv_cache".into()))?;
        let tail = [k.heads, k.seq_len, k.head_dim];
        let row_len = tail.iter().product::<usize>();
        let n = cap * row_len;
        let kv = (0..2 * k.layers)
            .map(|_| {
                if k.dtype == TensorDType::Float16 {
                    KvBuf::F16(vec![f16::ZERO; n])
                } else {
                    KvBuf::F32(vec![0.0; n])
                }
            })
            .collect();
        let (d, dim) = (m.latent_dim, m.config.ar.dim);
        Ok(Pool {
            step_io: step.create_binding().map_err(ort_err("ar_step binding"))?,
            prefill_io: prefill.create_binding().map_err(ort_err("ar_prefill binding"))?,
            head_io: head.create_binding().map_err(ort_err("head_step binding"))?,
            step_held: Vec::new(),
            prefill_held: Vec::new(),
            head_held: Vec::new(),
            step_bound: 0,
            head_bound: 0,
            cap,
            active: 0,
            layers: k.layers,
            tail,
            row_len,
            d,
            dim,
            kv,
            condition: vec![0.0; cap * dim],
            token: vec![0.0; cap * d],
            position: vec![0; cap],
            class_ids: vec![0; cap],
            head_x: vec![0.0; cap * d],
            head_t: vec![0.0; cap],
            head_cond: vec![0.0; cap * dim],
            head_v: vec![0.0; cap * d],
        })
    }

    /// Moves row `from`'s KV cache into row `to` (compaction when rows leave).
    pub fn move_row(&mut self, from: usize, to: usize) {
        if from != to {
            for b in &mut self.kv {
                b.copy_row(self.row_len, from, to);
            }
        }
    }

    /// Runs `ar_step` over rows `0 .. rows` (token, position and KV of those rows are inputs; condition and
    /// the KV positions are written in place).
    pub fn run_step(&mut self, session: &mut Session, rows: usize) -> Result<()> {
        if self.step_bound != rows {
            self.step_bound = 0;
            self.step_held.clear();
            let token = rows_of(&mut self.token, 0, rows, self.d)?;
            let position = rows_of(&mut self.position, 0, rows, 1)?;
            bind_input(&mut self.step_io, "token", &token)?;
            bind_input(&mut self.step_io, "position", &position)?;
            let condition = rows_of(&mut self.condition, 0, rows, self.dim)?;
            self.step_io.bind_output("condition", condition).map_err(ort_err("binding ar_step condition"))?;
            self.step_held.extend([token, position]);
            for i in 0..self.layers {
                let [pk, pv, nk, nv] = kv_names(i);
                for (j, (past, present)) in [(pk, nk), (pv, nv)].into_iter().enumerate() {
                    let buf = &mut self.kv[2 * i + j];
                    let input = buf.rows(0, rows, self.tail)?;
                    let output = buf.rows(0, rows, self.tail)?;
                    bind_input(&mut self.step_io, &past, &input)?;
                    self.step_io
                        .bind_output(present.as_str(), output)
                        .map_err(ort_err(format!("binding {present}")))?;
                    self.step_held.push(input);
                }
            }
            self.step_bound = rows;
        }
        session.run_binding(&self.step_io).map_err(ort_err("ar_step"))?;
        Ok(())
    }

    /// Runs `ar_prefill` for the new rows `first .. first + rows` (class ids in `class_ids[first ..]`): their
    /// condition and their whole KV rows are written in place.
    pub fn run_prefill(&mut self, session: &mut Session, first: usize, rows: usize) -> Result<()> {
        self.prefill_held.clear();
        let ids = rows_of(&mut self.class_ids, first, rows, 1)?;
        bind_input(&mut self.prefill_io, "class_ids", &ids)?;
        self.prefill_held.push(ids);
        let condition = rows_of(&mut self.condition, first, rows, self.dim)?;
        self.prefill_io.bind_output("condition", condition).map_err(ort_err("binding ar_prefill condition"))?;
        for i in 0..self.layers {
            let [_, _, nk, nv] = kv_names(i);
            for (j, present) in [nk, nv].into_iter().enumerate() {
                let output = self.kv[2 * i + j].rows(first, rows, self.tail)?;
                self.prefill_io.bind_output(present.as_str(), output).map_err(ort_err(format!("binding {present}")))?;
            }
        }
        session.run_binding(&self.prefill_io).map_err(ort_err("ar_prefill"))?;
        Ok(())
    }

    /// Runs `head_step` over head rows `0 .. rows` (`head_x`, `head_t`, `head_cond` → `head_v`).
    pub fn run_head(&mut self, session: &mut Session, rows: usize) -> Result<()> {
        if self.head_bound != rows {
            self.head_bound = 0;
            self.head_held.clear();
            let x = rows_of(&mut self.head_x, 0, rows, self.d)?;
            let t = rows_of(&mut self.head_t, 0, rows, 1)?;
            let c = rows_of(&mut self.head_cond, 0, rows, self.dim)?;
            bind_input(&mut self.head_io, "x_t", &x)?;
            bind_input(&mut self.head_io, "t", &t)?;
            bind_input(&mut self.head_io, "condition", &c)?;
            let v = rows_of(&mut self.head_v, 0, rows, self.d)?;
            self.head_io.bind_output("velocity", v).map_err(ort_err("binding head_step velocity"))?;
            self.head_held.extend([x, t, c]);
            self.head_bound = rows;
        }
        session.run_binding(&self.head_io).map_err(ort_err("head_step"))?;
        Ok(())
    }

    /// Forgets every row (after an engine error: the next admissions start from row 0).
    pub fn reset(&mut self) {
        self.active = 0;
    }
}
