//! saelab-lm: language models with hook points, for extracting and patching activations.
//!
//! - [`gguf`]: GGUF reader (metadata, tensor index), dequantisation of Q4_0/Q4_1/Q8_0/F16/BF16/F32.
//! - [`weights`]: one tensor interface over GGUF files and safetensors directories.
//! - [`tokenizer`]: tokenizers built from GGUF metadata or loaded from tokenizer.json.
//! - [`hooks`]: hook names (`blocks.L.hook_resid_post`, ...) and hook actions.
//! - [`ops`]: RMSNorm, RoPE, activations, GEMM-based linear layers, causal GQA attention.
//! - [`llama`], [`gemma2`]: one file per architecture (weight names and block forwards).
//!
//! [`Model::load`] takes a `.gguf` file or a directory with `config.json`, `*.safetensors`
//! and `tokenizer.json`; [`Model::load_with`] can keep weight matrices in bf16 (f32 compute);
//! [`Model::forward`] runs a batch of token rows with hooks.

pub mod gemma2;
pub mod gguf;
pub mod hooks;
pub mod llama;
pub mod ops;
pub mod tokenizer;
pub mod weights;

pub use hooks::{HookKind, HookPoint, Hooks};
pub use tokenizer::Tokenizer;

use anyhow::{bail, Context, Result};
use ops::{AttnScratch, Mat, Rope};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use weights::{SafetensorsDir, Source};

/// Longest sequence a forward accepts (size of the precomputed rotary table).
pub const MAX_ROPE_POSITIONS: usize = 16384;

/// Supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Gemma2,
}

/// Model hyper-parameters (from GGUF metadata or config.json).
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub name: String,
    pub arch: Arch,
    pub d_model: usize,
    pub n_layers: usize,
    pub vocab_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub rms_eps: f32,
    pub rope_theta: f64,
    /// Longest sequence the rotary table is built for.
    pub max_seq: usize,
    /// Multiplier of q·k before softmax.
    pub attn_scale: f32,
    /// Gemma-2: attention logit soft-cap.
    pub attn_softcap: Option<f32>,
    /// Gemma-2: final logit soft-cap.
    pub final_softcap: Option<f32>,
    /// Gemma-2: sliding-window length, used by the layers marked in `sliding_layers`.
    pub sliding_window: Option<usize>,
    /// Per layer: whether attention uses `sliding_window` (Gemma-2: even layers).
    pub sliding_layers: Vec<bool>,
    pub tied_embeddings: bool,
}

/// Weights of one transformer block. Norm weights are effective multipliers (Gemma's
/// `1 + w` folded in); Q/K rows are in the Hugging Face (half-split rotary) layout.
pub(crate) struct Layer {
    pub attn_norm: Vec<f32>,
    /// `[(nh + 2*nkv) * hd, d]`: q rows, then k rows, then v rows.
    pub wqkv: Mat,
    /// `[d, nh*hd]`
    pub wo: Mat,
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    /// `[2*ff, d]`: gate rows, then up rows.
    pub w_gate_up: Mat,
    /// `[d, ff]`
    pub w_down: Mat,
    pub post_ffn_norm: Option<Vec<f32>>,
}

pub(crate) struct Weights {
    /// `[vocab, d]`
    pub embed: Mat,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// `[vocab, d]`, None when tied to the embedding.
    pub lm_head: Option<Mat>,
}

impl Weights {
    /// Embedding, final norm and (untied) output head under their GGUF names, around
    /// the architecture's already-loaded layers.
    pub(crate) fn from_gguf_layers(
        src: &Source,
        c: &ModelConfig,
        layers: Vec<Layer>,
    ) -> Result<Weights> {
        let d = c.d_model;
        let embed: Mat = src.tensor("token_embd.weight", &[c.vocab_size, d])?.into();
        let lm_head = if src.has("output.weight") {
            Some(src.tensor("output.weight", &[c.vocab_size, d])?.into())
        } else {
            None
        };
        Ok(Weights {
            embed,
            layers,
            final_norm: src.tensor("output_norm.weight", &[d])?,
            lm_head,
        })
    }

