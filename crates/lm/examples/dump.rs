//! Dump logits and hook activations for given token ids as `.npy` files, for the PyTorch
//! cross-check in `bench/check_lm.py`.
//!
//! Usage:
//!   dump MODEL OUT_DIR TOKENS_JSON BATCH SEQ [HOOK ...]
//! TOKENS_JSON is a JSON array of `BATCH*SEQ` token ids (row-major). Writes
//! `OUT_DIR/logits.npy` (`[BATCH*SEQ, vocab]`) and `OUT_DIR/<hook name>.npy`
//! (`[BATCH*SEQ, d_model]`) for each hook; `tokens.json` gets the ids of the text given
//! with `--encode TEXT` instead (then nothing else runs).

use anyhow::{bail, Context, Result};
use saelab_lm::{HookPoint, Hooks, Model};
use std::io::Write;
use std::path::{Path, PathBuf};

fn write_npy(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Magic (6) + version (2) + header length (2) + header, padded to a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat(total.div_ceil(64) * 64 - total));
    header.push('\n');
    saelab_core::fsutil::write_atomic_with(path, |w| {
        w.write_all(b"\x93NUMPY\x01\x00")?;
        w.write_all(&(header.len() as u16).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        for v in data {
            w.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() == 3 && args[1] == "--encode" {
        let model = Model::load(Path::new(&args[0]))?;
        let ids = model.tokenizer().encode(&args[2])?;
        println!("{}", serde_json::to_string(&ids)?);
        return Ok(());
    }
    if args.len() < 5 {
        bail!("usage: dump MODEL OUT_DIR TOKENS_JSON BATCH SEQ [HOOK ...]  |  dump MODEL --encode TEXT");
    }
    let model = Model::load(Path::new(&args[0]))?;
    let out = PathBuf::from(&args[1]);
    let text =
        std::fs::read_to_string(&args[2]).with_context(|| format!("cannot read {}", args[2]))?;
    let tokens: Vec<u32> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON array of ids", args[2]))?;
    let batch: usize = args[3].parse().context("BATCH must be an integer")?;
    let seq: usize = args[4].parse().context("SEQ must be an integer")?;
    let n_layers = model.config().n_layers;
    let points: Vec<HookPoint> = args[5..]
        .iter()
        .map(|s| HookPoint::parse_for(s, n_layers))
        .collect::<Result<_>>()?;
    let mut hooks = Hooks::new();
    for &hp in &points {
        hooks = hooks.capture(hp);
    }
    let t0 = std::time::Instant::now();
    let res = model.forward(&tokens, batch, seq, &mut hooks)?;
    eprintln!("forward: {:.3} s", t0.elapsed().as_secs_f64());
    let rows = batch * seq;
    let c = model.config();
    if let Some(l) = &res.logits {
        write_npy(&out.join("logits.npy"), l, &[rows, c.vocab_size])?;
    }
    for hp in points {
        write_npy(
            &out.join(format!("{hp}.npy")),
            &res.captured[&hp],
            &[rows, c.d_model],
        )?;
    }
    Ok(())
}
