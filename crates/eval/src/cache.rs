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

/// FNV-1a 64, for file names.
fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
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
            .map(|d| d.join(format!("{:016x}.bin", fnv64(key))))
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
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() < MAGIC.len() + 8 || &bytes[..MAGIC.len()] != MAGIC {
        bail!("{}: not a saelab eval cache file", path.display());
    }
    let mut p = MAGIC.len();
    let hl = u64::from_le_bytes(bytes[p..p + 8].try_into().unwrap()) as usize;
    p += 8;
    if bytes.len() < p + hl {
        bail!("{}: truncated header", path.display());
    }
    let header: serde_json::Value = serde_json::from_slice(&bytes[p..p + hl])
        .with_context(|| format!("{}: bad header", path.display()))?;
    p += hl;
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
        if bytes.len() < p + len * size {
            bail!("{}: truncated array '{name}'", path.display());
        }
        let chunk = &bytes[p..p + len * size];
        p += len * size;
        if size == 4 {
            blob.f32s.push((
                name,
                chunk
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ));
        } else {
            blob.u64s.push((
                name,
                chunk
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ));
        }
    }
    if p != bytes.len() {
        bail!("{}: {} trailing bytes", path.display(), bytes.len() - p);
    }
    Ok(blob)
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
