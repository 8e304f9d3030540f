//! Document and label counts of corpora, with one sample document each.
//!
//! `cargo run --release -p saelab-data --example corpus_stats -- [spec...]`
//! (default: every built-in corpus).

use saelab_data::corpus::{load_corpus, BUILTIN_CORPORA};

fn main() -> anyhow::Result<()> {
    let specs: Vec<String> = std::env::args().skip(1).collect();
    let specs: Vec<String> = if specs.is_empty() {
        BUILTIN_CORPORA.iter().map(|s| s.to_string()).collect()
    } else {
        specs
    };
    for spec in specs {
        let ds = load_corpus(&spec)?;
        println!(
            "== {spec}: {} documents, {} bytes",
            ds.len(),
            ds.total_bytes()
        );
        let keys: std::collections::BTreeSet<&String> =
            ds.docs.iter().flat_map(|d| d.labels.keys()).collect();
        for k in keys {
            let counts = ds.label_counts(k);
            if counts.len() <= 20 {
                println!("   label {k}: {counts:?}");
            } else {
                println!("   label {k}: {} distinct values", counts.len());
            }
        }
        let sample = &ds.docs[ds.len() / 2];
        let text: String = sample.text.chars().take(300).collect();
        println!("   sample [{}]: {text:?}", ds.len() / 2);
    }
    Ok(())
}
