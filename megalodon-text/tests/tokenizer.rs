//! Tokenizer: exact round trips, save/load, Hugging Face files, errors that name the file.

use megalodon_text::{Corpus, Tokenizer, BUNDLED_CORPUS, END_OF_TEXT};
use std::sync::OnceLock;

/// Odd text: accents, combining marks, CJK, emoji with ZWJ and skin tone, RTL, control
/// characters, CRLF, tabs, runs of spaces, a NUL, leading/trailing whitespace.
const ODD: &[&str] = &[
    "naïve café, Zoë — “quotes” ‘single’ …",
    "e\u{301} vs é; Å vs A\u{30a}",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "👩🏽‍🚀 🐋 🏳️‍🌈 👍🏿",
    "שלום עולם مرحبا بالعالم",
    "\u{0}\u{1}\u{7f}\u{85}\u{2028}\u{feff}",
    "  leading and trailing spaces   ",
    "tabs\tand\r\nCRLF\r\n\n\nand    runs",
    " ",
    "\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∀x∈ℝ: x²≥0",
    "<|endoftext|> inside text",
];

/// One BPE trained on the training split of the bundled corpus, shared by the tests here.
fn bundled() -> &'static (Tokenizer, Vec<String>) {
    static T: OnceLock<(Tokenizer, Vec<String>)> = OnceLock::new();
    T.get_or_init(|| {
        let c = Corpus::load(BUNDLED_CORPUS).unwrap();
        let s = c.split(0.05).unwrap();
        let train: Vec<&str> = s.train.iter().map(|d| d.text.as_str()).collect();
        let tok = Tokenizer::train_bpe(&train, 2048).unwrap();
        let val = s.val.iter().map(|d| d.text.clone()).collect();
        (tok, val)
    })
}

#[test]
fn round_trip_on_bundled_validation_text() {
    let (tok, val) = bundled();
    assert_eq!(tok.vocab_size(), 2048);
    assert_eq!(tok.token_id(END_OF_TEXT), Some(0));
    assert_eq!(tok.end_of_text(), Some(0));
    let mut bytes = 0;
    let mut tokens = 0;
    for text in val {
        let ids = tok.encode(text).unwrap();
        assert!(ids.iter().all(|&i| i < tok.vocab_size()));
        assert_eq!(&tok.decode(&ids).unwrap(), text);
        bytes += text.len();
        tokens += ids.len();
    }
    // A 2048-entry BPE packs several bytes into a token (2.8 measured; bytes alone give 1.0).
    let ratio = bytes as f64 / tokens as f64;
    assert!(ratio > 2.5, "only {ratio:.2} bytes per token");
}

#[test]
fn round_trip_on_odd_unicode() {
    let (tok, _) = bundled();
    for s in ODD {
        let ids = tok.encode(s).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), *s, "ids {ids:?}");
    }
    let all = ODD.concat();
    assert_eq!(tok.decode(&tok.encode(&all).unwrap()).unwrap(), all);
    assert!(tok.encode("").unwrap().is_empty());
    assert_eq!(tok.decode(&[]).unwrap(), "");
    // A string of every char class boundary: all 256 byte values survive as UTF-8 text.
    let every: String = (1..0x800u32).filter_map(char::from_u32).collect();
    assert_eq!(tok.decode(&tok.encode(&every).unwrap()).unwrap(), every);
}