    /// Convert every matrix to `dtype` storage (norm vectors stay f32).
    fn convert(self, dtype: WeightDtype, c: &ModelConfig) -> Weights {
        let conv: &dyn Fn(Mat, usize, usize) -> Mat = match dtype {
            WeightDtype::F32 => return self,
            WeightDtype::Bf16 => &|m: Mat, _, _| m.to_bf16(),
            WeightDtype::Bf16Compute => &|m: Mat, rows, cols| m.to_bf16_products(rows, cols),
        };
        let (d, hd, ff) = (c.d_model, c.head_dim, c.d_ff);
        let q_kv = (c.n_heads + 2 * c.n_kv_heads) * hd;
        Weights {
            embed: conv(self.embed, c.vocab_size, d),
            layers: self
                .layers
                .into_iter()
                .map(|l| Layer {
                    wqkv: conv(l.wqkv, q_kv, d),
                    wo: conv(l.wo, d, c.n_heads * hd),
                    w_gate_up: conv(l.w_gate_up, 2 * ff, d),
                    w_down: conv(l.w_down, d, ff),
                    ..l
                })
                .collect(),
            final_norm: self.final_norm,
            lm_head: self.lm_head.map(|m| conv(m, c.vocab_size, d)),
        }
    }

    fn bytes(&self) -> usize {
        let mut b = self.embed.bytes()
            + self.lm_head.as_ref().map_or(0, Mat::bytes)
            + self.final_norm.len() * 4;
        for l in &self.layers {
            b += l.wqkv.bytes() + l.wo.bytes() + l.w_gate_up.bytes() + l.w_down.bytes();
            b += 4 * (l.attn_norm.len() + l.ffn_norm.len());
            b += 4
                * (l.post_attn_norm.as_ref().map_or(0, Vec::len)
                    + l.post_ffn_norm.as_ref().map_or(0, Vec::len));
        }
        b
    }
}

/// How weight matrices are stored, and the precision of the projections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightDtype {
    /// f32 (default): exact dequantised weights.
    #[default]
    F32,
    /// bf16 storage, widened to f32 inside the GEMM: half the memory, weights rounded to
    /// 8 significant bits.
    Bf16,
    /// bf16 weights and bf16 inputs to every projection, sums in f32: the arithmetic of
    /// PyTorch's bf16 on a CPU, on AMX tiles where this CPU has them (Sapphire Rapids and
    /// later; `saelab_core::gemm::amx`), elsewhere the same rounded values through the
    /// f32 GEMM (slower than `F32` there). Norms, attention and the residual stream stay
    /// f32.
    Bf16Compute,
}

impl WeightDtype {
    /// The name users write (`--lm-precision`, a plan's `lm_precision`).
    pub fn as_str(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16-weights",
            WeightDtype::Bf16Compute => "bf16",
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => WeightDtype::F32,
            "bf16-weights" => WeightDtype::Bf16,
            "bf16" => WeightDtype::Bf16Compute,
            _ => bail!(
                "unknown LM precision {s:?}: f32 (exact), bf16-weights (bf16 storage, f32 \
                 arithmetic) or bf16 (bf16 products, f32 sums; AMX tiles where the CPU has them)"
            ),
        })
    }
}

/// Options of [`Model::load_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    pub weights: WeightDtype,
}

/// Reusable activation buffers of one forward (grown on demand, never shrunk).
#[derive(Default)]
pub(crate) struct Workspace {
    pub h: Vec<f32>,
    pub qkv: Vec<f32>,
    pub attn: Vec<f32>,
    pub gu: Vec<f32>,
    pub act: Vec<f32>,
    pub sub: Vec<f32>,
    pub scratch: AttnScratch,
}

