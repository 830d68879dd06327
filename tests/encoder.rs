//! The BERT sentence encoder against sentence-transformers' all-MiniLM-L6-v2 embeddings
//! (`tests/fixtures/minilm_l6_v2_reference.jsonl`). The model must be in the Hugging
//! Face cache: `.ci/fetch-minilm` puts it there.

mod common;

use polyburn::model::encoder::{DEFAULT_ENCODER, SentenceEncoder};

fn reference() -> Vec<(String, Vec<f32>)> {
    let path = common::fixtures_dir().join("minilm_l6_v2_reference.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let e = v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            (v["text"].as_str().unwrap().to_string(), e)
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn encoder() -> SentenceEncoder {
    SentenceEncoder::load(DEFAULT_ENCODER, &burn::tensor::Device::flex())
        .unwrap_or_else(|e| panic!("{e:#}\nrun .ci/fetch-minilm to put all-MiniLM-L6-v2 into the Hugging Face cache"))
}

#[test]
fn embeddings_agree_with_sentence_transformers() {
    let reference = reference();
    assert_eq!(reference.len(), 10);
    let texts: Vec<&str> = reference.iter().map(|(t, _)| t.as_str()).collect();
    let ours = encoder().embed(&texts).unwrap();
    for ((text, want), got) in reference.iter().zip(&ours) {
        assert_eq!(got.len(), 384);
        let c = cosine(want, got);
        assert!(c >= 0.9999, "{text:?}: cosine {c}");
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{text:?}: norm {norm}");
    }
    // A text's embedding does not depend on its batch-mates (padding is masked).
    let alone = encoder().embed(&[texts[7]]).unwrap();
    assert!(cosine(&alone[0], &ours[7]) > 0.99999);
}

#[test]
fn embed_command_prints_one_json_object_per_text() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lines.txt");
    std::fs::write(&file, "The cat sat on the mat.\nhello\n").unwrap();
    let out = common::run(&["embed", "--file", file.to_str().unwrap(), "--text", "first"]).ok().stdout();
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let texts: Vec<&str> = lines.iter().map(|v| v["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["first", "The cat sat on the mat.", "hello"]);
    let reference = reference();
    let got: Vec<f32> = lines[1]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert!(cosine(&got, &reference[0].1) >= 0.9999);
    let stdin = common::run_with_stdin(&["embed"], "hello\n").ok().stdout();
    assert_eq!(stdin.lines().count(), 1);
    let missing = common::run(&["embed", "--model", "/no/such/folder", "--text", "x"]).fails();
    assert!(missing.stderr().contains("/no/such/folder"), "{}", missing.stderr());
}