#[test]
fn encode_docs_joins_with_separator() {
    let (tok, _) = bundled();
    let docs = ["First document.\n", "Second one.\n"];
    let ids = tok.encode_docs(&docs, tok.end_of_text()).unwrap();
    let a = tok.encode(docs[0]).unwrap();
    let b = tok.encode(docs[1]).unwrap();
    assert_eq!(ids, [a.clone(), vec![0], b.clone()].concat());
    assert_eq!(tok.encode_docs(&docs, None).unwrap(), [a, b].concat());
    assert_eq!(
        tok.decode(&ids).unwrap(),
        format!("First document.\n{END_OF_TEXT}Second one.\n")
    );
    let e = format!("{:#}", tok.encode_docs(&docs, Some(1 << 20)).unwrap_err());
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn save_load_round_trip() {
    let (tok, val) = bundled();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    tok.save(&p).unwrap();
    assert!(!dir.path().join("tokenizer.json.tmp").exists());
    let back = Tokenizer::from_file(&p).unwrap();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.source(), Some(p.as_path()));
    for text in val.iter().map(|t| &t[..2000]).chain(ODD.iter().copied()) {
        let ids = tok.encode(text).unwrap();
        assert_eq!(back.encode(text).unwrap(), ids);
        assert_eq!(back.decode(&ids).unwrap(), text);
    }
    // Saving over an existing file replaces it.
    tok.save(&p).unwrap();
    assert_eq!(Tokenizer::from_file(&p).unwrap().vocab_size(), 2048);
}

#[test]
fn corrupt_and_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-tokenizer.json");
    let e = format!("{:#}", Tokenizer::from_file(&missing).unwrap_err());
    assert!(
        e.contains("missing-tokenizer.json") && e.contains("not found"),
        "{e}"
    );

    let (tok, _) = bundled();
    let p = dir.path().join("broken-tokenizer.json");
    tok.save(&p).unwrap();
    let json = std::fs::read_to_string(&p).unwrap();
    // Truncated file.
    std::fs::write(&p, &json[..json.len() / 2]).unwrap();
    let e = format!("{:#}", Tokenizer::from_file(&p).unwrap_err());
    assert!(
        e.contains("broken-tokenizer.json") && e.contains("not a valid tokenizer.json"),
        "{e}"
    );
    // Valid JSON, wrong content.
    std::fs::write(&p, r#"{"hello": "world"}"#).unwrap();
    let e = format!("{:#}", Tokenizer::from_file(&p).unwrap_err());
    assert!(e.contains("broken-tokenizer.json"), "{e}");
    // A well-formed file whose vocabulary is too small for a language model (one id).
    std::fs::write(
        &p,
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}"#,
    )
    .unwrap();
    let e = format!("{:#}", Tokenizer::from_file(&p).unwrap_err());
    assert!(
        e.contains("broken-tokenizer.json") && e.contains("1 ids"),
        "{e}"
    );
    // Not UTF-8 at all.
    std::fs::write(&p, b"\xff\xfe\x00").unwrap();
    let e = format!("{:#}", Tokenizer::from_file(&p).unwrap_err());
    assert!(e.contains("broken-tokenizer.json"), "{e}");
}

