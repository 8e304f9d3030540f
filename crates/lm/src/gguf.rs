//! GGUF reader: header (v2/v3), metadata key/values, tensor index, alignment, and
//! dequantisation of F32/F16/BF16/Q4_0/Q4_1/Q8_0 tensors to f32.
//!
//! The file is memory-mapped; tensors are dequantised on demand by [`GgufFile::tensor_f32`]
//! so only the f32 copies the model keeps cost memory. Every malformed input (bad magic,
//! truncated header, a tensor running past the end of the file, an unsupported
//! quantisation type) is an error naming the file and the problem, never a panic.

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The ggml tensor types this reader knows by name; only some can be dequantised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            _ => "unknown",
        }
    }

    /// (elements per block, bytes per block) for the types we dequantise.
    fn block(self) -> Option<(usize, usize)> {
        match self.0 {
            0 => Some((1, 4)),
            1 => Some((1, 2)),
            2 => Some((32, 18)),
            3 => Some((32, 20)),
            8 => Some((32, 34)),
            30 => Some((1, 2)),
            _ => None,
        }
    }
}

/// One entry of the tensor index.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF dimension order: `dims[0]` is the contiguous (innermost) axis.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset relative to the start of the tensor data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in row-major (PyTorch) order: outermost first.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    data_start: usize,
    mmap: memmap2::Mmap,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => bail!(
                "{}: truncated GGUF file: need {} bytes for {} at offset {}, file has {} bytes",
                self.path.display(),
                n,
                what,
                self.pos,
                self.buf.len()
            ),
        }
    }
    fn u8(&mut self, w: &str) -> Result<u8> {
        Ok(self.take(1, w)?[0])
    }
    fn u16(&mut self, w: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, w)?.try_into().unwrap()))
    }
    fn u32(&mut self, w: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, w)?.try_into().unwrap()))
    }
    fn u64(&mut self, w: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, w)?.try_into().unwrap()))
    }
    fn string(&mut self, w: &str) -> Result<String> {
        let n = self.u64(w)?;
        if n > self.buf.len() as u64 {
            bail!(
                "{}: corrupt GGUF file: string length {} for {} at offset {} exceeds the file size",
                self.path.display(),
                n,
                w,
                self.pos
            );
        }
        let b = self.take(n as usize, w)?;
        String::from_utf8(b.to_vec())
            .with_context(|| format!("{}: {} is not valid UTF-8", self.path.display(), w))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(key)?),
            1 => Value::I8(self.u8(key)? as i8),
            2 => Value::U16(self.u16(key)?),
            3 => Value::I16(self.u16(key)? as i16),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => Value::Bool(self.u8(key)? != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    bail!(
                        "{}: corrupt GGUF file: nested arrays too deep in {key}",
                        self.path.display()
                    );
                }
                let ety = self.u32(key)?;
                let n = self.u64(key)?;
                // Each element takes at least one byte: a larger count is corruption.
                if n > (self.buf.len() - self.pos) as u64 {
                    bail!(
                        "{}: corrupt GGUF file: array {key} claims {n} elements, more than the file holds",
                        self.path.display()
                    );
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            t => bail!(
                "{}: corrupt GGUF file: unknown metadata value type {t} for key {key}",
                self.path.display()
            ),
        })
    }
}

