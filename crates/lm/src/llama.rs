//! Llama-family blocks (SmolLM2, Llama 2/3 without rope scaling): pre-RMSNorm, rotary
//! GQA attention, SwiGLU MLP, optionally tied embeddings.
//!
//! GGUF note: llama.cpp's converter permutes the rows of `attn_q`/`attn_k` within each head
//! so that rotary pairs are adjacent (`(x[2i], x[2i+1])`). We undo that permutation at load,
//! so one half-split rotary kernel serves GGUF and Hugging Face weights alike and captured
//! activations equal the reference's.

use crate::ops::{self, AttnParams, Mat, Rope};
use crate::weights::Source;
use crate::{Layer, ModelConfig, Weights, Workspace};
use anyhow::Result;

/// Undo llama.cpp's `permute`: GGUF row `h*hd + 2i + j` holds HF row `h*hd + j*hd/2 + i`.
pub fn unpermute_rows(w: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + 2 * i + j) * cols;
                let dst = (h * head_dim + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn concat(parts: &[Vec<f32>]) -> Vec<f32> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// Load from GGUF tensor names (`blk.N.attn_q.weight`, ...).
pub(crate) fn load_gguf(src: &Source, c: &ModelConfig) -> Result<Weights> {
    let (d, hd, nh, nkv, ff) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.d_ff);
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let t = |n: &str, shape: &[usize]| src.tensor(&format!("blk.{l}.{n}.weight"), shape);
        let q = unpermute_rows(&t("attn_q", &[nh * hd, d])?, nh, hd, d);
        let k = unpermute_rows(&t("attn_k", &[nkv * hd, d])?, nkv, hd, d);
        let v = t("attn_v", &[nkv * hd, d])?;
        layers.push(Layer {
            attn_norm: t("attn_norm", &[d])?,
            wqkv: concat(&[q, k, v]).into(),
            wo: t("attn_output", &[d, nh * hd])?.into(),
            post_attn_norm: None,
            ffn_norm: t("ffn_norm", &[d])?,
            w_gate_up: concat(&[t("ffn_gate", &[ff, d])?, t("ffn_up", &[ff, d])?]).into(),
            w_down: t("ffn_down", &[d, ff])?.into(),
            post_ffn_norm: None,
        });
    }
    Weights::from_gguf_layers(src, c, layers)
}

/// Load from Hugging Face tensor names (`model.layers.N.self_attn.q_proj.weight`, ...).
pub(crate) fn load_hf(src: &Source, c: &ModelConfig) -> Result<Weights> {
    let (d, hd, nh, nkv, ff) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.d_ff);
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let t =
            |n: &str, shape: &[usize]| src.tensor(&format!("model.layers.{l}.{n}.weight"), shape);
        layers.push(Layer {
            attn_norm: t("input_layernorm", &[d])?,
            wqkv: concat(&[
                t("self_attn.q_proj", &[nh * hd, d])?,
                t("self_attn.k_proj", &[nkv * hd, d])?,
                t("self_attn.v_proj", &[nkv * hd, d])?,
            ])
            .into(),
            wo: t("self_attn.o_proj", &[d, nh * hd])?.into(),
            post_attn_norm: None,
            ffn_norm: t("post_attention_layernorm", &[d])?,
            w_gate_up: concat(&[t("mlp.gate_proj", &[ff, d])?, t("mlp.up_proj", &[ff, d])?]).into(),
            w_down: t("mlp.down_proj", &[d, ff])?.into(),
            post_ffn_norm: None,
        });
    }
    let embed: Mat = src
        .tensor("model.embed_tokens.weight", &[c.vocab_size, d])?
        .into();
    let lm_head = if !c.tied_embeddings && src.has("lm_head.weight") {
        Some(src.tensor("lm_head.weight", &[c.vocab_size, d])?.into())
    } else {
        None
    };
    Ok(Weights {
        embed,
        layers,
        final_norm: src.tensor("model.norm.weight", &[d])?,
        lm_head,
    })
}

/// Attention sub-block. With `keep_out` the output goes to `ws.sub` (for hooks, the caller
/// adds it to `x`); otherwise o_proj accumulates straight into the residual `x`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attn_block(
    c: &ModelConfig,
    layer: &Layer,
    rope: &Rope,
    x: &mut [f32],
    batch: usize,
    seq: usize,
    ws: &mut Workspace,
    keep_out: bool,
) {
    let rows = batch * seq;
    let (d, hd, nh, nkv) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads);
    let wq = (nh + 2 * nkv) * hd;
    let h = &mut ws.h[..rows * d];
    ops::rmsnorm(x, &layer.attn_norm, c.rms_eps, h);
    let qkv = &mut ws.qkv[..rows * wq];
    ops::linear(h, rows, &layer.wqkv, wq, d, qkv);
    ops::rope_qkv(qkv, seq, nh, nkv, hd, rope);
    let p = AttnParams {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: c.attn_scale,
        softcap: None,
        window: None,
    };
    let attn = &mut ws.attn[..rows * nh * hd];
    ops::attention(qkv, batch, seq, &p, &mut ws.scratch, attn);
    if keep_out {
        ops::linear(attn, rows, &layer.wo, d, nh * hd, &mut ws.sub[..rows * d]);
    } else {
        ops::linear_acc(attn, rows, &layer.wo, d, nh * hd, x);
    }
}

/// SwiGLU MLP sub-block; output handling as in [`attn_block`].
pub(crate) fn mlp_block(
    c: &ModelConfig,
    layer: &Layer,
    x: &mut [f32],
    rows: usize,
    ws: &mut Workspace,
    keep_out: bool,
) {
    let (d, ff) = (c.d_model, c.d_ff);
    let h = &mut ws.h[..rows * d];
    ops::rmsnorm(x, &layer.ffn_norm, c.rms_eps, h);
    let gu = &mut ws.gu[..rows * 2 * ff];
    ops::linear(h, rows, &layer.w_gate_up, 2 * ff, d, gu);
    let act = &mut ws.act[..rows * ff];
    ops::gated_act(gu, ff, act, ops::GatedAct::Silu);
    if keep_out {
        ops::linear(act, rows, &layer.w_down, d, ff, &mut ws.sub[..rows * d]);
    } else {
        ops::linear_acc(act, rows, &layer.w_down, d, ff, x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(w.shape)
        let (nh, hd, cols) = (3, 8, 2);
        let hf: Vec<f32> = (0..nh * hd * cols).map(|i| i as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..nh {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    for c in 0..cols {
                        let src = ((h * 2 + j) * (hd / 2) + i) * cols + c;
                        let dst = ((h * (hd / 2) + i) * 2 + j) * cols + c;
                        gguf[dst] = hf[src];
                    }
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, nh, hd, cols), hf);
    }
}
