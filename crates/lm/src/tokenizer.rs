//! Tokenizers: built from GGUF metadata (byte-level BPE, `tokenizer.ggml.model = "gpt2"`)
//! or loaded from a `tokenizer.json`.
//!
//! The GGUF path writes the equivalent `tokenizer.json` document (BPE model from the
//! vocabulary and merges, the model's pre-tokenizer, ByteLevel decoder, control tokens as
//! special added tokens) and hands it to the `tokenizers` crate, so both paths run the same
//! well-tested encoder. `encode` never adds BOS: callers prepend it explicitly.

use crate::gguf::{GgufFile, Value};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::path::Path;

/// A text tokenizer with the model's special token ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    special: Vec<u32>,
}

/// Pre-tokenizer JSON for a llama.cpp `tokenizer.ggml.pre` value. Only pre-tokenizers whose
/// Hugging Face definition we know exactly are accepted: a wrong one would silently change ids.
fn pre_tokenizer_for(pre: &str) -> Option<serde_json::Value> {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    match pre {
        // SmolLM / StarCoder family: single digits, then GPT-2 byte-level regex.
        "smollm" | "starcoder" | "refact" => Some(json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level
            ]
        })),
        "gpt2" | "default" => Some(byte_level),
        _ => None,
    }
}

impl Tokenizer {
    /// Build from GGUF `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let file = g.path.display();
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            bail!("{file}: tokenizer model {model:?} is not supported (supported: \"gpt2\" byte-level BPE)");
        }
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let pre_json = pre_tokenizer_for(pre).ok_or_else(|| {
            anyhow!("{file}: pre-tokenizer tokenizer.ggml.pre = {pre:?} is not supported (supported: smollm, starcoder, refact, gpt2, default)")
        })?;
        let strings = |key: &str| -> Result<Vec<String>> {
            let arr = g
                .get(key)
                .and_then(|v| v.as_array())
                .with_context(|| format!("{file}: missing array metadata {key}"))?;
            arr.iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{file}: {key} must be an array of strings"))
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!(
                "{file}: token_type has {} entries but tokens has {}",
                types.len(),
                tokens.len()
            );
        }
        let mut vocab = serde_json::Map::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
        }
        let mut merge_list = Vec::with_capacity(merges.len());
        for m in &merges {
            let (a, b) = m.split_once(' ').with_context(|| {
                format!("{file}: malformed merge {m:?} (expected \"left right\")")
            })?;
            merge_list.push(json!([a, b]));
        }
        // Token types: 3 = control (special), 4 = user-defined (matched in text, not special).
        let mut added = Vec::new();
        for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            if ty == 3 || ty == 4 {
                added.push(json!({
                    "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": ty == 4, "special": ty == 3
                }));
            }
        }
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_json,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merge_list
            }
        });
        let inner: tokenizers::Tokenizer = doc
            .to_string()
            .parse()
            .map_err(|e| anyhow!("{file}: cannot build tokenizer from GGUF metadata: {e}"))?;
        let id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let special = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3)
            .map(|(i, _)| i as u32)
            .collect();
        Ok(Tokenizer {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            pad: id("tokenizer.ggml.padding_token_id"),
            special,
        })
    }

    /// Load a `tokenizer.json`; special ids come from the model's config.json values.
    pub fn from_file(
        path: &Path,
        bos: Option<u32>,
        eos: Option<u32>,
        pad: Option<u32>,
    ) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let mut special: Vec<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&i, _)| i)
            .collect();
        special.sort_unstable();
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            pad,
            special,
        })
    }

    /// Token ids of `text`. Never adds BOS or any other special token; special-token text
    /// present in `text` (e.g. `<|im_start|>`) is matched as that token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer: cannot encode text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of a token sequence (special tokens included as their text).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Ids of the special (control) tokens, ascending.
    pub fn special_ids(&self) -> Vec<u32> {
        self.special.clone()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The decoded text of one token, e.g. `" cat"`.
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id])
    }

    /// The raw vocabulary string of a token (byte-level encoded, e.g. `"Ġcat"`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
