//! Tiny random-weight Llama and Gemma-2 models written by the test itself (config.json +
//! model.safetensors + tokenizer.json, and the same weights as GGUF), exercising loading,
//! hooks, early stopping and the bad-input errors without the real model.

use saelab_lm::gguf::{write::gguf_bytes, Value};
use saelab_lm::{HookKind, HookPoint, Hooks, Model};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const D: usize = 32;
const N_LAYERS: usize = 3;
const N_HEADS: usize = 4;
const N_KV: usize = 2;
const HD: usize = 8;
const FF: usize = 48;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("saelab-lm-tiny-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// GPT-2's byte -> printable-char map (the ByteLevel alphabet).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// Vocabulary: `<s>`, `</s>`, the 256 byte symbols, then merged tokens.
fn vocab_and_merges() -> (Vec<String>, Vec<(String, String)>) {
    let mut tokens = vec!["<s>".to_string(), "</s>".to_string()];
    tokens.extend(byte_chars().into_iter().map(|c| c.to_string()));
    let merges: Vec<(String, String)> =
        [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    for (a, b) in &merges {
        tokens.push(format!("{a}{b}"));
    }
    (tokens, merges)
}

fn tokenizer_json() -> serde_json::Value {
    let (tokens, merges) = vocab_and_merges();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let special = |id: usize, s: &str| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()}
    })
}

fn vocab_size() -> usize {
    vocab_and_merges().0.len()
}

/// Random weights in Hugging Face naming.
fn hf_weights(gemma: bool, seed: u64) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut rng = saelab_core::rng::Rng::new(seed);
    let mut w = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * rng.normal()).collect();
        w.insert(name, (shape, v));
    };
    let v = vocab_size();
    put("model.embed_tokens.weight".into(), vec![v, D], 1.0, 0.0);
    put(
        "model.norm.weight".into(),
        vec![D],
        0.1,
        if gemma { 0.0 } else { 1.0 },
    );
    for l in 0..N_LAYERS {
        let p = format!("model.layers.{l}");
        let ns = 0.1;
        let no = if gemma { 0.0 } else { 1.0 };
        put(format!("{p}.input_layernorm.weight"), vec![D], ns, no);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![D],
            ns,
            no,
        );
        if gemma {
            put(
                format!("{p}.pre_feedforward_layernorm.weight"),
                vec![D],
                ns,
                no,
            );
            put(
                format!("{p}.post_feedforward_layernorm.weight"),
                vec![D],
                ns,
                no,
            );
        }
        let s = 1.0 / (D as f32).sqrt();
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![N_HEADS * HD, D],
            s,
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![N_KV * HD, D],
            s,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![N_KV * HD, D],
            s,
            0.0,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![D, N_HEADS * HD],
            s,
            0.0,
        );
        put(format!("{p}.mlp.gate_proj.weight"), vec![FF, D], s, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), vec![FF, D], s, 0.0);
        put(
            format!("{p}.mlp.down_proj.weight"),
            vec![D, FF],
            1.0 / (FF as f32).sqrt(),
            0.0,
        );
    }
    w
}

fn config_json(gemma: bool) -> serde_json::Value {
    let mut c = json!({
        "model_type": if gemma { "gemma2" } else { "llama" },
        "architectures": [if gemma { "Gemma2ForCausalLM" } else { "LlamaForCausalLM" }],
        "hidden_size": D, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV, "head_dim": HD, "intermediate_size": FF, "vocab_size": vocab_size(),
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "max_position_embeddings": 64,
        "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": 1,
    });
    if gemma {
        let o = c.as_object_mut().unwrap();
        o.insert("attn_logit_softcapping".into(), json!(5.0));
        o.insert("final_logit_softcapping".into(), json!(3.0));
        o.insert("sliding_window".into(), json!(4));
        o.insert("query_pre_attn_scalar".into(), json!(16));
        o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    } else {
        c.as_object_mut()
            .unwrap()
            .insert("hidden_act".into(), json!("silu"));
    }
    c
}

