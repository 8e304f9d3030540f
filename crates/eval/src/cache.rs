//! On-disk cache of LM-side evaluation inputs.
//!
//! Everything an evaluation takes from the LM that does not depend on the SAE (hook
//! activations of the probing texts, the absorption prompts' activations, the clean
//! and zero-ablation losses of core) is stored under a key built from (model, hook,
//! eval, sizes, seed). A second SAE on the same model and hook then skips those LM
//! passes. File format: `SAELABEC1\n`, a u64 LE header length, a JSON header
//! `{key, arrays: [{name, dtype, len}], meta}`, then the arrays' little-endian bytes.
//! The stored key is compared on load, so a hash collision is a miss, not a wrong hit.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"SAELABEC1\n";

/// Named arrays plus free-form metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Blob {
    pub f32s: Vec<(String, Vec<f32>)>,
    pub u64s: Vec<(String, Vec<u64>)>,
    pub meta: serde_json::Value,
}

impl Blob {
    pub fn f32(&self, name: &str) -> Result<&[f32]> {
        self.f32s
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .with_context(|| format!("cache entry has no array '{name}'"))
    }
    /// Move the f32 array `name` out of the blob (no copy).
    pub fn take_f32(&mut self, name: &str) -> Result<Vec<f32>> {
        let i = self
            .f32s
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("cache entry has no array '{name}'"))?;
        Ok(self.f32s.swap_remove(i).1)
    }
    pub fn u64(&self, name: &str) -> Result<&[u64]> {
        self.u64s
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .with_context(|| format!("cache entry has no array '{name}'"))
    }
}

/// A directory of cache entries (no directory = caching off).
#[derive(Clone, Debug, Default)]
pub struct ActCache {
    pub dir: Option<PathBuf>,
}

/// FNV-1a 64: file names, text and token-sequence fingerprints, dataset seeds.
pub fn fnv64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl ActCache {
    pub fn new(dir: Option<PathBuf>) -> Self {
        ActCache { dir }
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{:016x}.bin", fnv64(key.bytes()))))
    }

    /// The entry for `key`, if cached and readable (a corrupt entry is a miss).
    pub fn load(&self, key: &str) -> Option<Blob> {
        let path = self.path(key)?;
        if !path.exists() {
            return None;
        }
        match read_blob(&path, key) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!("ignoring unreadable cache entry {}: {e:#}", path.display());
                None
            }
        }
    }

    pub fn store(&self, key: &str, blob: &Blob) -> Result<()> {
        let Some(path) = self.path(key) else {
            return Ok(());
        };
        write_blob(&path, key, blob)
    }
}

pub fn write_blob(path: &Path, key: &str, blob: &Blob) -> Result<()> {
    let mut arrays = Vec::new();
    for (n, v) in &blob.f32s {
        arrays.push(serde_json::json!({"name": n, "dtype": "f32", "len": v.len()}));
    }
    for (n, v) in &blob.u64s {
        arrays.push(serde_json::json!({"name": n, "dtype": "u64", "len": v.len()}));
    }
    let header =
        serde_json::to_vec(&serde_json::json!({"key": key, "arrays": arrays, "meta": blob.meta}))?;
    saelab_core::fsutil::write_atomic_with(path, |w| {
        use std::io::Write;
        w.write_all(MAGIC)?;
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, v) in &blob.f32s {
            for x in v {
                w.write_all(&x.to_le_bytes())?;
            }
        }
        for (_, v) in &blob.u64s {
            for x in v {
                w.write_all(&x.to_le_bytes())?;
            }
        }
        Ok(())
    })
}

pub fn read_blob(path: &Path, key: &str) -> Result<Blob> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let total = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len() as usize;
    let mut r = std::io::BufReader::new(file);
    // Arrays are read straight into their vectors: a 200 MB entry costs one copy from
    // the page cache, not three.
    let mut read = |buf: &mut [u8], what: &str| {
        r.read_exact(buf)
            .with_context(|| format!("{}: truncated {what}", path.display()))
    };
    let mut head = [0u8; MAGIC.len() + 8];
    if total < head.len() {
        bail!("{}: not a saelab eval cache file", path.display());
    }
    read(&mut head, "header")?;
    if &head[..MAGIC.len()] != MAGIC {
        bail!("{}: not a saelab eval cache file", path.display());
    }
    let hl = u64::from_le_bytes(head[MAGIC.len()..].try_into().unwrap()) as usize;
    let mut p = head.len() + hl;
    if total < p {
        bail!("{}: truncated header", path.display());
    }
    let mut hbytes = vec![0u8; hl];
    read(&mut hbytes, "header")?;
    let header: serde_json::Value = serde_json::from_slice(&hbytes)
        .with_context(|| format!("{}: bad header", path.display()))?;
    if header["key"].as_str() != Some(key) {
        bail!("{}: cache key differs (hash collision)", path.display());
    }
    let mut blob = Blob {
        meta: header["meta"].clone(),
        ..Default::default()
    };
    for a in header["arrays"]
        .as_array()
        .map(|v| v.as_slice())
        .unwrap_or(&[])
    {
        let name = a["name"].as_str().unwrap_or("").to_string();
        let len = a["len"].as_u64().unwrap_or(0) as usize;
        let size = if a["dtype"] == "f32" { 4 } else { 8 };
        if total < p + len * size {
            bail!("{}: truncated array '{name}'", path.display());
        }
        p += len * size;
        if size == 4 {
            let mut v = vec![0f32; len];
            read(bytemuck_f32(&mut v), "array")?;
            v.iter_mut()
                .for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
            blob.f32s.push((name, v));
        } else {
            let mut v = vec![0u64; len];
            read(bytemuck_u64(&mut v), "array")?;
            v.iter_mut().for_each(|x| *x = u64::from_le(*x));
            blob.u64s.push((name, v));
        }
    }
    if p != total {
        bail!(
            "{}: {} trailing bytes",
            path.display(),
            total as isize - p as isize
        );
    }
    Ok(blob)
}

/// The bytes of an f32 slice (plain old data; every bit pattern is a valid f32).
fn bytemuck_f32(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no padding and no invalid bit patterns; the length is in bytes.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 4) }
}

/// The bytes of a u64 slice.
fn bytemuck_u64(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding and no invalid bit patterns; the length is in bytes.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 8) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_key_check() {
        let dir = std::env::temp_dir().join(format!("saelab-evalcache-{}", std::process::id()));
        let cache = ActCache::new(Some(dir.clone()));
        let blob = Blob {
            f32s: vec![("acts".into(), vec![1.5, -2.0, f32::MIN_POSITIVE])],
            u64s: vec![("offsets".into(), vec![0, 2, 3])],
            meta: serde_json::json!({"n": 2}),
        };
        assert!(cache.load("k1").is_none());
        cache.store("k1", &blob).unwrap();
        assert_eq!(cache.load("k1").unwrap(), blob);
        assert!(cache.load("k2").is_none());
        let path = cache.path("k1").unwrap();
        assert!(read_blob(&path, "other").is_err());
        // Truncation is detected, and load treats it as a miss.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(cache.load("k1").is_none());
        assert!(ActCache::default().load("k1").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