impl GgufFile {
    /// Memory-map and parse the header, metadata and tensor index of a GGUF file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only; a file changed underneath us is the usual mmap caveat.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let mut r = Reader {
            buf: &mmap,
            pos: 0,
            path,
        };
        let magic = r.take(4, "magic")?;
        if magic != b"GGUF" {
            bail!(
                "{}: not a GGUF file (magic {:?}, expected \"GGUF\")",
                path.display(),
                magic
            );
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            bail!(
                "{}: unsupported GGUF version {version} (supported: 2, 3)",
                path.display()
            );
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        if n_tensors > mmap.len() as u64 || n_kv > mmap.len() as u64 {
            bail!(
                "{}: corrupt GGUF header: {n_tensors} tensors, {n_kv} metadata entries",
                path.display()
            );
        }
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let nd = r.u32(&name)?;
            if nd == 0 || nd > 4 {
                bail!(
                    "{}: corrupt GGUF tensor info: {name} has {nd} dimensions",
                    path.display()
                );
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(r.u64(&name)?);
            }
            let ty = GgmlType(r.u32(&name)?);
            let offset = r.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|&a| a > 0 && a.is_power_of_two())
                .with_context(|| {
                    format!(
                        "{}: general.alignment must be a power of two, got {v:?}",
                        path.display()
                    )
                })? as usize,
            None => 32,
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let data_len = mmap.len().saturating_sub(data_start) as u64;
        let mut index = HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            if let Some((blk, bytes)) = t.ty.block() {
                let n = t.n_elements();
                if n % blk as u64 != 0 {
                    bail!(
                        "{}: tensor {} has {} elements, not a multiple of the {} block size {}",
                        path.display(),
                        t.name,
                        n,
                        t.ty.name(),
                        blk
                    );
                }
                let size = n / blk as u64 * bytes as u64;
                if t.offset.checked_add(size).is_none_or(|e| e > data_len) {
                    bail!(
                        "{}: truncated GGUF file: tensor {} ({} bytes at data offset {}) runs past the end of the file ({} data bytes)",
                        path.display(),
                        t.name,
                        size,
                        t.offset,
                        data_len
                    );
                }
            }
            index.insert(t.name.clone(), i);
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            index,
            data_start,
            mmap,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(|v| v.as_str())
            .with_context(|| format!("{}: missing string metadata {key}", self.path.display()))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(|v| v.as_u64())
            .with_context(|| format!("{}: missing integer metadata {key}", self.path.display()))
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.as_f64())
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Dequantise a tensor to f32 in row-major (PyTorch) order. Returns (data, shape).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self
            .tensor_info(name)
            .with_context(|| format!("{}: tensor {name} not found", self.path.display()))?;
        let (blk, bytes) = t.ty.block().with_context(|| {
            format!(
                "{}: tensor {name} has quantization type {} ({}), which saelab cannot dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)",
                self.path.display(),
                t.ty.name(),
                t.ty.0
            )
        })?;
        let n = t.n_elements() as usize;
        let start = self.data_start + t.offset as usize;
        let raw = &self.mmap[start..start + n / blk * bytes];
        let mut out = vec![0f32; n];
        dequantize(t.ty, raw, &mut out);
        Ok((out, t.shape()))
    }
}

