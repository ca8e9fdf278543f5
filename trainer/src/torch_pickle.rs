//! Reading official SphereAR checkpoints (`torch.save` zip files) without executing pickle code.
//!
//! A `torch.save` file is a zip archive with one folder (its name varies) holding `data.pkl`, the pickled
//! object, and `data/<key>`, the raw little-endian bytes of every storage. The pickle refers to a storage by a
//! persistent id `('storage', storage_type, key, location, numel)` and rebuilds each tensor with
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
//!
//! This module interprets `data.pkl` with a small, restricted pickle machine: it knows only the opcodes
//! pickle protocols 2–5 use for plain data, and only these globals, none of which it ever calls as Python
//! would — each is recognised and turned into inert data:
//! - `collections.OrderedDict` (an empty dict, or one built from a list of pairs),
//! - `torch._utils._rebuild_tensor_v2` and `torch._utils._rebuild_parameter` (a tensor reference),
//! - the legacy storage classes `torch.FloatStorage`, `torch.HalfStorage`, `torch.BFloat16Storage`,
//!   `torch.DoubleStorage`, `torch.LongStorage`, `torch.IntStorage`, `torch.ShortStorage`, `torch.CharStorage`,
//!   `torch.ByteStorage` and `torch.BoolStorage` (a dtype tag in a persistent id).
//!
//! Any other global (`os.system`, `torch.storage._load_from_bytes`, `argparse.Namespace`, ...) stops the read
//! with "refusing to load: checkpoint references Python global X", wherever it appears in the file.
//!
//! The top-level object must be a dict. Its `ema` state dict is used when present, else `model`; a dict with
//! neither is taken as a bare state dict. Only the chosen state dict's tensors are read from the archive.
//! Floating tensors (float32, float16, bfloat16, float64) become `f32`, materialised in row-major order from
//! their storage offset and strides (views are gathered). Integer and bool tensors (e.g. a BatchNorm's
//! `num_batches_tracked`) cannot be weights of this model: they are skipped and listed in
//! [`TorchCheckpoint::skipped`], so the caller's key check reports them if they matter.
//!
//! Test fixtures: `tests/fixtures/official/` (see `make_fixtures.py` there for how they were made).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use spherear_core::CoreError;

/// One tensor of a checkpoint, converted to `f32`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// The dtype stored in the file: "float32", "float16", "bfloat16" or "float64".
    pub source_dtype: String,
}

/// The state dict read from a `torch.save` file.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchCheckpoint {
    pub tensors: BTreeMap<String, RawTensor>,
    /// Which dict the tensors came from: "ema", "model" or "state_dict" (a bare state dict at the top level).
    pub source: String,
    /// Non-floating tensors of the chosen dict that were left out, as "name (dtype)".
    pub skipped: Vec<String>,
}