impl Workspace {
    fn ensure(&mut self, c: &ModelConfig, rows: usize) {
        let grow = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0)
            }
        };
        grow(&mut self.h, rows * c.d_model);
        grow(
            &mut self.qkv,
            rows * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim,
        );
        grow(&mut self.attn, rows * c.n_heads * c.head_dim);
        grow(&mut self.gu, rows * 2 * c.d_ff);
        grow(&mut self.act, rows * c.d_ff);
        grow(&mut self.sub, rows * c.d_model);
    }
}

/// Result of a forward.
pub struct ForwardOutput {
    /// Captured activations, each `[batch*seq, d_model]`.
    pub captured: HashMap<HookPoint, Vec<f32>>,
    /// `[batch*seq, vocab]` when requested.
    pub logits: Option<Vec<f32>>,
}

/// A loaded language model.
pub struct Model {
    config: ModelConfig,
    tokenizer: Tokenizer,
    weights: Weights,
    weight_dtype: WeightDtype,
    rope: Rope,
    workspace: Mutex<Workspace>,
}

impl Model {
    /// Load a `.gguf` file, or a directory with config.json + *.safetensors + tokenizer.json.
    pub fn load(path: &Path) -> Result<Model> {
        Self::load_with(path, &LoadOptions::default())
    }

    /// The model a user names (`default`: SmolLM2-135M-Instruct from the asset cache,
    /// fetched on first use; otherwise a `.gguf` file or a safetensors directory), loaded
    /// at `precision`; errors name the path.
    pub fn open(spec: &str, precision: WeightDtype) -> Result<Model> {
        let path = saelab_core::assets::resolve_model(spec)?;
        Self::load_with(&path, &LoadOptions { weights: precision })
            .with_context(|| format!("loading model {}", path.display()))
    }

