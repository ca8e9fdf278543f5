//! TensorRT calibration tables: the three files ONNX Runtime's
//! `onnxruntime.quantization.quant_utils.write_calibration_table` writes, and TensorRT's native cache.
//!
//! A table maps tensor names (as TensorRT sees them: the fp32 graph's tensor names) to a symmetric
//! amplitude a; it is written as the calibration range (lowest = −a, highest = a), so every file's value is
//! `str(max(highest, lowest))` = a, formatted as Python formats floats ([`python_float_repr`] of the
//! float32 value widened to float64). Keys are sorted.
//!
//! - [`flatbuffers_table`] — `calibration.flatbuffers`: ONNX Runtime's `TrtTable { dict: [KeyValue] }`
//!   schema (`KeyValue { key: string; value: string }`), built exactly as the python flatbuffers Builder
//!   builds it in `write_calibration_table` (so the bytes are the same; note that loop prepends the sorted
//!   entries, so the stored vector is in reverse key order). This is the file ONNX Runtime's TensorRT
//!   execution provider reads with `trt_int8_calibration_table_name` and
//!   `trt_int8_use_native_calibration_table=0` (`std::stof` of each value = the dynamic range).
//! - [`cache_text`] — `calibration.cache`: `name value` lines.
//! - [`json_text`] — `calibration.json`: `json.dumps` of the `TensorsData` with ONNX Runtime's
//!   `CalibrationCacheEncoder`.
//! - [`native_cache`] — TensorRT's own calibration cache (`TRT-<version>-<calibrator>` header, then
//!   `name: <hex of the float32 scale a / 127>` lines), which the execution provider reads with
//!   `trt_int8_use_native_calibration_table=1` (range = scale · 127).

use std::collections::BTreeMap;
use std::collections::HashMap;

use crate::error::{CalibError, Result};
use crate::histogram::Method;