/// Read the `ema` (else `model`, else top-level) state dict of a `torch.save` checkpoint without running
/// any pickle code. Errors are one line naming `path`.
pub fn read_torch_checkpoint(path: &Path) -> Result<TorchCheckpoint, CoreError> {
    let shown = path.display().to_string();
    let data_err = |msg: String| CoreError::Data(format!("{shown}: {msg}"));
    let file = File::open(path).map_err(|e| CoreError::Io(format!("cannot open checkpoint {shown}: {e}")))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| data_err(format!("not a torch.save zip archive (truncated or another format?): {e}")))?;

    // The archive folder: the one holding `data.pkl`.
    let pkl_name = zip
        .file_names()
        .filter(|n| n.ends_with("data.pkl"))
        .filter(|n| n.strip_suffix("data.pkl").is_some_and(|p| p.is_empty() || p.ends_with('/')))
        .min_by_key(|n| n.len())
        .map(str::to_string)
        .ok_or_else(|| data_err("no data.pkl entry in the archive (not a torch.save file?)".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();

    if let Some(order) = read_entry_opt(&mut zip, &format!("{prefix}byteorder"), &shown)? {
        let order = String::from_utf8_lossy(&order).trim().to_string();
        if order != "little" {
            return Err(data_err(format!("byte order '{order}' is not supported (only little-endian)")));
        }
    }
    let pkl =
        read_entry_opt(&mut zip, &pkl_name, &shown)?.ok_or_else(|| data_err(format!("cannot read {pkl_name}")))?;

    let top = Machine::new(&pkl, &shown).run()?;
    let (source, dict) = choose_state_dict(&top).map_err(data_err)?;

    // Collect the tensors (a repeated key: the last wins), then group them by storage so each storage is
    // read once.
    let mut refs: BTreeMap<String, TensorRef> = BTreeMap::new();
    for (k, v) in dict.borrow().iter() {
        let name = match k {
            Value::Str(s) => s.clone(),
            other => return Err(data_err(format!("{source} has a non-string key ({})", other.kind()))),
        };
        let t = match v {
            Value::Tensor(t) => t.clone(),
            other => return Err(data_err(format!("{source} entry '{name}' is not a tensor ({})", other.kind()))),
        };
        refs.insert(name, t);
    }
    let mut by_storage: BTreeMap<String, Vec<(String, TensorRef)>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for (name, t) in refs {
        if !t.storage.dtype.is_float() {
            skipped.push(format!("{name} ({})", t.storage.dtype.name()));
            continue;
        }
        by_storage.entry(t.storage.key.clone()).or_default().push((name, t));
    }

    let mut tensors = BTreeMap::new();
    for (key, list) in by_storage {
        let entry = format!("{prefix}data/{key}");
        let bytes = read_entry_opt(&mut zip, &entry, &shown)?
            .ok_or_else(|| data_err(format!("missing storage entry {entry}")))?;
        for (name, t) in list {
            let raw = materialise(&t, &bytes).map_err(|m| data_err(format!("tensor '{name}': {m}")))?;
            tensors.insert(name, raw);
        }
    }
    Ok(TorchCheckpoint { tensors, source: source.to_string(), skipped })
}

/// Read a whole zip entry, `None` if there is no such entry.
fn read_entry_opt(zip: &mut zip::ZipArchive<File>, name: &str, shown: &str) -> Result<Option<Vec<u8>>, CoreError> {
    let mut f = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(CoreError::Data(format!("{shown}: cannot read entry {name}: {e}"))),
    };
    // The declared size only sizes the buffer (capped, so a lying header cannot make us allocate much).
    let mut out = Vec::with_capacity((f.size() as usize).min(1 << 26));
    f.read_to_end(&mut out)
        .map_err(|e| CoreError::Data(format!("{shown}: cannot read entry {name} (truncated file?): {e}")))?;
    Ok(Some(out))
}

type Dict = Rc<RefCell<Vec<(Value, Value)>>>;

/// Pick `ema`, else `model`, else the top level itself.
fn choose_state_dict(top: &Value) -> Result<(&'static str, Dict), String> {
    let Value::Dict(d) = top else {
        return Err(format!("the checkpoint's top-level object is a {}, not a dict", top.kind()));
    };
    for name in ["ema", "model"] {
        let found =
            d.borrow().iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if s == name)).map(|(_, v)| v.clone());
        match &found {
            Some(Value::Dict(sd)) => return Ok((name, sd.clone())),
            Some(Value::None) | None => {}
            Some(other) => return Err(format!("'{name}' is a {}, not a state dict", other.kind())),
        }
    }
    Ok(("state_dict", d.clone()))
}

// ------------------------------------------------------------------------------------------------
// Values of the restricted pickle machine

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    fn from_storage_class(name: &str) -> Option<DType> {
        Some(match name {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
    fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
    fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }
}

/// The globals the machine accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(DType),
    /// `argparse.Namespace`: the official checkpoints store their training arguments as one. It is
    /// rebuilt as an inert dict of its attributes; nothing is called.
    Namespace,
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        match (module, name) {
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
            ("argparse", "Namespace") => Some(Global::Namespace),
            ("torch", n) => DType::from_storage_class(n).map(Global::Storage),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    dtype: DType,
    key: String,
    numel: usize,
}

#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// A pickled value. Floats and bytes are parsed (e.g. in `args`) but never needed afterwards.
#[derive(Debug, Clone)]
#[allow(dead_code)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Dict),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
}

/// Drop nested containers with a work list instead of recursion, so a hostile, deeply nested pickle cannot
/// overflow the stack.
impl Drop for Value {
    fn drop(&mut self) {
        let mut work: Vec<Value> = Vec::new();
        self.take_children(&mut work);
        while let Some(mut v) = work.pop() {
            v.take_children(&mut work);
        }
    }
}