#[test]
fn vocab_size_bounds_name_the_flag() {
    for bad in [0, 1, 256, usize::MAX] {
        let e = format!(
            "{:#}",
            Tokenizer::train_bpe(&["some text"], bad).unwrap_err()
        );
        assert!(e.contains("--vocab-size"), "{bad}: {e}");
    }
    assert!(megalodon_text::check_vocab_size(1).is_err());
    assert!(megalodon_text::check_vocab_size((1 << 24) + 1).is_err());
    assert!(megalodon_text::check_vocab_size(32_000).is_ok());
    let e = format!("{:#}", Tokenizer::train_bpe(&[""], 300).unwrap_err());
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn decode_rejects_out_of_range_ids() {
    let (tok, _) = bundled();
    let e = format!("{:#}", tok.decode(&[1, 2, 2048]).unwrap_err());
    assert!(
        e.contains("token id 2048") && e.contains("position 2") && e.contains("2048 ids"),
        "{e}"
    );
    assert!(tok.decode(&[2047]).is_ok());
}

#[test]
fn small_training_is_deterministic_and_capped() {
    let c = Corpus::load(BUNDLED_CORPUS).unwrap();
    let text = &c.docs[3].text[..30_000];
    let a = Tokenizer::train_bpe(&[text], 400).unwrap();
    let b = Tokenizer::train_bpe(&[text], 400).unwrap();
    assert_eq!(a.vocab_size(), 400);
    assert_eq!(
        a.inner().to_string(false).unwrap(),
        b.inner().to_string(false).unwrap()
    );
    // Tiny text allows few merges: the vocabulary stops short of the request.
    let c = Tokenizer::train_bpe(&["ab"], 5000).unwrap();
    assert!(c.vocab_size() < 300, "{}", c.vocab_size());
    assert_eq!(c.decode(&c.encode("ba ab").unwrap()).unwrap(), "ba ab");
}

/// A Llama-style `tokenizer.json` (SentencePiece BPE with byte fallback, `▁` for spaces,
/// BOS-adding post-processor, truncation set in the file), written by hand.
fn llama_style_json() -> String {
    let mut vocab = vec![
        r#""<unk>": 0"#.to_string(),
        r#""<s>": 1"#.to_string(),
        r#""</s>": 2"#.to_string(),
    ];
    for b in 0..256 {
        vocab.push(format!(r#""<0x{b:02X}>": {}"#, 3 + b));
    }
    let extra = [
        "▁", "h", "i", "▁h", "▁hi", "e", "l", "o", "▁he", "ll", "▁hell", "▁hello",
    ];
    for (k, t) in extra.iter().enumerate() {
        vocab.push(format!(r#""{t}": {}"#, 259 + k));
    }
    let special = |id: u32, s: &str| {
        format!(
            r#"{{"id": {id}, "content": "{s}", "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true}}"#
        )
    };
    format!(
        r#"{{
  "version": "1.0",
  "truncation": {{"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}},
  "padding": null,
  "added_tokens": [{}, {}, {}],
  "normalizer": {{"type": "Sequence", "normalizers": [
      {{"type": "Prepend", "prepend": "▁"}},
      {{"type": "Replace", "pattern": {{"String": " "}}, "content": "▁"}}]}},
  "pre_tokenizer": null,
  "post_processor": {{"type": "TemplateProcessing",
      "single": [{{"SpecialToken": {{"id": "<s>", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}],
      "pair": [{{"SpecialToken": {{"id": "<s>", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}},
               {{"SpecialToken": {{"id": "<s>", "type_id": 1}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}],
      "special_tokens": {{"<s>": {{"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}}}},
  "decoder": {{"type": "Sequence", "decoders": [
      {{"type": "Replace", "pattern": {{"String": "▁"}}, "content": " "}},
      {{"type": "ByteFallback"}}, {{"type": "Fuse"}},
      {{"type": "Strip", "content": " ", "start": 1, "stop": 0}}]}},
  "model": {{"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
      "vocab": {{{}}},
      "merges": ["▁ h", "▁h i", "▁h e", "l l", "▁he ll", "▁hell o"]}}
}}"#,
        special(0, "<unk>"),
        special(1, "<s>"),
        special(2, "</s>"),
        vocab.join(", ")
    )
}

#[test]
fn loads_a_llama_style_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    std::fs::write(&p, llama_style_json()).unwrap();
    let tok = Tokenizer::from_file(&p).unwrap();
    // Vocabulary size read from the file: 3 specials + 256 byte tokens + 12 pieces.
    assert_eq!(tok.vocab_size(), 271);
    assert_eq!(tok.end_of_text(), Some(2));
    // No BOS is added, and the file's truncation (4 tokens) is switched off.
    let ids = tok.encode("hi hello hi hello hi").unwrap();
    assert_eq!(ids, [263, 270, 263, 270, 263]);
    assert_eq!(tok.decode(&ids).unwrap(), "hi hello hi hello hi");
    // Unknown characters fall back to byte tokens and decode exactly.
    let ids = tok.encode("hé").unwrap();
    assert_eq!(ids, [262, 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(tok.decode(&ids).unwrap(), "hé");
    let e = format!("{:#}", tok.decode(&[271]).unwrap_err());
    assert!(
        e.contains("token id 271") && e.contains("tokenizer.json"),
        "{e}"
    );
}