/// Dequantise `raw` of type `ty` into `out` (length = element count). Sizes are checked
/// by the caller.
pub fn dequantize(ty: GgmlType, raw: &[u8], out: &mut [f32]) {
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = h(c);
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(raw.chunks_exact(18)) {
                let d = h(&b[0..2]);
                for j in 0..16 {
                    let q = b[2 + j];
                    o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(raw.chunks_exact(20)) {
                let d = h(&b[0..2]);
                let m = h(&b[2..4]);
                for j in 0..16 {
                    let q = b[4 + j];
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(raw.chunks_exact(34)) {
                let d = h(&b[0..2]);
                for j in 0..32 {
                    o[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        _ => unreachable!("dequantize called with unsupported type {}", ty.name()),
    }
}

/// Minimal GGUF writer, used by tests to build small (and deliberately broken) files.
pub mod write {
    use super::Value;

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::Str(s) => put_str(out, s),
            Value::Array(a) => {
                let ety = a.first().map(type_id).unwrap_or(4);
                out.extend_from_slice(&ety.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    put_value(out, x);
                }
            }
        }
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Serialise a GGUF v3 file. `tensors`: (name, GGUF dims (innermost first), type, raw bytes).
    pub fn gguf_bytes(
        metadata: &[(&str, Value)],
        tensors: &[(&str, Vec<u64>, u32, Vec<u8>)],
    ) -> Vec<u8> {
        let align = 32usize;
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(align as u64) * align as u64;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        let base = out.len();
        for ((_, _, _, data), off) in tensors.iter().zip(&offsets) {
            out.resize(base + *off as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference block quantisers (the inverse of the formats' definitions) for round trips.
    fn quant_q8_0(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in x.chunks(32) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            let dq = f16::from_f32(d).to_f32();
            for v in b {
                let q = if dq == 0.0 {
                    0
                } else {
                    (v / dq).round().clamp(-127.0, 127.0) as i8
                };
                out.push(q as u8);
            }
        }
        out
    }

    fn quant_q4_1(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in x.chunks(32) {
            let mn = b.iter().cloned().fold(f32::INFINITY, f32::min);
            let mx = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let d = (mx - mn) / 15.0;
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(mn).to_le_bytes());
            let (dq, mq) = (f16::from_f32(d).to_f32(), f16::from_f32(mn).to_f32());
            let q = |v: f32| ((v - mq) / dq).round().clamp(0.0, 15.0) as u8;
            for j in 0..16 {
                out.push(q(b[j]) | (q(b[j + 16]) << 4));
            }
        }
        out
    }

    fn quant_q4_0(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in x.chunks(32) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 7.0;
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            let dq = f16::from_f32(d).to_f32();
            let q = |v: f32| ((v / dq).round() + 8.0).clamp(0.0, 15.0) as u8;
            for j in 0..16 {
                out.push(q(b[j]) | (q(b[j + 16]) << 4));
            }
        }
        out
    }

    #[test]
    fn dequantize_round_trips_within_quantization_step() {
        let mut rng = saelab_core::rng::Rng::new(7);
        let x: Vec<f32> = (0..128).map(|_| rng.normal()).collect();
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let cases: Vec<(GgmlType, Vec<u8>, f32)> = vec![
            (GgmlType::Q8_0, quant_q8_0(&x), amax / 127.0),
            (GgmlType::Q4_1, quant_q4_1(&x), 2.0 * amax / 15.0),
            (GgmlType::Q4_0, quant_q4_0(&x), amax / 7.0),
            (
                GgmlType::F16,
                x.iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
                1e-3 * amax,
            ),
            (
                GgmlType::BF16,
                x.iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                1e-2 * amax,
            ),
            (
                GgmlType::F32,
                x.iter().flat_map(|v| v.to_le_bytes()).collect(),
                0.0,
            ),
        ];
        for (ty, raw, step) in cases {
            let mut out = vec![0f32; x.len()];
            dequantize(ty, &raw, &mut out);
            for (a, b) in out.iter().zip(&x) {
                assert!(
                    (a - b).abs() <= step * 0.51 + 1e-6,
                    "{}: {a} vs {b}",
                    ty.name()
                );
            }
        }
    }

    #[test]
    fn parses_written_file_and_rejects_damage() {
        let dir = std::env::temp_dir().join(format!("saelab-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let x: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 - 3.0).collect();
        let bytes = write::gguf_bytes(
            &[
                ("general.architecture", Value::Str("llama".into())),
                ("llama.block_count", Value::U32(2)),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(vec![Value::Str("a".into()), Value::Str("b".into())]),
                ),
            ],
            &[(
                "w",
                vec![16, 4],
                0,
                x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )],
        );
        let p = dir.join("ok.gguf");
        std::fs::write(&p, &bytes).unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u64("llama.block_count").unwrap(), 2);
        let (t, shape) = g.tensor_f32("w").unwrap();
        assert_eq!(shape, vec![4, 16]);
        assert_eq!(t, x);

        let p2 = dir.join("trunc.gguf");
        std::fs::write(&p2, &bytes[..bytes.len() - 10]).unwrap();
        let e = format!("{:#}", GgufFile::open(&p2).err().unwrap());
        assert!(e.contains("trunc.gguf") && e.contains("truncated"), "{e}");

        let p3 = dir.join("head.gguf");
        std::fs::write(&p3, &bytes[..40]).unwrap();
        let e = format!("{:#}", GgufFile::open(&p3).err().unwrap());
        assert!(e.contains("head.gguf") && e.contains("truncated"), "{e}");

        let mut bad = bytes.clone();
        bad[0] = b'X';
        let p4 = dir.join("magic.gguf");
        std::fs::write(&p4, &bad).unwrap();
        let e = format!("{:#}", GgufFile::open(&p4).err().unwrap());
        assert!(e.contains("magic.gguf") && e.contains("not a GGUF"), "{e}");

        let q = write::gguf_bytes(&[], &[("k", vec![256], 12, vec![0u8; 144])]);
        let p5 = dir.join("q4k.gguf");
        std::fs::write(&p5, &q).unwrap();
        let g = GgufFile::open(&p5).unwrap();
        let e = format!("{:#}", g.tensor_f32("k").err().unwrap());
        assert!(e.contains("q4k.gguf") && e.contains("Q4_K"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