impl Value {
    /// Move the children of a container this value solely owns into `work`.
    fn take_children(&mut self, work: &mut Vec<Value>) {
        match self {
            Value::Tuple(rc) => {
                if let Some(items) = Rc::get_mut(rc) {
                    work.append(items);
                }
            }
            Value::List(rc) if Rc::strong_count(rc) == 1 => work.append(&mut rc.borrow_mut()),
            Value::Dict(rc) if Rc::strong_count(rc) == 1 => {
                for (k, v) in rc.borrow_mut().drain(..) {
                    work.push(k);
                    work.push(v);
                }
            }
            _ => {}
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
    fn tuple(items: Vec<Value>) -> Value {
        Value::Tuple(Rc::new(items))
    }
}

// ------------------------------------------------------------------------------------------------
// The restricted pickle machine

struct Machine<'a> {
    code: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed (for messages).
    op_pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    shown: &'a str,
}

/// Nesting and size limits against hostile input (far above what torch.save writes).
const MAX_MEMO: usize = 1 << 24;

impl<'a> Machine<'a> {
    fn new(code: &'a [u8], shown: &'a str) -> Self {
        Machine { code, pos: 0, op_pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), shown }
    }

    fn err(&self, msg: impl std::fmt::Display) -> CoreError {
        CoreError::Data(format!("{}: data.pkl: {msg} (opcode at offset {})", self.shown, self.op_pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CoreError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.code.len());
        match end {
            Some(end) => {
                let s = &self.code[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err("pickle is truncated")),
        }
    }
    fn u8(&mut self) -> Result<u8, CoreError> {
        Ok(self.take(1)?[0])
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], CoreError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, CoreError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, CoreError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, CoreError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len_u64(&mut self) -> Result<usize, CoreError> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.err("length too large"))
    }
    fn line(&mut self) -> Result<String, CoreError> {
        let rest = &self.code[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.err("pickle is truncated"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| self.err("global name is not UTF-8"))?.to_string();
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<Value, CoreError> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| self.err("string is not valid UTF-8"))?;
        Ok(Value::Str(s.to_string()))
    }