/// Python's `repr(float)` (= `str(float)`): the shortest round-trip digits, fixed notation for
/// 1e-4 ≤ |x| < 1e16, else `d.ddde±XX`; `.0` on integral values; `inf`, `nan`, `-0.0`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    let s = format!("{x:e}");
    let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    let decpt = exp + 1;
    let body = if decpt <= -4 || decpt > 16 {
        let rest = if n > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        let e = exp.abs();
        format!("{}{rest}e{}{e:02}", &digits[..1], if exp < 0 { '-' } else { '+' })
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt >= n {
        format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
    } else {
        format!("{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
    };
    format!("{sign}{body}")
}

/// The value string of an amplitude: `str(max(float(a), float(−a)))`.
pub fn value_string(amax: f32) -> String {
    python_float_repr(f64::from(amax).max(f64::from(-amax)))
}

/// A back-to-front flatbuffers builder that performs exactly the python `flatbuffers.Builder`'s steps
/// (alignment, padding, vtable deduplication), for the calls `write_calibration_table` makes.
struct PyBuilder {
    /// The buffer reversed: `rev[0]` is the last byte.
    rev: Vec<u8>,
    minalign: usize,
    vtable: Vec<usize>,
    object_end: usize,
    vtables: HashMap<Vec<usize>, usize>,
}

impl PyBuilder {
    fn new() -> Self {
        PyBuilder { rev: Vec::new(), minalign: 1, vtable: Vec::new(), object_end: 0, vtables: HashMap::new() }
    }
    fn offset(&self) -> usize {
        self.rev.len()
    }
    fn place(&mut self, bytes: &[u8]) {
        self.rev.extend(bytes.iter().rev());
    }
    fn prep(&mut self, size: usize, additional: usize) {
        if size > self.minalign {
            self.minalign = size;
        }
        let align = (!(self.offset() + additional)).wrapping_add(1) & (size - 1);
        self.rev.extend(std::iter::repeat_n(0u8, align));
    }
    fn prepend_uoffset(&mut self, off: usize) {
        self.prep(4, 0);
        let off2 = (self.offset() - off + 4) as u32;
        self.place(&off2.to_le_bytes());
    }
    fn prepend_voffset(&mut self, v: u16) {
        self.prep(2, 0);
        self.place(&v.to_le_bytes());
    }
    /// Overwrites the 4 bytes whose `offset()` after writing was `at`.
    fn write_i32_at(&mut self, at: usize, v: i32) {
        for (k, b) in v.to_le_bytes().iter().enumerate() {
            self.rev[at - 1 - k] = *b;
        }
    }
    fn create_string(&mut self, s: &str) -> usize {
        let x = s.as_bytes();
        self.prep(4, x.len() + 1);
        self.place(&[0]);
        self.place(x);
        self.place(&(x.len() as u32).to_le_bytes());
        self.offset()
    }
    fn start_object(&mut self, fields: usize) {
        self.vtable = vec![0; fields];
        self.object_end = self.offset();
    }
    fn slot_uoffset(&mut self, slot: usize, off: usize) {
        if off != 0 {
            self.prepend_uoffset(off);
            self.vtable[slot] = self.offset();
        }
    }
    fn end_object(&mut self) -> usize {
        // PrependSOffsetTRelative(0), patched below.
        self.prep(4, 0);
        let placeholder = (self.offset() + 4) as i32;
        self.place(&placeholder.to_le_bytes());
        let object = self.offset();
        let mut key = Vec::new();
        let mut trim = true;
        for &e in self.vtable.iter().rev() {
            if e == 0 {
                if trim {
                    continue;
                }
                key.push(0);
            } else {
                key.push(object - e);
                trim = false;
            }
        }
        let object_size = object - self.object_end;
        key.push(object_size);
        match self.vtables.get(&key).copied() {
            None => {
                let mut trailing = 0;
                let mut trim = true;
                for i in (0..self.vtable.len()).rev() {
                    let e = self.vtable[i];
                    let off = if e == 0 {
                        if trim {
                            trailing += 1;
                            continue;
                        }
                        0
                    } else {
                        trim = false;
                        object - e
                    };
                    self.prepend_voffset(off as u16);
                }
                self.prepend_voffset(object_size as u16);
                let vbytes = (self.vtable.len() - trailing + 2) * 2;
                self.prepend_voffset(vbytes as u16);
                let soff = (self.offset() - object) as i32;
                self.write_i32_at(object, soff);
                self.vtables.insert(key, self.offset());
            }
            Some(vt) => {
                // Drop the placeholder back to the object start and point it at the earlier vtable.
                self.rev.truncate(object);
                self.write_i32_at(object, vt as i32 - object as i32);
            }
        }
        object
    }
    fn finish(mut self, root: usize) -> Vec<u8> {
        let minalign = self.minalign;
        self.prep(minalign, 4);
        self.prepend_uoffset(root);
        self.rev.reverse();
        self.rev
    }
}

/// `calibration.flatbuffers` of `table` (name → amplitude), byte for byte as `write_calibration_table`.
pub fn flatbuffers_table(table: &BTreeMap<String, f32>) -> Vec<u8> {
    let mut b = PyBuilder::new();
    let mut entries = Vec::with_capacity(table.len());
    for (k, &a) in table {
        let key = b.create_string(k);
        let value = b.create_string(&value_string(a));
        b.start_object(2);
        b.slot_uoffset(0, key);
        b.slot_uoffset(1, value);
        entries.push(b.end_object());
    }
    // StartVector(4, n, 4), then the entries prepended in key order (so stored in reverse), EndVector.
    b.prep(4, 4 * entries.len());
    b.prep(4, 4 * entries.len());
    for &e in &entries {
        b.prepend_uoffset(e);
    }
    b.place(&(entries.len() as u32).to_le_bytes());
    let dict = b.offset();
    b.start_object(1);
    b.slot_uoffset(0, dict);
    let root = b.end_object();
    b.finish(root)
}

fn bad_fb(m: impl Into<String>) -> CalibError {
    CalibError::Invalid(format!("not a TrtTable flatbuffer: {}", m.into()))
}

fn u32_at(buf: &[u8], pos: usize) -> Result<u32> {
    pos.checked_add(4)
        .and_then(|end| buf.get(pos..end))
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| bad_fb(format!("offset {pos} is past the end ({} bytes)", buf.len())))
}

/// Position of field `slot` of the table at `table`, if present.
fn field(buf: &[u8], table: usize, slot: usize) -> Result<Option<usize>> {
    let soff = u32_at(buf, table)? as i32;
    let vt = usize::try_from(table as i64 - i64::from(soff)).map_err(|_| bad_fb("vtable before the start"))?;
    let u16_at = |p: usize| -> Result<u16> {
        p.checked_add(2)
            .and_then(|end| buf.get(p..end))
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| bad_fb("vtable past the end"))
    };
    let vsize = u16_at(vt)? as usize;
    let at = 4 + 2 * slot;
    if at + 2 > vsize {
        return Ok(None);
    }
    let off = u16_at(vt + at)? as usize;
    Ok((off != 0).then_some(table + off))
}

fn string_at(buf: &[u8], field_pos: usize) -> Result<String> {
    let s = field_pos + u32_at(buf, field_pos)? as usize;
    let len = u32_at(buf, s)? as usize;
    let bytes =
        (s + 4).checked_add(len).and_then(|end| buf.get(s + 4..end)).ok_or_else(|| bad_fb("string past the end"))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| bad_fb("a string is not UTF-8"))
}

