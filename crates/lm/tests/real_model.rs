//! Tests on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF), fetched into the
//! asset cache by `saelab_core::assets::ensure_model` on first use. One model load is shared
//! by every test in this file.

use saelab_lm::{cross_entropy, HookKind, HookPoint, Hooks, Model};
use std::sync::OnceLock;

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let path = saelab_core::assets::ensure_model().expect("fetch the default model");
        Model::load(&path).expect("load the default model")
    })
}

#[test]
fn config_matches_smollm2_metadata() {
    let c = model().config();
    assert_eq!(
        (
            c.d_model,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.d_ff,
            c.vocab_size
        ),
        (576, 30, 9, 3, 64, 1536, 49152)
    );
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.tied_embeddings);
    let t = model().tokenizer();
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(1), Some(2), Some(2))
    );
    assert_eq!(t.vocab_size(), 49152);
    assert!(t.special_ids().contains(&1) && t.special_ids().contains(&2));
}

#[test]
fn tokenizer_matches_reference_fixture() {
    let text = include_str!("fixtures/smollm2_tokenizer.json");
    let fixture: serde_json::Value = serde_json::from_str(text).unwrap();
    let tok = model().tokenizer();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let s = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(s).unwrap();
        assert_eq!(got, want, "text {s:?}");
        assert_eq!(tok.decode(&got), s, "decode round trip of {s:?}");
    }
    let cat = tok.encode(" cat").unwrap();
    assert_eq!(cat.len(), 1);
    assert_eq!(tok.token_text(cat[0]), " cat");
    assert_eq!(tok.id_to_token(cat[0]).as_deref(), Some("Ġcat"));
}

/// A held-out paragraph (written for this test, not from any corpus).
const PARAGRAPH: &str = "The village library opened its doors in the spring of 1952. At first it held only a few hundred \
books, most of them donated by local families, and it was open two afternoons a week. Over the following decades the \
collection grew steadily, and the small reading room became a meeting place for students, farmers and retired teachers \
who came to read the newspapers and talk about the weather.";

#[test]
fn cross_entropy_on_real_text_is_sane() {
    let m = model();
    let mut ids = vec![m.tokenizer().bos_id().unwrap()];
    ids.extend(m.tokenizer().encode(PARAGRAPH).unwrap());
    let seq = ids.len();
    let out = m.forward(&ids, 1, seq, &mut Hooks::new()).unwrap();
    let logits = out.logits.unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
    let ce = cross_entropy(&logits, &ids, 1, seq, m.config().vocab_size);
    eprintln!("cross-entropy on the held-out paragraph ({seq} tokens): {ce:.4} nats");
    // A broken forward gives ~ln(49152) = 10.8 nats; a 135M model reads this at ~2-4.
    assert!((1.0..4.5).contains(&ce), "cross-entropy {ce}");
}

#[test]
fn greedy_continuation_is_fluent() {
    let m = model();
    let tok = m.tokenizer();
    let mut ids = tok.encode("The capital of France is").unwrap();
    for _ in 0..6 {
        let seq = ids.len();
        let out = m.forward(&ids, 1, seq, &mut Hooks::new()).unwrap();
        let v = m.config().vocab_size;
        let last = &out.logits.unwrap()[(seq - 1) * v..seq * v];
        let next = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
        ids.push(next as u32);
    }
    let text = tok.decode(&ids);
    eprintln!("greedy continuation: {text:?}");
    assert!(text.contains("Paris"), "continuation: {text:?}");
}

#[test]
fn batch_rows_are_independent_and_early_stop_matches() {
    let m = model();
    let tok = m.tokenizer();
    let a = tok
        .encode("Rivers carry water from the mountains down to the sea.")
        .unwrap();
    let b = tok
        .encode("fn main() { println!(\"hello\"); } // code, too: 12345")
        .unwrap();
    let seq = a.len().min(b.len());
    let mut both = a[..seq].to_vec();
    both.extend_from_slice(&b[..seq]);
    let hp = HookPoint::new(15, HookKind::ResidPost);
    let full = m
        .forward(&both, 2, seq, &mut Hooks::new().capture(hp))
        .unwrap();
    let early = m
        .forward(&both, 2, seq, &mut Hooks::new().capture(hp).logits(false))
        .unwrap();
    assert!(early.logits.is_none());
    assert_eq!(full.captured[&hp], early.captured[&hp]);
    // Row 1 alone gives the same activations as row 1 inside the batch.
    let single = m
        .forward(
            &b[..seq],
            1,
            seq,
            &mut Hooks::new().capture(hp).logits(false),
        )
        .unwrap();
    let d = m.config().d_model;
    let in_batch = &full.captured[&hp][seq * d..];
    for (x, y) in in_batch.iter().zip(&single.captured[&hp]) {
        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn out_of_range_hook_is_a_clear_error() {
    let m = model();
    let err = m.forward(
        &[1, 2, 3],
        1,
        3,
        &mut Hooks::new().capture(HookPoint::new(30, HookKind::ResidPre)),
    );
    let msg = err.err().unwrap().to_string();
    assert!(
        msg.contains("blocks.30.hook_resid_pre") && msg.contains("0..29"),
        "{msg}"
    );
    let err = m.forward(&[1, 2, 3], 2, 3, &mut Hooks::new());
    assert!(err.is_err());
    let err = m.forward(&[], 0, 5, &mut Hooks::new());
    assert!(err.err().unwrap().to_string().contains("empty input"));
    let err = m.forward(&[1, 2, 60000], 1, 3, &mut Hooks::new());
    assert!(err.err().unwrap().to_string().contains("out of range"));
}