    fn pop(&mut self) -> Result<Value, CoreError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn top(&mut self) -> Result<&mut Value, CoreError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        let at = self.stack.len() - 1;
        Ok(&mut self.stack[at])
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, CoreError> {
        let m = self.marks.pop().ok_or_else(|| self.err("MARK missing"))?;
        if m > self.stack.len() {
            return Err(self.err("MARK missing"));
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, idx: u64) -> Result<(), CoreError> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return Err(self.err("memo too large"));
        }
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, idx: u64) -> Result<(), CoreError> {
        let v = self.memo.get(&idx).cloned().ok_or_else(|| self.err(format!("memo entry {idx} missing")))?;
        self.stack.push(v);
        Ok(())
    }
    fn global(&mut self, module: &str, name: &str) -> Result<(), CoreError> {
        match Global::resolve(module, name) {
            Some(g) => {
                self.stack.push(Value::Global(g));
                Ok(())
            }
            None => Err(CoreError::Data(format!(
                "{}: refusing to load: checkpoint references Python global {module}.{name}",
                self.shown
            ))),
        }
    }
    fn set_items(&self, target: &Value, items: Vec<Value>) -> Result<(), CoreError> {
        let Value::Dict(d) = target else {
            return Err(self.err(format!("SETITEM(S) on a {}", target.kind())));
        };
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        // Pairs are kept in order, duplicates included; readers take the last one, as Python would.
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }
    fn append_items(&mut self, target: &Value, items: Vec<Value>) -> Result<(), CoreError> {
        match target {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(self.err(format!("APPEND(S) on a {}", other.kind()))),
        }
    }

    /// Run to STOP and return the pickled object.
    fn run(mut self) -> Result<Value, CoreError> {
        loop {
            self.op_pos = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    // FRAME: only a hint
                    self.u64()?;
                }
                b'.' => {
                    // STOP
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'}' => self.stack.push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                b']' | 0x8f => self.stack.push(Value::List(Rc::new(RefCell::new(Vec::new())))), // EMPTY_LIST, EMPTY_SET
                b')' => self.stack.push(Value::tuple(Vec::new())),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    // POP
                    self.pop()?;
                }
                b'1' => {
                    // POP_MARK
                    self.pop_mark()?;
                }
                b'2' => {
                    // DUP
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.utf8(n)?;
                    self.stack.push(v);
                }
                b'T' | b'B' => {
                    // BINSTRING, BINBYTES
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'U' | b'C' => {
                    // SHORT_BINSTRING, SHORT_BINBYTES
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                0x8e => {
                    // BINBYTES8
                    let n = self.len_u64()?;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.arr()?);
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    // LONG1, LONG4: little-endian two's complement
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    let b = self.take(n)?;
                    let v = long_from_bytes(b).ok_or_else(|| self.err("integer too large"))?;
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    // BINFLOAT: big-endian f64
                    let v = f64::from_be_bytes(self.arr()?);
                    self.stack.push(Value::Float(v));
                }
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'N' => self.stack.push(Value::None),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::tuple(items));
                }
                0x85 => {
                    let a = self.pop()?;
                    self.stack.push(Value::tuple(vec![a]));
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::tuple(vec![a, b]));
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::tuple(vec![a, b, c]));
                }
                b'l' => {
                    // LIST
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    // DICT
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::new(RefCell::new(Vec::new())));
                    self.set_items(&d, items)?;
                    self.stack.push(d);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?.clone();
                    self.append_items(&target, vec![v])?;
                }
                b'e' | 0x90 => {
                    // APPENDS, ADDITEMS (sets are kept as lists)
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append_items(&target, items)?;
                }
                0x91 => {
                    // FROZENSET
                    let items = self.pop_mark()?;
                    self.stack.push(Value::tuple(items));
                }
                b'q' => {
                    let i = self.u8()? as u64;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()? as u64;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u64;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()? as u64;
                    self.memo_get(i)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(&module, &name)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Value::Str(m), Value::Str(n)) => self.global(m, n)?,
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only OrderedDict and the inert Namespace are accepted
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = match cls {
                        Value::Global(Global::OrderedDict | Global::Namespace) => self.reduce(cls, args)?,
                        other => return Err(self.err(format!("NEWOBJ on a {}", other.kind()))),
                    };
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: only a dict's attribute state (OrderedDict `_metadata`), which is dropped
                    let state = self.pop()?;
                    let target = self.top()?.clone();
                    match (&target, &state) {
                        (Value::Dict(_), Value::Dict(_) | Value::None | Value::Tuple(_)) => {}
                        (Value::Tensor(_), Value::Dict(_) | Value::None | Value::Tuple(_)) => {}
                        _ => return Err(self.err(format!("BUILD on a {} with a {}", target.kind(), state.kind()))),
                    }
                }
                _ => return Err(self.err(format!("unknown opcode 0x{op:02x}"))),
            }
        }
    }

    fn reduce(&self, f: Value, args: Value) -> Result<Value, CoreError> {
        let Value::Tuple(args) = &args else {
            return Err(self.err(format!("REDUCE arguments are a {}, not a tuple", args.kind())));
        };
        match f {
            Value::Global(Global::OrderedDict) => {
                let d = Value::Dict(Rc::new(RefCell::new(Vec::new())));
                match args.as_slice() {
                    [] => {}
                    [Value::List(pairs)] => {
                        let mut items = Vec::new();
                        for p in pairs.borrow().iter() {
                            match p {
                                Value::Tuple(kv) if kv.len() == 2 => items.extend(kv.iter().cloned()),
                                _ => return Err(self.err("OrderedDict items are not pairs")),
                            }
                        }
                        self.set_items(&d, items)?;
                    }
                    _ => return Err(self.err("unexpected OrderedDict arguments")),
                }
                Ok(d)
            }
            Value::Global(Global::RebuildTensorV2) => {
                if args.len() < 6 || args.len() > 7 {
                    return Err(self.err(format!("_rebuild_tensor_v2 with {} arguments", args.len())));
                }
                let Value::Storage(storage) = &args[0] else {
                    return Err(self.err("_rebuild_tensor_v2 without a storage"));
                };
                let offset = self.as_usize(&args[1], "storage offset")?;
                let size = self.as_usize_tuple(&args[2], "size")?;
                let stride = self.as_usize_tuple(&args[3], "stride")?;
                if size.len() != stride.len() {
                    return Err(self.err("tensor size and stride differ in length"));
                }
                Ok(Value::Tensor(TensorRef { storage: storage.clone(), offset, size, stride }))
            }
            Value::Global(Global::RebuildParameter) => match args.first() {
                Some(t @ Value::Tensor(_)) if args.len() == 3 => Ok(t.clone()),
                _ => Err(self.err("_rebuild_parameter without a tensor")),
            },
            Value::Global(Global::Namespace) if args.is_empty() => Ok(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
            other => Err(self.err(format!("REDUCE on a {}", other.kind()))),
        }
    }

    fn persistent_load(&self, pid: Value) -> Result<Value, CoreError> {
        let Value::Tuple(t) = &pid else {
            return Err(self.err(format!("persistent id is a {}, not a tuple", pid.kind())));
        };
        match t.as_slice() {
            [Value::Str(tag), Value::Global(Global::Storage(dtype)), key, _location, numel] if tag == "storage" => {
                let key = match key {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => return Err(self.err("storage key is not a string")),
                };
                if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
                    return Err(self.err(format!("bad storage key '{key}'")));
                }
                let numel = self.as_usize(numel, "storage size")?;
                Ok(Value::Storage(StorageRef { dtype: *dtype, key, numel }))
            }
            _ => Err(self.err("persistent id is not ('storage', <storage class>, key, location, numel)")),
        }
    }

    fn as_usize(&self, v: &Value, what: &str) -> Result<usize, CoreError> {
        match v {
            Value::Int(i) if *i >= 0 => usize::try_from(*i).map_err(|_| self.err(format!("{what} too large"))),
            Value::Bool(b) => Ok(*b as usize),
            other => Err(self.err(format!("{what} is not a non-negative int ({})", other.kind()))),
        }
    }
    fn as_usize_tuple(&self, v: &Value, what: &str) -> Result<Vec<usize>, CoreError> {
        match v {
            Value::Tuple(t) => t.iter().map(|x| self.as_usize(x, what)).collect(),
            other => Err(self.err(format!("tensor {what} is a {}, not a tuple", other.kind()))),
        }
    }
}

