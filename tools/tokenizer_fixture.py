#!/usr/bin/env python3
"""Generate crates/lm/tests/fixtures/smollm2_tokenizer.json: varied test texts and the token
ids the reference tokenizer (Hugging Face transformers loading the GGUF's tokenizer) gives
for them, without special tokens added. The Rust test `tokenizer_matches_reference_fixture`
checks saelab's GGUF-built tokenizer against it byte for byte.

Requires: pip install transformers gguf
Usage: python3 tools/tokenizer_fixture.py PATH/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import os
import sys

from transformers import AutoTokenizer

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading spaces,   multiple   spaces\tand\ttabs\n\nnew lines  ",
    "Numbers: 0 7 42 1234567890 3.14159 -12,500 1e-5 2024-11-21",
    "Unicode: café naïve Zürich Ελληνικά русский 中文字符 日本語 한국어 🙂🚀 — “quotes” ‘single’ …",
    "def add(a, b):\n    return a + b  # sum\n\nif __name__ == '__main__':\n    print(add(1, 2))\n",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * 2).collect(); println!(\"{:?}\", v); }",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "It's they're we've I'm you'll she'd DON'T",
    "URL https://example.org/a/b?c=1&d=%20 email a.b@c.de",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!!??????",
]


def main():
    path = os.path.abspath(sys.argv[1])
    d, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS]
    out = os.path.join(os.path.dirname(__file__), "..", "crates", "lm", "tests", "fixtures", "smollm2_tokenizer.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"model": name, "reference": "transformers AutoTokenizer(gguf_file)", "cases": cases}, f,
                  ensure_ascii=False, indent=1)
    print(f"wrote {len(cases)} cases to {os.path.normpath(out)}")


if __name__ == "__main__":
    main()