    /// [`Model::load`] with options (e.g. bf16 weight storage).
    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Model> {
        let (mut config, tokenizer, weights) = if path.is_dir() {
            load_safetensors_dir(path)?
        } else {
            load_gguf(path)?
        };
        // The rotary table is precomputed; cap it so huge advertised contexts cost no memory.
        config.max_seq = config.max_seq.min(MAX_ROPE_POSITIONS);
        let rope = Rope::new(config.head_dim, config.rope_theta, config.max_seq);
        let weights = weights.convert(opts.weights, &config);
        Ok(Model {
            config,
            tokenizer,
            weights,
            weight_dtype: opts.weights,
            rope,
            workspace: Mutex::new(Workspace::default()),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model's name with its precision when not f32 (`"<name> [bf16]"`): the name
    /// caches and result files record, so numbers of different precisions never mix.
    pub fn name_with_precision(&self) -> String {
        match self.weight_dtype {
            WeightDtype::F32 => self.config.name.clone(),
            d => format!("{} [{}]", self.config.name, d.as_str()),
        }
    }

    /// Bytes held by the weights (matrices and norm vectors).
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// Direct effect of residual-stream directions on the logits, `(dir ⊙ g) W_U^T` for
    /// each row of `dirs` `[n, d_model]` (`g` = the final norm's weight, which
    /// TransformerLens folds into W_U), `[n, vocab]`. The final norm's division by the
    /// residual's RMS depends on the whole residual and is left out, as SAE dashboards do;
    /// so is Gemma-2's final soft-cap. For a residual of RMS 1 this is the model's logits.
    pub fn logit_effect(&self, dirs: &[f32], n: usize) -> Vec<f32> {
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        assert_eq!(dirs.len(), n * d, "logit_effect: dirs must be [n, d_model]");
        let mut scaled = dirs.to_vec();
        for row in scaled.chunks_exact_mut(d) {
            for (x, g) in row.iter_mut().zip(&self.weights.final_norm) {
                *x *= g;
            }
        }
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        let mut out = vec![0f32; n * v];
        ops::linear(&scaled, n, head, v, d, &mut out);
        out
    }

    /// Run `tokens` (row-major `[batch, seq]`, causal within each row, positions `0..seq`)
    /// through the model, applying `hooks`. With `hooks.logits(false)` the forward stops
    /// right after the last hook point.
    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        hooks: &mut Hooks,
    ) -> Result<ForwardOutput> {
        self.run(tokens, batch, seq, None, hooks)
    }

    /// Resume a forward from the residual stream at `start` (a `hook_resid_pre` or
    /// `hook_resid_post` point), given as `resid` `[batch*seq, d_model]`, e.g. an
    /// activation captured earlier. Only the blocks after `start` run, so patching a
    /// cached activation costs the suffix of the model, not all of it; the result is
    /// bit-identical to a full [`Model::forward`] whose activation at `start` is
    /// `resid`. Hooks at `start` itself run on `resid`; hooks before it are an error.
    /// `tokens` are still needed for their count and positions.
    pub fn forward_from(
        &self,
        start: HookPoint,
        resid: &[f32],
        tokens: &[u32],
        batch: usize,
        seq: usize,
        hooks: &mut Hooks,
    ) -> Result<ForwardOutput> {
        if !matches!(start.kind, HookKind::ResidPre | HookKind::ResidPost) {
            bail!("forward_from: {start} is not a residual-stream point (use hook_resid_pre or hook_resid_post)");
        }
        start.check(self.config.n_layers)?;
        if resid.len() != batch * seq * self.config.d_model {
            bail!(
                "forward_from: {} residual values given for {batch} x {seq} rows of width {}",
                resid.len(),
                self.config.d_model
            );
        }
        if let Some((hp, _)) = hooks.actions.iter().find(|(hp, _)| *hp < start) {
            bail!("forward_from {start}: hook {hp} lies before the starting point");
        }
        self.run(tokens, batch, seq, Some((start, resid)), hooks)
    }

    fn run(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        start: Option<(HookPoint, &[f32])>,
        hooks: &mut Hooks,
    ) -> Result<ForwardOutput> {
        let c = &self.config;
        if tokens.len() != batch * seq {
            bail!(
                "forward: {} tokens given for batch {batch} x seq {seq}",
                tokens.len()
            );
        }
        if batch == 0 || seq == 0 {
            bail!("forward: empty input (batch {batch} x seq {seq})");
        }
        if seq > c.max_seq {
            bail!(
                "forward: sequence length {seq} exceeds the model's maximum {}",
                c.max_seq
            );
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            bail!(
                "forward: token id {t} out of range (vocabulary size {})",
                c.vocab_size
            );
        }
        hooks.check(c.n_layers)?;
        let rows = batch * seq;
        let d = c.d_model;
        let mut captured = HashMap::new();
        let stop = if hooks.logits {
            None
        } else {
            match hooks
                .actions
                .iter()
                .map(|(hp, _)| (hp.layer, hp.kind))
                .max()
            {
                Some(s) => Some(s),
                None => {
                    return Ok(ForwardOutput {
                        captured,
                        logits: None,
                    })
                }
            }
        };
        let mut fresh;
        let mut guard = self.workspace.try_lock();
        let ws: &mut Workspace = match guard.as_deref_mut() {
            Ok(w) => w,
            Err(_) => {
                fresh = Workspace::default();
                &mut fresh
            }
        };
        ws.ensure(c, rows);

        // The first block to run; a resumed forward starts with its residual at `start`.
        let (mut x, first) = match start {
            None => {
                let mut x = vec![0f32; rows * d];
                let emb_scale = match c.arch {
                    Arch::Gemma2 => (d as f32).sqrt(),
                    Arch::Llama => 1.0,
                };
                for (row, &t) in x.chunks_exact_mut(d).zip(tokens) {
                    self.weights.embed.row_into(t as usize, row, emb_scale);
                }
                (x, 0)
            }
            Some((hp, resid)) => {
                let mut x = resid.to_vec();
                if hp.kind == HookKind::ResidPost {
                    // resid_post of L is resid_pre of L + 1: its hooks run here.
                    hooks.apply(hp, &mut x, rows, d, &mut captured);
                    if stop == Some((hp.layer, hp.kind)) {
                        return Ok(ForwardOutput {
                            captured,
                            logits: None,
                        });
                    }
                }
                (x, hp.layer + usize::from(hp.kind == HookKind::ResidPost))
            }
        };

        for l in first..c.n_layers {
            let layer = &self.weights.layers[l];
            let at = |k: HookKind| HookPoint::new(l, k);
            hooks.apply(at(HookKind::ResidPre), &mut x, rows, d, &mut captured);
            if stop == Some((l, HookKind::ResidPre)) {
                break;
            }
            let attn_hooked = hooks.any_at(l, HookKind::AttnOut);
            match c.arch {
                Arch::Llama => {
                    llama::attn_block(c, layer, &self.rope, &mut x, batch, seq, ws, attn_hooked)
                }
                Arch::Gemma2 => gemma2::attn_block(c, l, layer, &self.rope, &x, batch, seq, ws),
            }
            if attn_hooked || c.arch == Arch::Gemma2 {
                hooks.apply(
                    at(HookKind::AttnOut),
                    &mut ws.sub[..rows * d],
                    rows,
                    d,
                    &mut captured,
                );
                add_assign(&mut x, &ws.sub[..rows * d]);
            }
            if stop == Some((l, HookKind::AttnOut)) {
                break;
            }
            let mlp_hooked = hooks.any_at(l, HookKind::MlpOut);
            match c.arch {
                Arch::Llama => llama::mlp_block(c, layer, &mut x, rows, ws, mlp_hooked),
                Arch::Gemma2 => gemma2::mlp_block(c, layer, &x, rows, ws),
            }
            if mlp_hooked || c.arch == Arch::Gemma2 {
                hooks.apply(
                    at(HookKind::MlpOut),
                    &mut ws.sub[..rows * d],
                    rows,
                    d,
                    &mut captured,
                );
                add_assign(&mut x, &ws.sub[..rows * d]);
            }
            if stop == Some((l, HookKind::MlpOut)) {
                break;
            }
            hooks.apply(at(HookKind::ResidPost), &mut x, rows, d, &mut captured);
            if stop == Some((l, HookKind::ResidPost)) {
                break;
            }
        }

        let logits = if hooks.logits {
            let v = c.vocab_size;
            let h = &mut ws.h[..rows * d];
            ops::rmsnorm(&x, &self.weights.final_norm, c.rms_eps, h);
            let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
            let mut logits = vec![0f32; rows * v];
            ops::linear(h, rows, head, v, d, &mut logits);
            if let Some(cap) = c.final_softcap {
                for z in logits.iter_mut() {
                    *z = cap * (*z / cap).tanh();
                }
            }
            Some(logits)
        } else {
            None
        };
        Ok(ForwardOutput { captured, logits })
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Mean next-token cross-entropy (nats) of `logits` (`[batch*seq, vocab]`) against
/// `tokens` (`[batch, seq]`): position t predicts token t+1 within each row.
pub fn cross_entropy(
    logits: &[f32],
    tokens: &[u32],
    batch: usize,
    seq: usize,
    vocab: usize,
) -> f64 {
    let mut total = 0f64;
    let mut n = 0usize;
    for b in 0..batch {
        for t in 0..seq.saturating_sub(1) {
            let r = b * seq + t;
            let z = &logits[r * vocab..(r + 1) * vocab];
            let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            total += lse - z[tokens[r + 1] as usize] as f64;
            n += 1;
        }
    }
    if n == 0 {
        0.0
    } else {
        total / n as f64
    }
}

fn load_gguf(path: &Path) -> Result<(ModelConfig, Tokenizer, Weights)> {
    let g = gguf::GgufFile::open(path)?;
    let arch = g.get_str("general.architecture")?.to_string();
    let file = path.display().to_string();
    let key = |k: &str| format!("{arch}.{k}");
    let req = |k: &str| -> Result<usize> { Ok(g.get_u64(&key(k))? as usize) };
    let arch_enum = match arch.as_str() {
        "llama" => Arch::Llama,
        "gemma2" => Arch::Gemma2,
        other => bail!("{file}: unknown architecture {other:?} (supported: llama, gemma2)"),
    };
    let d = req("embedding_length")?;
    let n_heads = req("attention.head_count")?;
    let n_kv = g
        .get_u64(&key("attention.head_count_kv"))
        .map(|v| v as usize)
        .unwrap_or(n_heads);
    let head_dim = g
        .get_u64(&key("attention.key_length"))
        .map(|v| v as usize)
        .unwrap_or(d / n_heads.max(1));
    let n_layers = req("block_count")?;
    let vocab = match g.get_u64(&key("vocab_size")) {
        Ok(v) => v as usize,
        Err(_) => g
            .tensor_info("token_embd.weight")
            .map(|t| t.shape()[0])
            .context("missing token_embd.weight")?,
    };
    let name = g
        .get("general.name")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    let mut config = ModelConfig {
        name,
        arch: arch_enum,
        d_model: d,
        n_layers,
        vocab_size: vocab,
        n_heads,
        n_kv_heads: n_kv,
        head_dim,
        d_ff: req("feed_forward_length")?,
        rms_eps: g
            .get_f64(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-6) as f32,
        rope_theta: g.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
        max_seq: g
            .get_u64(&key("context_length"))
            .map(|v| v as usize)
            .unwrap_or(2048),
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        sliding_window: None,
        sliding_layers: vec![false; n_layers],
        tied_embeddings: !g.tensors.iter().any(|t| t.name == "output.weight"),
    };
    if arch_enum == Arch::Gemma2 {
        config.attn_softcap = g.get_f64(&key("attn_logit_softcapping")).map(|v| v as f32);
        config.final_softcap = g.get_f64(&key("final_logit_softcapping")).map(|v| v as f32);
        config.sliding_window = g
            .get_u64(&key("attention.sliding_window"))
            .ok()
            .map(|v| v as usize);
        // llama.cpp, like Hugging Face, slides on even layers.
        config.sliding_layers = (0..n_layers).map(|l| l.is_multiple_of(2)).collect();
        // GGUF does not store query_pre_attn_scalar; llama.cpp uses d/n_heads for the
        // 46-layer (27B) model and head_dim otherwise, matching the released configs.
        let q = if n_layers == 46 {
            d / n_heads
        } else {
            head_dim
        };
        config.attn_scale = 1.0 / (q as f32).sqrt();
    }
    check_config(&config, &file)?;
    let tokenizer = Tokenizer::from_gguf(&g)?;
    let src = Source::Gguf(g);
    let weights = match arch_enum {
        Arch::Llama => llama::load_gguf(&src, &config)?,
        Arch::Gemma2 => gemma2::load_gguf(&src, &config)?,
    };
    Ok((config, tokenizer, weights))
}

fn check_config(c: &ModelConfig, file: &str) -> Result<()> {
    let pos = [
        c.d_model,
        c.n_layers,
        c.vocab_size,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.d_ff,
    ];
    if pos.contains(&0) || !c.n_heads.is_multiple_of(c.n_kv_heads) || !c.head_dim.is_multiple_of(2)
    {
        bail!("{file}: inconsistent model configuration {c:?}");
    }
    Ok(())
}

fn load_safetensors_dir(dir: &Path) -> Result<(ModelConfig, Tokenizer, Weights)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let j: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    let file = cfg_path.display().to_string();
    let model_type = j["model_type"].as_str().unwrap_or_default();
    let arch_name = j["architectures"]
        .get(0)
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let arch = match (model_type, arch_name) {
        ("llama", _) | (_, "LlamaForCausalLM") => Arch::Llama,
        ("gemma2", _) | (_, "Gemma2ForCausalLM") => Arch::Gemma2,
        _ => bail!(
            "{file}: unknown architecture (model_type {model_type:?}, architectures {arch_name:?}); supported: llama, gemma2"
        ),
    };
    let u = |k: &str| -> Result<usize> {
        j[k].as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("{file}: missing integer field {k:?}"))
    };
    let f = |k: &str| j[k].as_f64();
    let d = u("hidden_size")?;
    let n_heads = u("num_attention_heads")?;
    let head_dim = u("head_dim").unwrap_or(d / n_heads.max(1));
    // transformers >= 5 keeps rope settings in `rope_parameters`, older versions in
    // `rope_theta` + `rope_scaling`; only plain (unscaled) RoPE is implemented.
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(rs) = j.get(key).filter(|v| !v.is_null()) {
            let ty = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            if ty != "default" {
                bail!("{file}: {key} type {ty:?} is not supported (only unscaled RoPE)");
            }
        }
    }
    let rope_theta = f("rope_theta")
        .or_else(|| j["rope_parameters"]["rope_theta"].as_f64())
        .unwrap_or(10000.0);
    let n_layers = u("num_hidden_layers")?;
    let act = j["hidden_activation"]
        .as_str()
        .or_else(|| j["hidden_act"].as_str());
    match (arch, act) {
        (Arch::Llama, None | Some("silu")) | (Arch::Gemma2, None | Some("gelu_pytorch_tanh")) => {}
        (_, Some(a)) => bail!("{file}: activation {a:?} is not supported for this architecture"),
    }
    let mut config = ModelConfig {
        name: dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        arch,
        d_model: d,
        n_layers,
        vocab_size: u("vocab_size")?,
        n_heads,
        n_kv_heads: u("num_key_value_heads").unwrap_or(n_heads),
        head_dim,
        d_ff: u("intermediate_size")?,
        rms_eps: f("rms_norm_eps").unwrap_or(1e-6) as f32,
        rope_theta,
        max_seq: u("max_position_embeddings").unwrap_or(2048),
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        sliding_window: None,
        sliding_layers: vec![false; n_layers],
        tied_embeddings: j["tie_word_embeddings"]
            .as_bool()
            .unwrap_or(arch == Arch::Gemma2),
    };
    if arch == Arch::Gemma2 {
        config.attn_softcap = f("attn_logit_softcapping").map(|v| v as f32);
        config.final_softcap = f("final_logit_softcapping").map(|v| v as f32);
        config.sliding_window = u("sliding_window").ok();
        config.sliding_layers = match j["layer_types"].as_array() {
            Some(types) if types.len() == n_layers => types
                .iter()
                .map(|t| t.as_str() == Some("sliding_attention"))
                .collect(),
            Some(types) => bail!(
                "{file}: layer_types has {} entries for {n_layers} layers",
                types.len()
            ),
            // Hugging Face Gemma-2 before `layer_types`: even layers slide.
            None => (0..n_layers).map(|l| l.is_multiple_of(2)).collect(),
        };
        let q = f("query_pre_attn_scalar").unwrap_or(head_dim as f64);
        config.attn_scale = (1.0 / q.sqrt()) as f32;
    }
    check_config(&config, &file)?;
    let id = |k: &str| j[k].as_u64().map(|v| v as u32);
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(
        &tok_path,
        id("bos_token_id"),
        id("eos_token_id"),
        id("pad_token_id"),
    )?;
    let src = Source::Safetensors(SafetensorsDir::open(dir)?);
    let weights = match arch {
        Arch::Llama => llama::load_hf(&src, &config)?,
        Arch::Gemma2 => gemma2::load_hf(&src, &config)?,
    };
    Ok((config, tokenizer, weights))
}