/// The (key, value) entries of a `calibration.flatbuffers`, in stored order.
pub fn read_flatbuffers_table(buf: &[u8]) -> Result<Vec<(String, String)>> {
    let root = u32_at(buf, 0)? as usize;
    let Some(dict) = field(buf, root, 0)? else { return Ok(Vec::new()) };
    let vec = dict + u32_at(buf, dict)? as usize;
    let n = u32_at(buf, vec)? as usize;
    // The count comes from the file: it sizes the buffer only as far as the file could hold entries.
    let mut out = Vec::with_capacity(n.min(buf.len() / 4));
    for i in 0..n {
        let p = vec + 4 + 4 * i;
        let kv = p + u32_at(buf, p)? as usize;
        let key = field(buf, kv, 0)?.map(|f| string_at(buf, f)).transpose()?.unwrap_or_default();
        let value = field(buf, kv, 1)?.map(|f| string_at(buf, f)).transpose()?.unwrap_or_default();
        out.push((key, value));
    }
    Ok(out)
}

/// `calibration.cache`: one `name value` line per tensor, sorted.
pub fn cache_text(table: &BTreeMap<String, f32>) -> String {
    table.iter().map(|(k, &a)| format!("{k} {}\n", value_string(a))).collect()
}

/// A JSON string literal as python's `json.dumps` writes it (ensure_ascii).
pub fn json_string(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            '\u{8}' => o.push_str("\\b"),
            '\u{c}' => o.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    o.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// ONNX Runtime's name of a calibration method (`str(CalibrationMethod.X)`).
pub fn ort_method_name(m: Method) -> &'static str {
    match m {
        Method::MinMax => "CalibrationMethod.MinMax",
        Method::Entropy => "CalibrationMethod.Entropy",
        Method::Percentile(_) => "CalibrationMethod.Percentile",
    }
}

/// `calibration.json`: `json.dumps(TensorsData(method, {name: TensorData(lowest=np.array(−a, float32),
/// highest=np.array(a, float32))}), cls=CalibrationCacheEncoder)`.
pub fn json_text(table: &BTreeMap<String, f32>, method: Method) -> String {
    let arr = |v: f32| {
        format!("{{\"data\": {}, \"dtype\": \"float32\", \"CLS\": \"numpy.array\"}}", python_float_repr(f64::from(v)))
    };
    let entries: Vec<String> = table
        .iter()
        .map(|(k, &a)| {
            format!("{}: {{\"lowest\": {}, \"highest\": {}, \"CLS\": \"TensorData\"}}", json_string(k), arr(-a), arr(a))
        })
        .collect();
    format!(
        "{{\"CLS\": \"TensorsData\", \"data\": {{{}}}, \"calibration_method\": {{\"CLS\": \"CalibrationMethod\", \"value\": \"{}\"}}}}",
        entries.join(", "),
        ort_method_name(method)
    )
}

/// TensorRT's version number written in the native cache header (10.0.0; ONNX Runtime checks only the
/// `TRT-` prefix).
pub const NATIVE_CACHE_TRT_VERSION: u32 = 100000;

/// TensorRT's calibrator name for the header of a native cache.
pub fn native_calibrator_name(m: Method) -> &'static str {
    match m {
        Method::Entropy => "EntropyCalibration2",
        Method::MinMax => "MinMaxCalibration",
        // TensorRT has no percentile calibrator; the name is informative only.
        Method::Percentile(_) => "PercentileCalibration",
    }
}

/// TensorRT's native calibration cache: header line, then `name: hex(float32 scale)` per tensor, with
/// scale = a / 127 (sorted). Names with ':' or a line break cannot be stored (the reader splits at ':').
pub fn native_cache(table: &BTreeMap<String, f32>, method: Method) -> Result<String> {
    let mut s = format!("TRT-{NATIVE_CACHE_TRT_VERSION}-{}\n", native_calibrator_name(method));
    for (k, &a) in table {
        if k.contains(':') || k.contains('\n') || k.contains('\r') {
            return Err(CalibError::Invalid(format!("tensor name '{k}' cannot be written to a TensorRT cache")));
        }
        let scale = a / 127.0;
        s.push_str(&format!("{k}: {:x}\n", scale.to_bits()));
    }
    Ok(s)
}