/// A pickle LONG (little-endian two's complement, any length) as i64.
fn long_from_bytes(b: &[u8]) -> Option<i64> {
    if b.is_empty() {
        return Some(0);
    }
    let neg = b[b.len() - 1] & 0x80 != 0;
    let fill = if neg { 0xff } else { 0x00 };
    if b.len() > 8 {
        // Longer encodings are fine only if the extra bytes are sign fill.
        let (lo, hi) = b.split_at(8);
        if hi.iter().any(|&x| x != fill) || ((lo[7] & 0x80 != 0) != neg) {
            return None;
        }
        return long_from_bytes(lo);
    }
    let mut a = [fill; 8];
    a[..b.len()].copy_from_slice(b);
    Some(i64::from_le_bytes(a))
}

// ------------------------------------------------------------------------------------------------
// Materialising tensors

/// Gather `t` (offset, size, stride in elements) from its storage bytes into a row-major `f32` tensor.
fn materialise(t: &TensorRef, bytes: &[u8]) -> Result<RawTensor, String> {
    let dt = t.storage.dtype;
    let es = dt.size();
    let avail = bytes.len() / es;
    if avail < t.storage.numel {
        return Err(format!(
            "storage {} holds {} bytes, fewer than its {} {} elements",
            t.storage.key,
            bytes.len(),
            t.storage.numel,
            dt.name()
        ));
    }
    let overflow = || "shape/stride overflow".to_string();
    let mut numel: usize = 1;
    for &s in &t.size {
        numel = numel.checked_mul(s).ok_or_else(overflow)?;
    }
    let mut data = Vec::new();
    if numel > 0 {
        // Largest element index the view touches.
        let mut last = t.offset;
        for (&s, &st) in t.size.iter().zip(&t.stride) {
            last = last.checked_add((s - 1).checked_mul(st).ok_or_else(overflow)?).ok_or_else(overflow)?;
        }
        if last >= t.storage.numel {
            return Err(format!(
                "shape {:?} stride {:?} offset {} reaches element {last}, outside its storage of {} elements",
                t.size, t.stride, t.offset, t.storage.numel
            ));
        }
        data.reserve_exact(numel);
        let read = |i: usize| -> f32 { element(dt, &bytes[i * es..(i + 1) * es]) };
        // Row-major contiguous: one run.
        let contiguous = {
            let mut expect = 1usize;
            let mut ok = true;
            for (&s, &st) in t.size.iter().zip(&t.stride).rev() {
                if s != 1 && st != expect {
                    ok = false;
                    break;
                }
                expect = expect.saturating_mul(s);
            }
            ok
        };
        if contiguous {
            data.extend((t.offset..t.offset + numel).map(read));
        } else {
            let nd = t.size.len();
            let mut idx = vec![0usize; nd];
            let mut at = t.offset;
            for _ in 0..numel {
                data.push(read(at));
                // Odometer increment (indices stay in bounds: checked above).
                for d in (0..nd).rev() {
                    idx[d] += 1;
                    at += t.stride[d];
                    if idx[d] < t.size[d] {
                        break;
                    }
                    at -= t.stride[d] * t.size[d];
                    idx[d] = 0;
                }
            }
        }
    }
    Ok(RawTensor { shape: t.size.clone(), data, source_dtype: dt.name().to_string() })
}

