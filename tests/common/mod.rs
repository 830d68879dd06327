//! Helpers shared by the end-to-end tests: run the real `polyburn` binary on small configs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn polyburn() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_polyburn"));
    cmd.current_dir(repo_root());
    cmd
}

pub struct Run {
    pub output: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn ok(self) -> Self {
        assert!(self.output.status.success(), "polyburn failed:\n{}\n{}", self.stdout(), self.stderr());
        self
    }
    pub fn fails(self) -> Self {
        assert!(!self.output.status.success(), "polyburn should have failed:\n{}", self.stdout());
        self
    }
}

pub fn run(args: &[&str]) -> Run {
    Run { output: polyburn().args(args).output().expect("spawn polyburn") }
}

/// A small, fast text config writing to `out`; extra YAML lines are appended per section
/// through `--set` by the callers.
pub fn write_config(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

pub fn tiny_text_config(out: &Path) -> String {
    format!(
        "run: {{name: t, output_dir: {out}, seed: 7}}\n\
         data: {{train: {corpus}, tokenizer: char}}\n\
         model: {{d_model: 32, n_layers: 2, n_heads: 2, context_length: 16, dropout: 0.1}}\n\
         optimizer: {{learning_rate: 3.0e-3, warmup_steps: 2, min_lr: 1.0e-4}}\n\
         training: {{max_steps: 8, batch_size: 4, grad_accum_steps: 2, eval_every: 4, eval_batches: 2, log_every: 1}}\n\
         checkpoint: {{every_steps: 2, keep_last: 0}}\n",
        out = out.display(),
        corpus = repo_root().join("data/shakespeare_excerpt.txt").display(),
    )
}

/// `(step, loss)` of the training records in a run's metrics.jsonl.
pub fn logged_losses(run_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?))
        })
        .collect()
}

/// The tensors of a safetensors file by name (ids in the metadata are not compared).
pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub fn checkpoint_steps(run_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse().ok()).collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps
}

/// The `alpha` arrays of a run's metrics.jsonl, by step.
pub fn logged_alphas(run_dir: &Path) -> Vec<(u64, Vec<f64>)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let alphas = v.get("alpha")?.as_array()?.iter().map(|a| a.as_f64().unwrap()).collect();
            Some((v["step"].as_u64()?, alphas))
        })
        .collect()
}

/// Logits of `model` for one sequence of token ids (flattened `[seq, vocab]`).
pub fn logits_of(model: &polyburn::model::Gpt, tokens: &[i64]) -> Vec<f32> {
    use burn::tensor::{Device, Int, Tensor, TensorData};
    let input = Tensor::<2, Int>::from_data(TensorData::new(tokens.to_vec(), [1, tokens.len()]), &Device::flex());
    let context = polyburn::model::ForwardContext::default();
    model.forward(input, &context).into_data().try_to_vec::<f32>().unwrap()
}

/// The outside references the tests compare against (`tests/fixtures/README.md`).
pub fn fixtures_dir() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// Runs polyburn with `input` on stdin.
pub fn run_with_stdin(args: &[&str], input: &str) -> Run {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = polyburn()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn polyburn");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    Run { output: child.wait_with_output().expect("wait for polyburn") }
}

/// A chat corpus in `dir` made from the arithmetic records: conversations of one to three
/// question/answer turns, every fourth with a system message.
pub fn write_chat_corpus(dir: &Path) -> PathBuf {
    let qa: Vec<serde_json::Value> = std::fs::read_to_string(repo_root().join("data/arithmetic.jsonl"))
        .unwrap()
        .lines()
        .take(120)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut lines = Vec::new();
    let mut next = qa.iter();
    for i in 0.. {
        let mut messages = Vec::new();
        if i % 4 == 0 {
            messages.push(serde_json::json!({"role": "system", "content": "Add."}));
        }
        for _ in 0..1 + i % 3 {
            let Some(r) = next.next() else { break };
            messages.push(serde_json::json!({"role": "user", "content": r["prompt"]}));
            messages.push(serde_json::json!({"role": "assistant", "content": r["reply"]}));
        }
        if messages.len() < 2 || messages.last().unwrap()["role"] != "assistant" {
            break;
        }
        lines.push(serde_json::json!({"messages": messages}).to_string());
    }
    let path = dir.join("chat.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// The Qwen2 chat template fixture.
pub fn qwen2_template() -> PathBuf {
    repo_root().join("tests/fixtures/chat/qwen2.jinja")
}