/// Parses a native cache as ONNX Runtime's TensorRT execution provider does: name → scale · 127.
pub fn read_native_cache(text: &str) -> Result<BTreeMap<String, f32>> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("");
    if !header.split(':').next().unwrap_or("").contains("TRT-") {
        return Err(CalibError::Invalid("not a TensorRT calibration cache (no TRT- header)".into()));
    }
    let mut out = BTreeMap::new();
    for line in lines {
        let mut parts = line.splitn(3, ':');
        let name = parts.next().unwrap_or("").to_string();
        let hex = parts.next().unwrap_or("").trim();
        let bits = u32::from_str_radix(hex, 16)
            .map_err(|_| CalibError::Invalid(format!("cache line '{line}': '{hex}' is not a hex float")))?;
        out.insert(name, f32::from_bits(bits) * 127.0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_formatting() {
        let cases = [
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (0.1, "0.1"),
            (f64::from(0.1f32), "0.10000000149011612"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456.0, "123456.0"),
            (1e16, "1e+16"),
            (9999999999999998.0, "9999999999999998.0"),
            (1.2345e100, "1.2345e+100"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (f64::INFINITY, "inf"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x:e}");
        }
        assert_eq!(value_string(3.0), "3.0");
    }

    #[test]
    fn flatbuffers_round_trip() {
        let table: BTreeMap<String, f32> =
            [("b".to_string(), 1.5f32), ("a".to_string(), 0.25), ("mul_20".to_string(), 2.0e-5)].into();
        let buf = flatbuffers_table(&table);
        let back = read_flatbuffers_table(&buf).unwrap();
        // Stored in reverse key order (the python loop prepends the sorted entries).
        let want: Vec<(String, String)> = table.iter().rev().map(|(k, &v)| (k.clone(), value_string(v))).collect();
        assert_eq!(back, want);
        assert_eq!(back[0].1, "1.9999999494757503e-05"); // repr(float(np.float32(2e-5)))
        assert!(read_flatbuffers_table(&buf[..6]).is_err());
        assert!(read_flatbuffers_table(&flatbuffers_table(&BTreeMap::new())).unwrap().is_empty());
    }

    #[test]
    fn hostile_flatbuffers_are_errors() {
        // An entry count of 2^32 − 1 in a tiny file: an error naming the overrun, not a huge allocation.
        let mut buf = flatbuffers_table(&BTreeMap::new());
        let root = u32_at(&buf, 0).unwrap() as usize;
        let dict = field(&buf, root, 0).unwrap().unwrap();
        let vec = dict + u32_at(&buf, dict).unwrap() as usize;
        buf[vec..vec + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = read_flatbuffers_table(&buf).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
        // A table whose vtable offset points before the start of the file.
        let mut buf = flatbuffers_table(&BTreeMap::new());
        buf[root..root + 4].copy_from_slice(&(root as i32 + 64).to_le_bytes());
        let e = read_flatbuffers_table(&buf).unwrap_err().to_string();
        assert!(e.contains("vtable before the start"), "{e}");
    }

    #[test]
    fn native_cache_round_trip() {
        let table: BTreeMap<String, f32> = [("x_t".to_string(), 3.0f32), ("mul_5".to_string(), 0.125)].into();
        let text = native_cache(&table, Method::Entropy).unwrap();
        assert!(text.starts_with("TRT-100000-EntropyCalibration2\n"), "{text}");
        // 3 / 127 as float32 bits.
        assert!(text.contains(&format!("x_t: {:x}\n", (3.0f32 / 127.0).to_bits())), "{text}");
        let back = read_native_cache(&text).unwrap();
        for (k, v) in &table {
            assert!((back[k] - v).abs() <= v * 1e-6, "{k}: {} vs {v}", back[k]);
        }
        assert!(read_native_cache("x: 1\n").is_err());
        let bad: BTreeMap<String, f32> = [("a:b".to_string(), 1.0f32)].into();
        assert!(native_cache(&bad, Method::MinMax).is_err());
    }

    #[test]
    fn json_and_text() {
        let table: BTreeMap<String, f32> = [("a\"b".to_string(), 0.5f32)].into();
        assert_eq!(cache_text(&table), "a\"b 0.5\n");
        let j = json_text(&table, Method::Entropy);
        assert_eq!(
            j,
            "{\"CLS\": \"TensorsData\", \"data\": {\"a\\\"b\": {\"lowest\": {\"data\": -0.5, \"dtype\": \"float32\", \
             \"CLS\": \"numpy.array\"}, \"highest\": {\"data\": 0.5, \"dtype\": \"float32\", \"CLS\": \"numpy.array\"}, \
             \"CLS\": \"TensorData\"}}, \"calibration_method\": {\"CLS\": \"CalibrationMethod\", \"value\": \
             \"CalibrationMethod.Entropy\"}}"
        );
        assert_eq!(json_string("é"), "\"\\u00e9\"");
    }
}