/// One little-endian floating element as f32 (integer dtypes never reach here).
fn element(dt: DType, b: &[u8]) -> f32 {
    let mut a8 = [0u8; 8];
    a8[..b.len()].copy_from_slice(b);
    match dt {
        DType::F32 => f32::from_le_bytes([a8[0], a8[1], a8[2], a8[3]]),
        DType::F64 => f64::from_le_bytes(a8) as f32,
        DType::F16 => f16_to_f32(u16::from_le_bytes([a8[0], a8[1]])),
        DType::BF16 => f32::from_bits((u16::from_le_bytes([a8[0], a8[1]]) as u32) << 16),
        _ => f32::NAN,
    }
}

/// IEEE half → single (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24.
            let v = m as f32 * f32::from_bits(0x3380_0000); // 2^-24
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spherear_core::config::ModelConfig;
    use spherear_core::keys::all_keys;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/official").join(name)
    }

    fn tiny_keys() -> Vec<(String, Vec<usize>)> {
        let cfg = ModelConfig::preset("tiny").unwrap();
        all_keys(&cfg).into_iter().map(|k| (k.name, k.shape)).collect()
    }

    fn key_text() -> String {
        tiny_keys().iter().map(|(n, s)| format!("{n} {s:?}\n")).collect()
    }

    /// Writes tests/fixtures/official/tiny-keys.txt, the key list make_fixtures.py reads. Run once with
    /// `cargo test -p trainer --lib torch_pickle::tests::write_tiny_keys -- --ignored`.
    #[test]
    #[ignore]
    fn write_tiny_keys() {
        std::fs::write(fixture("tiny-keys.txt"), key_text()).unwrap();
    }

    #[test]
    fn committed_key_list_matches_tiny_preset() {
        let committed = std::fs::read_to_string(fixture("tiny-keys.txt")).unwrap();
        assert_eq!(committed, key_text(), "regenerate the fixtures (see make_fixtures.py)");
    }

    fn expected() -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-official.expected.json")).unwrap()).unwrap()
    }

    fn check_expected(ck: &TorchCheckpoint, section: &str) {
        let exp = expected();
        let obj = exp[section].as_object().unwrap();
        assert!(obj.len() >= 3);
        for (name, e) in obj {
            let t = &ck.tensors[name];
            let shape: Vec<usize> =
                e["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(t.shape, shape, "{name}");
            let first: Vec<f32> = e["first"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(&t.data[..first.len()], &first[..], "{name}");
            let sum: f64 = t.data.iter().map(|&x| x as f64).sum();
            let esum = e["sum"].as_f64().unwrap();
            assert!((sum - esum).abs() <= 1e-9 * (1.0 + esum.abs()), "{name}: sum {sum} vs {esum}");
            if let Some(all) = e.get("all") {
                let all: Vec<f32> = all.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
                assert_eq!(t.data, all, "{name}");
            }
        }
    }

    #[test]
    fn reads_official_fixture_ema_with_views() {
        let ck = read_torch_checkpoint(&fixture("tiny-official.pt")).unwrap();
        assert_eq!(ck.source, "ema");
        assert!(ck.skipped.is_empty());
        let want = tiny_keys();
        let got: Vec<(String, Vec<usize>)> = ck.tensors.iter().map(|(k, t)| (k.clone(), t.shape.clone())).collect();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(got, want_sorted);
        for (name, t) in &ck.tensors {
            assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "{name}");
            assert_eq!(t.source_dtype, "float32");
        }
        check_expected(&ck, "ema");
        // The offset view and the transposed (non-contiguous) tensor are among the checked keys.
        let exp = expected();
        for key in ["offset_view", "transposed"] {
            let name = exp["views"][key].as_str().unwrap();
            assert!(exp["ema"].get(name).is_some(), "{key} ({name}) is checked in full");
        }
    }

    /// IEEE round-to-nearest-even of an f32 to half precision, back as f32 (in-range values only).
    fn round_f16(x: f32) -> f32 {
        if x == 0.0 || !x.is_finite() {
            return x;
        }
        let e = x.abs().log2().floor().max(-14.0) as i32;
        let q = 2f64.powi(e - 10);
        (((x as f64) / q).round_ties_even() * q) as f32
    }

    #[test]
    fn reads_float16_fixture() {
        let ck = read_torch_checkpoint(&fixture("tiny-official-f16.pt")).unwrap();
        assert_eq!(ck.source, "model");
        let main = read_torch_checkpoint(&fixture("tiny-official.pt")).unwrap();
        assert_eq!(ck.tensors.len(), main.tensors.len());
        for (name, t) in &ck.tensors {
            assert_eq!(t.source_dtype, "float16");
            let m = &main.tensors[name];
            assert_eq!(t.shape, m.shape);
            let want: Vec<f32> = m.data.iter().map(|&x| round_f16(x)).collect();
            assert_eq!(t.data, want, "{name}");
        }
        check_expected(&ck, "f16");
    }

    #[test]
    fn renamed_and_reshaped_fixtures_read_with_their_differences() {
        let want: BTreeMap<String, Vec<usize>> = tiny_keys().into_iter().collect();
        let r = read_torch_checkpoint(&fixture("tiny-renamed.pt")).unwrap();
        let got: BTreeMap<String, Vec<usize>> = r.tensors.iter().map(|(k, t)| (k.clone(), t.shape.clone())).collect();
        assert!(got.contains_key("head.net.cond_embedding.weight"));
        assert!(!got.contains_key("head.net.cond_embed.weight"));
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        assert_eq!(missing, vec!["head.net.cond_embed.weight"]);

        let s = read_torch_checkpoint(&fixture("tiny-reshaped.pt")).unwrap();
        let diff: Vec<_> =
            want.iter().filter(|(k, shape)| &s.tensors[*k].shape != *shape).map(|(k, _)| k.clone()).collect();
        assert_eq!(diff, vec!["proj_in.weight"]);
        let w = &want["proj_in.weight"];
        assert_eq!(s.tensors["proj_in.weight"].shape, vec![w[1], w[0]]);
        assert_eq!(s.tensors.len(), want.len());
    }

    #[test]
    fn official_layout_with_namespace_args_and_optimizer_state_reads() {
        // Written by make_fixtures.py like the official train.py: {"model", "optimizer", "epochs", "args": Namespace}.
        let ck = read_torch_checkpoint(&fixture("namespace-args.pt")).unwrap();
        assert_eq!(ck.source, "model");
        let b = &ck.tensors["proj_in.bias"];
        assert_eq!(b.shape, vec![4]);
        let want = [0.6613521575927734f32, 0.266924113035202, 0.06167725846171379, 0.6213173270225525];
        assert_eq!(b.data, want);
        assert_eq!(ck.tensors["norm.weight"].data, vec![1.0; 3]);
    }

    #[test]
    fn evil_fixture_is_refused_naming_the_global() {
        let err = read_torch_checkpoint(&fixture("tiny-evil.pt")).unwrap_err().to_string();
        assert!(err.contains("refusing to load"), "{err}");
        assert!(err.contains("posix.system") || err.contains("os.system"), "{err}");
        assert!(err.contains("tiny-evil.pt"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn truncated_and_foreign_files_are_clean_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(fixture("tiny-official.pt")).unwrap();
        for (name, content) in [
            ("head.pt", bytes[..100].to_vec()),
            ("half.pt", bytes[..bytes.len() / 2].to_vec()),
            ("text.pt", b"this is not a zip file at all\n".to_vec()),
            ("empty.pt", Vec::new()),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            let err = read_torch_checkpoint(&p).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, CoreError::Data(_)), "{msg}");
            assert!(msg.contains(name) && !msg.contains('\n'), "{msg}");
        }
        let err = read_torch_checkpoint(&dir.path().join("absent.pt")).unwrap_err();
        assert!(matches!(err, CoreError::Io(_)));
    }

    /// Build a torch.save-like zip by hand around a given pickle and storages.
    fn write_zip(path: &Path, pkl: &[u8], storages: &[(&str, Vec<u8>)]) {
        use std::io::Write;
        let f = File::create(path).unwrap();
        let mut z = zip::ZipWriter::new(f);
        let opt = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        z.start_file("arch/data.pkl", opt).unwrap();
        z.write_all(pkl).unwrap();
        for (k, b) in storages {
            z.start_file(format!("arch/data/{k}"), opt).unwrap();
            z.write_all(b).unwrap();
        }
        z.finish().unwrap();
    }

    /// Pickle of {'w': _rebuild_tensor_v2(storage('0', dtype, numel), offset, size, stride, False, OrderedDict())}.
    fn tensor_pickle(storage_class: &str, numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'X', 1, 0, 0, 0, b'w'];
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend(b"(X\x07\0\0\0storage");
        p.extend(format!("ctorch\n{storage_class}\n").as_bytes());
        p.extend(b"X\x01\0\0\x000X\x03\0\0\0cpuK");
        p.extend([numel, b't', b'Q', b'K', offset, b'(']);
        for s in size {
            p.extend([b'K', *s]);
        }
        p.extend(b"t(");
        for s in stride {
            p.extend([b'K', *s]);
        }
        p.extend(b"t\x89ccollections\nOrderedDict\n)Rtq\x01Rs.");
        p
    }

    #[test]
    fn handmade_pickles_strides_dtypes_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.pt");
        let f32s: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
        // 2x3 view at offset 1 with strides (1, 2): element [i][j] = storage[1 + i + 2j].
        write_zip(&p, &tensor_pickle("FloatStorage", 12, 1, &[2, 3], &[1, 2]), &[("0", f32s.clone())]);
        let ck = read_torch_checkpoint(&p).unwrap();
        assert_eq!(ck.source, "state_dict");
        assert_eq!(ck.tensors["w"].data, vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        // Out of the storage's bounds.
        write_zip(&p, &tensor_pickle("FloatStorage", 12, 7, &[2, 3], &[4, 1]), &[("0", f32s.clone())]);
        let e = read_torch_checkpoint(&p).unwrap_err().to_string();
        assert!(e.contains("outside its storage"), "{e}");
        // Missing storage entry.
        write_zip(&p, &tensor_pickle("FloatStorage", 12, 0, &[2], &[1]), &[]);
        let e = read_torch_checkpoint(&p).unwrap_err().to_string();
        assert!(e.contains("missing storage entry arch/data/0"), "{e}");
        // bfloat16 and float64.
        let bf: Vec<u8> = [1.5f32, -2.25].iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect();
        write_zip(&p, &tensor_pickle("BFloat16Storage", 2, 0, &[2], &[1]), &[("0", bf)]);
        let t = &read_torch_checkpoint(&p).unwrap().tensors["w"];
        assert_eq!((t.data.clone(), t.source_dtype.as_str()), (vec![1.5, -2.25], "bfloat16"));
        let f64s: Vec<u8> = [0.5f64, 3.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_zip(&p, &tensor_pickle("DoubleStorage", 2, 0, &[2], &[1]), &[("0", f64s)]);
        assert_eq!(read_torch_checkpoint(&p).unwrap().tensors["w"].data, vec![0.5, 3.0]);
        // Integer tensors are skipped with a note.
        write_zip(&p, &tensor_pickle("LongStorage", 1, 0, &[], &[]), &[("0", 7i64.to_le_bytes().to_vec())]);
        let ck = read_torch_checkpoint(&p).unwrap();
        assert!(ck.tensors.is_empty());
        assert_eq!(ck.skipped, vec!["w (int64)".to_string()]);
        // Unknown opcode, named with its offset.
        let mut bad = tensor_pickle("FloatStorage", 12, 0, &[2], &[1]);
        bad[2] = 0xf0;
        write_zip(&p, &bad, &[("0", f32s.clone())]);
        let e = read_torch_checkpoint(&p).unwrap_err().to_string();
        assert!(e.contains("unknown opcode 0xf0") && e.contains("offset 2"), "{e}");
        // A forbidden torch global.
        let evil = tensor_pickle("FloatStorage", 12, 0, &[2], &[1]);
        let from = b"ctorch._utils\n_rebuild_tensor_v2\n";
        let at = evil.windows(from.len()).position(|w| w == from).unwrap();
        let mut s = evil[..at].to_vec();
        s.extend(b"ctorch.storage\n_load_from_bytes\n");
        s.extend(&evil[at + from.len()..]);
        write_zip(&p, &s, &[("0", f32s)]);
        let e = read_torch_checkpoint(&p).unwrap_err().to_string();
        assert!(e.contains("Python global torch.storage._load_from_bytes"), "{e}");
    }

    #[test]
    fn deeply_nested_pickle_is_an_error_not_a_stack_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("deep.pt");
        let mut pkl = vec![0x80, 2, b')'];
        pkl.extend(std::iter::repeat_n(0x85, 1_000_000));
        pkl.push(b'.');
        write_zip(&p, &pkl, &[]);
        let e = read_torch_checkpoint(&p).unwrap_err().to_string();
        assert!(e.contains("top-level object is a tuple"), "{e}");
    }

    #[test]
    fn half_conversion_is_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(long_from_bytes(&[0xff]), Some(-1));
        assert_eq!(long_from_bytes(&[0x00, 0x01]), Some(256));
        assert_eq!(long_from_bytes(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }
}