fn write_safetensors(path: &Path, w: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .iter()
        .map(|(k, (s, v))| {
            (
                k.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn write_hf_dir(name: &str, gemma: bool) -> PathBuf {
    let dir = tmpdir(name);
    write_safetensors(&dir.join("model.safetensors"), &hf_weights(gemma, 11));
    std::fs::write(dir.join("config.json"), config_json(gemma).to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    dir
}

/// llama.cpp's Q/K row permutation (HF half-split -> adjacent rotary pairs).
fn permute(w: &[f32], n_heads: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..HD / 2 {
                let src = (h * HD + j * HD / 2 + i) * D;
                let dst = (h * HD + 2 * i + j) * D;
                out[dst..dst + D].copy_from_slice(&w[src..src + D]);
            }
        }
    }
    out
}

/// The same weights as a GGUF file, converted the way llama.cpp's converter does.
fn write_gguf(path: &Path, gemma: bool, arch_name: &str) {
    let hf = hf_weights(gemma, 11);
    let (tokens, merges) = vocab_and_merges();
    let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    for (name, (shape, data)) in &hf {
        let mut data = data.clone();
        let mut g = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("model.layers.", "blk.")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
            .replace("input_layernorm", "attn_norm");
        if gemma {
            g = g
                .replace("post_attention_layernorm", "post_attention_norm")
                .replace("pre_feedforward_layernorm", "ffn_norm")
                .replace("post_feedforward_layernorm", "post_ffw_norm");
            if name.ends_with("norm.weight") {
                data.iter_mut().for_each(|v| *v += 1.0);
            }
        } else {
            g = g.replace("post_attention_layernorm", "ffn_norm");
            if name.ends_with("q_proj.weight") {
                data = permute(&data, N_HEADS);
            } else if name.ends_with("k_proj.weight") {
                data = permute(&data, N_KV);
            }
        }
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        tensors.push((
            g,
            dims,
            0,
            data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let a = arch_name;
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(a.into())),
        ("general.name".into(), Value::Str("tiny".into())),
        (format!("{a}.embedding_length"), Value::U32(D as u32)),
        (format!("{a}.block_count"), Value::U32(N_LAYERS as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(FF as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(N_HEADS as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(N_KV as u32),
        ),
        (format!("{a}.attention.key_length"), Value::U32(HD as u32)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(10000.0)),
        (format!("{a}.context_length"), Value::U32(64)),
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::Str("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::Str(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                merges
                    .iter()
                    .map(|(x, y)| Value::Str(format!("{x} {y}")))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                (0..tokens.len())
                    .map(|i| Value::I32(if i < 2 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
    ];
    if gemma {
        meta.push((format!("{a}.attn_logit_softcapping"), Value::F32(5.0)));
        meta.push((format!("{a}.final_logit_softcapping"), Value::F32(3.0)));
        meta.push((format!("{a}.attention.sliding_window"), Value::U32(4)));
    }
    let meta_refs: Vec<(&str, Value)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let t_refs: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, t, b)| (n.as_str(), d.clone(), *t, b.clone()))
        .collect();
    std::fs::write(path, gguf_bytes(&meta_refs, &t_refs)).unwrap();
}

fn tokens(m: &Model, batch: usize, seq: usize) -> Vec<u32> {
    let text = "the cat sat on the mat, then the cat ate 42 treats and the dog watched the cat";
    let ids = m.tokenizer().encode(text).unwrap();
    assert!(ids.len() >= batch * seq);
    ids[..batch * seq].to_vec()
}

fn check_hooks(m: &Model) {
    let (batch, seq) = (2, 7);
    let toks = tokens(m, batch, seq);
    let v = m.config().vocab_size;
    let base = m
        .forward(&toks, batch, seq, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(base.len(), batch * seq * v);
    assert!(base.iter().all(|x| x.is_finite()));
    for kind in HookKind::ALL {
        let hp = HookPoint::new(1, kind);
        let full = m
            .forward(&toks, batch, seq, &mut Hooks::new().capture(hp))
            .unwrap();
        // Capturing does not change logits; early stop gives the same activation.
        assert_eq!(full.logits.as_ref().unwrap(), &base, "{hp}");
        let early = m
            .forward(
                &toks,
                batch,
                seq,
                &mut Hooks::new().capture(hp).logits(false),
            )
            .unwrap();
        assert!(early.logits.is_none());
        assert_eq!(early.captured[&hp], full.captured[&hp], "{hp}");
        assert_eq!(full.captured[&hp].len(), batch * seq * m.config().d_model);
        assert!(full.captured[&hp].iter().any(|&x| x != 0.0));
        // Identity replace leaves logits bit-identical; zero ablation changes them.
        let mut calls = 0;
        let same = m
            .forward(
                &toks,
                batch,
                seq,
                &mut Hooks::new().replace(hp, |a, rows, d| {
                    assert_eq!(a.len(), rows * d);
                    calls += 1
                }),
            )
            .unwrap();
        assert_eq!(same.logits.unwrap(), base, "{hp}");
        assert_eq!(calls, 1);
        let zeroed = m
            .forward(&toks, batch, seq, &mut Hooks::new().zero(hp))
            .unwrap()
            .logits
            .unwrap();
        let diff: f32 = zeroed.iter().zip(&base).map(|(a, b)| (a - b).abs()).sum();
        assert!(diff > 1e-3, "zero ablation at {hp} changed nothing");
    }
    // resid_post of layer L is resid_pre of layer L + 1.
    let (a, b) = (
        HookPoint::new(0, HookKind::ResidPost),
        HookPoint::new(1, HookKind::ResidPre),
    );
    let out = m
        .forward(
            &toks,
            batch,
            seq,
            &mut Hooks::new().capture(a).capture(b).logits(false),
        )
        .unwrap();
    assert_eq!(out.captured[&a], out.captured[&b]);
    // A replacement at resid_pre propagates: scaling the stream by 2 changes layer 2.
    let c = HookPoint::new(2, HookKind::ResidPre);
    let r0 = m
        .forward(
            &toks,
            batch,
            seq,
            &mut Hooks::new().capture(c).logits(false),
        )
        .unwrap();
    let r1 = m
        .forward(
            &toks,
            batch,
            seq,
            &mut Hooks::new()
                .replace(b, |a, _, _| a.iter_mut().for_each(|x| *x *= 2.0))
                .capture(c)
                .logits(false),
        )
        .unwrap();
    assert_ne!(r0.captured[&c], r1.captured[&c]);
    // Resuming from a captured residual equals the full forward, with and without an
    // edit at the starting point, from resid_pre and resid_post points alike.
    let n_layers = m.config().n_layers;
    for start in [
        HookPoint::new(0, HookKind::ResidPre),
        HookPoint::new(1, HookKind::ResidPre),
        HookPoint::new(1, HookKind::ResidPost),
        HookPoint::new(n_layers - 1, HookKind::ResidPost),
    ] {
        let resid = m
            .forward(
                &toks,
                batch,
                seq,
                &mut Hooks::new().capture(start).logits(false),
            )
            .unwrap()
            .captured
            .remove(&start)
            .unwrap();
        let resumed = m
            .forward_from(start, &resid, &toks, batch, seq, &mut Hooks::new())
            .unwrap();
        assert_eq!(resumed.logits.unwrap(), base, "{start}");
        let halve = |a: &mut [f32], _: usize, _: usize| a.iter_mut().for_each(|x| *x *= 0.5);
        let full = m
            .forward(&toks, batch, seq, &mut Hooks::new().replace(start, halve))
            .unwrap();
        let resumed = m
            .forward_from(
                start,
                &resid,
                &toks,
                batch,
                seq,
                &mut Hooks::new().replace(start, halve),
            )
            .unwrap();
        assert_eq!(resumed.logits, full.logits, "{start}");
        assert_ne!(full.logits.unwrap(), base, "{start}");
    }
    // Bad resumes are errors: a non-residual point, a hook before the start, wrong size.
    let resid = vec![0.5f32; batch * seq * m.config().d_model];
    let e = |r: anyhow::Result<saelab_lm::ForwardOutput>| r.err().unwrap().to_string();
    let attn = HookPoint::new(1, HookKind::AttnOut);
    assert!(
        e(m.forward_from(attn, &resid, &toks, batch, seq, &mut Hooks::new()))
            .contains("not a residual-stream point")
    );
    let early = HookPoint::new(0, HookKind::MlpOut);
    assert!(e(m.forward_from(
        HookPoint::new(1, HookKind::ResidPre),
        &resid,
        &toks,
        batch,
        seq,
        &mut Hooks::new().capture(early)
    ))
    .contains("before the starting point"));
    assert!(e(m.forward_from(
        HookPoint::new(1, HookKind::ResidPre),
        &resid[1..],
        &toks,
        batch,
        seq,
        &mut Hooks::new()
    ))
    .contains("residual values"));
    // Causality: changing the last token of a row leaves earlier positions unchanged.
    let mut toks2 = toks.clone();
    toks2[seq - 1] = if toks2[seq - 1] == 5 { 6 } else { 5 };
    let l2 = m
        .forward(&toks2, batch, seq, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(&l2[..(seq - 1) * v], &base[..(seq - 1) * v]);
    assert_ne!(&l2[(seq - 1) * v..seq * v], &base[(seq - 1) * v..seq * v]);
    assert_eq!(&l2[seq * v..], &base[seq * v..]);
}

/// The logit effect of a direction equals the logits of resuming at the last
/// `hook_resid_post` from a residual of RMS 1 (scaled so that mean(x²) + eps = 1, so the
/// final norm divides by exactly 1), with the final soft-cap applied where the model has one.
fn check_logit_effect(m: &Model) {
    let c = m.config();
    let (d, seq) = (c.d_model, 6);
    let toks = tokens(m, 1, seq);
    let mut x: Vec<f32> = (0..seq * d)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    for row in x.chunks_exact_mut(d) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let s = ((1.0 - c.rms_eps) / ms).sqrt();
        row.iter_mut().for_each(|v| *v *= s);
    }
    let last = HookPoint::new(c.n_layers - 1, HookKind::ResidPost);
    let logits = m
        .forward_from(last, &x, &toks, 1, seq, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let mut effect = m.logit_effect(&x, seq);
    if let Some(cap) = c.final_softcap {
        effect.iter_mut().for_each(|z| *z = cap * (*z / cap).tanh());
    }
    assert_close(&effect, &logits, 1e-4);
    assert!(effect.iter().any(|&z| z.abs() > 0.1), "a nontrivial check");
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn tiny_llama_safetensors_hooks_and_gguf_equivalence() {
    let dir = write_hf_dir("llama", false);
    let m = Model::load(&dir).unwrap();
    assert_eq!(m.config().arch, saelab_lm::Arch::Llama);
    check_hooks(&m);
    check_logit_effect(&m);
    // The same weights through GGUF (permuted Q/K, tokenizer from metadata) agree.
    let gpath = dir.join("tiny.gguf");
    write_gguf(&gpath, false, "llama");
    let g = Model::load(&gpath).unwrap();
    let text = "the cat sat on the mat 1234 \u{e9}t\u{e9} \u{1F600}";
    assert_eq!(
        g.tokenizer().encode(text).unwrap(),
        m.tokenizer().encode(text).unwrap()
    );
    assert_eq!(
        g.tokenizer().decode(&m.tokenizer().encode(text).unwrap()),
        text
    );
    let toks = tokens(&m, 1, 12);
    let a = m
        .forward(&toks, 1, 12, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let b = g
        .forward(&toks, 1, 12, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    assert_close(&a, &b, 1e-5);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tiny_gemma2_safetensors_hooks_and_gguf_equivalence() {
    let dir = write_hf_dir("gemma2", true);
    let m = Model::load(&dir).unwrap();
    let c = m.config();
    assert_eq!(c.arch, saelab_lm::Arch::Gemma2);
    assert_eq!(
        (c.attn_softcap, c.final_softcap, c.sliding_window),
        (Some(5.0), Some(3.0), Some(4))
    );
    assert!((c.attn_scale - 0.25).abs() < 1e-7);
    assert_eq!(c.sliding_layers, vec![true, false, true]);
    assert_eq!(c.rope_theta, 10000.0);
    check_hooks(&m);
    check_logit_effect(&m);
    // Final soft-cap bounds the logits.
    let toks = tokens(&m, 1, 12);
    let a = m
        .forward(&toks, 1, 12, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    assert!(a.iter().all(|x| x.abs() <= 3.0));
    let gpath = dir.join("tiny.gguf");
    write_gguf(&gpath, true, "gemma2");
    let g = Model::load(&gpath).unwrap();
    // GGUF has no query_pre_attn_scalar: llama.cpp's rule (head_dim) gives 1/sqrt(8); match it.
    assert!((g.config().attn_scale - 1.0 / (HD as f32).sqrt()).abs() < 1e-7);
    let mut cfg = config_json(true);
    cfg["query_pre_attn_scalar"] = json!(HD);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let m2 = Model::load(&dir).unwrap();
    let a2 = m2
        .forward(&toks, 1, 12, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let b = g
        .forward(&toks, 1, 12, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    assert_close(&a2, &b, 1e-5);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn load_err(path: &Path) -> String {
    format!("{:#}", Model::load(path).err().expect("load must fail"))
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = write_hf_dir("bad", false);
    // Unknown architecture in config.json.
    let mut cfg = config_json(false);
    cfg["model_type"] = json!("mamba");
    cfg["architectures"] = json!(["MambaForCausalLM"]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("unknown architecture"),
        "{e}"
    );
    std::fs::write(dir.join("config.json"), config_json(false).to_string()).unwrap();
    // Truncated safetensors.
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt or truncated"),
        "{e}"
    );
    // Garbage header.
    std::fs::write(&st, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    // A missing tensor.
    let mut w = hf_weights(false, 11);
    w.remove("model.layers.1.mlp.up_proj.weight");
    write_safetensors(&st, &w);
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("not found"),
        "{e}"
    );
    // A tensor of the wrong shape.
    let mut w = hf_weights(false, 11);
    w.insert("model.norm.weight".into(), (vec![D + 1], vec![1.0; D + 1]));
    write_safetensors(&st, &w);
    let e = load_err(&dir);
    assert!(
        e.contains("model.norm.weight") && e.contains("shape"),
        "{e}"
    );

    // GGUF: truncated, unknown architecture.
    let g = dir.join("m.gguf");
    write_gguf(&g, false, "llama");
    let bytes = std::fs::read(&g).unwrap();
    let t = dir.join("trunc.gguf");
    std::fs::write(&t, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&t);
    assert!(e.contains("trunc.gguf") && e.contains("truncated"), "{e}");
    let u = dir.join("rwkv.gguf");
    write_gguf(&u, false, "rwkv6");
    let e = load_err(&u);
    assert!(
        e.contains("rwkv.gguf") && e.contains("unknown architecture") && e.contains("rwkv6"),
        "{e}"
    );
    let e = load_err(&dir.join("missing.gguf"));
    assert!(e.contains("missing.gguf"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bf16_weights_halve_memory_and_stay_close() {
    use saelab_lm::{LoadOptions, WeightDtype};
    for gemma in [false, true] {
        let dir = write_hf_dir(if gemma { "bf16g" } else { "bf16l" }, gemma);
        let f = Model::load(&dir).unwrap();
        let toks = tokens(&f, 2, 7);
        let hp = HookPoint::new(2, HookKind::ResidPost);
        let a = f
            .forward(&toks, 2, 7, &mut Hooks::new().capture(hp))
            .unwrap();
        let rel = |x: &[f32], y: &[f32]| {
            let num: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
            let den: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
            (num / den).sqrt()
        };
        // Bf16Compute also rounds each projection's input: on AMX tiles where the CPU
        // has them, else the f32 fallback.
        for dtype in [WeightDtype::Bf16, WeightDtype::Bf16Compute] {
            let b = Model::load_with(&dir, &LoadOptions { weights: dtype }).unwrap();
            let ratio = b.weight_bytes() as f64 / f.weight_bytes() as f64;
            // Packed tiles pad rows and columns to whole tiles.
            assert!(
                (0.5..0.7).contains(&ratio),
                "{dtype:?}/f32 weight bytes {ratio}"
            );
            let c = b
                .forward(&toks, 2, 7, &mut Hooks::new().capture(hp))
                .unwrap();
            // bf16 keeps 8 significant bits (relative rounding <= 2^-9 per value).
            let e1 = rel(&c.captured[&hp], &a.captured[&hp]);
            let e2 = rel(c.logits.as_ref().unwrap(), a.logits.as_ref().unwrap());
            assert!(
                e1 > 0.0 && e1 < 3e-2 && e2 < 3e-2,
                "{dtype:?} relative errors {e1} {e2}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
