//! Weight sources: a GGUF file or a directory of safetensors shards (+ config.json), behind
//! one interface that returns named tensors as f32 with a shape check.
//!
//! Both formats are memory-mapped; each tensor is converted to f32 once at load. Errors name
//! the file and the tensor.

use crate::gguf::GgufFile;
use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where tensors come from.
pub enum Source {
    Gguf(GgufFile),
    Safetensors(SafetensorsDir),
}

impl Source {
    /// The named tensor as f32, checked against `shape` (row-major, outermost first).
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (data, got, file) = match self {
            Source::Gguf(g) => {
                let (d, s) = g.tensor_f32(name)?;
                (d, s, g.path.clone())
            }
            Source::Safetensors(s) => {
                let (d, sh, f) = s.tensor_f32(name)?;
                (d, sh, f)
            }
        };
        // GGUF drops trailing unit dims; compare element layouts, not just ranks.
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
        if squeeze(&got) != squeeze(shape) {
            bail!(
                "{}: tensor {name} has shape {got:?}, expected {shape:?}",
                file.display()
            );
        }
        Ok(data)
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Gguf(g) => g.tensor_info(name).is_some(),
            Source::Safetensors(s) => s.index.contains_key(name),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Source::Gguf(g) => &g.path,
            Source::Safetensors(s) => &s.dir,
        }
    }
}

/// Memory-mapped safetensors shards of one model directory.
pub struct SafetensorsDir {
    pub dir: PathBuf,
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read model directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            bail!(
                "{}: no *.safetensors files in the model directory",
                dir.display()
            );
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for p in paths {
            let f =
                std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
            // SAFETY: read-only map of a file we do not modify.
            let m = unsafe { memmap2::Mmap::map(&f) }
                .with_context(|| format!("cannot memory-map {}", p.display()))?;
            let st = SafeTensors::deserialize(&m).map_err(|e| {
                anyhow!(
                    "{}: corrupt or truncated safetensors file: {e}",
                    p.display()
                )
            })?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((p, m));
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>, PathBuf)> {
        let &fi = self.index.get(name).with_context(|| {
            format!(
                "{}: tensor {name} not found in any *.safetensors file",
                self.dir.display()
            )
        })?;
        let (path, m) = &self.files[fi];
        let st = SafeTensors::deserialize(m).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let t = st
            .tensor(name)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let b = t.data();
        let data: Vec<f32> = match t.dtype() {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => bail!(
                "{}: tensor {name} has dtype {other:?}, which saelab cannot load (supported: F32, F16, BF16)",
                path.display()
            ),
        };
        Ok((data, t.shape().to_vec(), path.clone()))
    }
}
