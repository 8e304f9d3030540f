//! Gemma-2 blocks: RMSNorm with `(1 + w)`, norms before *and* after attention and MLP,
//! attention logit soft-capping, sliding-window attention on even layers, GeGLU (tanh GELU),
//! `query_pre_attn_scalar` attention scale, embeddings scaled by `sqrt(d_model)` and a final
//! logit soft-cap (the last three are applied in `Model::forward`/config).
//!
//! Norm weights: Hugging Face stores `w` and computes `x̂ * (1 + w)`; llama.cpp's converter
//! already stores `1 + w` in GGUF. Both are turned into the effective multiplier at load.

use crate::ops::{self, AttnParams, Mat, Rope};
use crate::weights::Source;
use crate::{Layer, ModelConfig, Weights, Workspace};
use anyhow::Result;

fn plus_one(mut w: Vec<f32>) -> Vec<f32> {
    for v in w.iter_mut() {
        *v += 1.0;
    }
    w
}

fn concat(parts: &[Vec<f32>]) -> Vec<f32> {
    parts.concat()
}

/// Load from GGUF tensor names (norms already hold `1 + w`).
pub(crate) fn load_gguf(src: &Source, c: &ModelConfig) -> Result<Weights> {
    let (d, hd, nh, nkv, ff) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.d_ff);
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let t = |n: &str, shape: &[usize]| src.tensor(&format!("blk.{l}.{n}.weight"), shape);
        layers.push(Layer {
            attn_norm: t("attn_norm", &[d])?,
            wqkv: concat(&[
                t("attn_q", &[nh * hd, d])?,
                t("attn_k", &[nkv * hd, d])?,
                t("attn_v", &[nkv * hd, d])?,
            ])
            .into(),
            wo: t("attn_output", &[d, nh * hd])?.into(),
            post_attn_norm: Some(t("post_attention_norm", &[d])?),
            ffn_norm: t("ffn_norm", &[d])?,
            w_gate_up: concat(&[t("ffn_gate", &[ff, d])?, t("ffn_up", &[ff, d])?]).into(),
            w_down: t("ffn_down", &[d, ff])?.into(),
            post_ffn_norm: Some(t("post_ffw_norm", &[d])?),
        });
    }
    Weights::from_gguf_layers(src, c, layers)
}

/// Load from Hugging Face tensor names; adds 1 to every norm weight.
pub(crate) fn load_hf(src: &Source, c: &ModelConfig) -> Result<Weights> {
    let (d, hd, nh, nkv, ff) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.d_ff);
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let t =
            |n: &str, shape: &[usize]| src.tensor(&format!("model.layers.{l}.{n}.weight"), shape);
        layers.push(Layer {
            attn_norm: plus_one(t("input_layernorm", &[d])?),
            wqkv: concat(&[
                t("self_attn.q_proj", &[nh * hd, d])?,
                t("self_attn.k_proj", &[nkv * hd, d])?,
                t("self_attn.v_proj", &[nkv * hd, d])?,
            ])
            .into(),
            wo: t("self_attn.o_proj", &[d, nh * hd])?.into(),
            post_attn_norm: Some(plus_one(t("post_attention_layernorm", &[d])?)),
            ffn_norm: plus_one(t("pre_feedforward_layernorm", &[d])?),
            w_gate_up: concat(&[t("mlp.gate_proj", &[ff, d])?, t("mlp.up_proj", &[ff, d])?]).into(),
            w_down: t("mlp.down_proj", &[d, ff])?.into(),
            post_ffn_norm: Some(plus_one(t("post_feedforward_layernorm", &[d])?)),
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
        final_norm: plus_one(src.tensor("model.norm.weight", &[d])?),
        lm_head,
    })
}

/// Attention sub-block of layer `l`; writes what is added to the residual into `ws.sub`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attn_block(
    c: &ModelConfig,
    l: usize,
    layer: &Layer,
    rope: &Rope,
    x: &[f32],
    batch: usize,
    seq: usize,
    ws: &mut Workspace,
) {
    let rows = batch * seq;
    let (d, hd, nh, nkv) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads);
    let wq = (nh + 2 * nkv) * hd;
    let h = &mut ws.h[..rows * d];
    ops::rmsnorm(x, &layer.attn_norm, c.rms_eps, h);
    let qkv = &mut ws.qkv[..rows * wq];
    ops::linear(h, rows, &layer.wqkv, wq, d, qkv);
    ops::rope_qkv(qkv, seq, nh, nkv, hd, rope);
    let window = if c.sliding_layers[l] {
        c.sliding_window
    } else {
        None
    };
    let p = AttnParams {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: c.attn_scale,
        softcap: c.attn_softcap,
        window,
    };
    let attn = &mut ws.attn[..rows * nh * hd];
    ops::attention(qkv, batch, seq, &p, &mut ws.scratch, attn);
    let o = &mut ws.h[..rows * d];
    ops::linear(attn, rows, &layer.wo, d, nh * hd, o);
    let post = layer
        .post_attn_norm
        .as_deref()
        .expect("gemma2 layer has a post-attention norm");
    ops::rmsnorm(o, post, c.rms_eps, &mut ws.sub[..rows * d]);
}

/// GeGLU MLP sub-block with pre and post norms; writes its output into `ws.sub`.
pub(crate) fn mlp_block(
    c: &ModelConfig,
    layer: &Layer,
    x: &[f32],
    rows: usize,
    ws: &mut Workspace,
) {
    let (d, ff) = (c.d_model, c.d_ff);
    let h = &mut ws.h[..rows * d];
    ops::rmsnorm(x, &layer.ffn_norm, c.rms_eps, h);
    let gu = &mut ws.gu[..rows * 2 * ff];
    ops::linear(h, rows, &layer.w_gate_up, 2 * ff, d, gu);
    let act = &mut ws.act[..rows * ff];
    ops::gated_act(gu, ff, act, ops::GatedAct::GeluTanh);
    let o = &mut ws.h[..rows * d];
    ops::linear(act, rows, &layer.w_down, d, ff, o);
    let post = layer
        .post_ffn_norm
        .as_deref()
        .expect("gemma2 layer has a post-FFN norm");
    ops::rmsnorm(o, post, c.rms_eps, &mut ws.sub[..rows * d]);
}
