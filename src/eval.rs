//! `polyburn eval`: sample replies to the held-out prompts of a run and score correctness
//! (unbiased pass@k, coverage@k) and diversity (distinct-2, self-BLEU, semantic).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::data::Example;
use crate::diversity::{distinct_n, self_bleu, semantic_diversity};
use crate::model::generate::{Decoding, SamplingOptions, generate_batch};
use crate::model::ForwardContext;
use crate::model::encoder::SentenceEncoder;
use crate::train::reward::{Rewards, Verifier};
use crate::train::trainer::load_checkpointed_model;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub k: Vec<usize>,
    /// Replies sampled per prompt (n of pass@k).
    pub samples: usize,
    /// Checkpoint step (latest when `None`).
    pub step: Option<u64>,
    /// Sentence encoder for semantic diversity; `None` skips it.
    pub encoder: Option<String>,
    /// Sampling temperature (the run's `objective.sampling` when `None`).
    pub temperature: Option<f64>,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    #[serde(serialize_with = "by_k")]
    pub pass_at: Vec<(usize, f64)>,
    #[serde(serialize_with = "by_k")]
    pub coverage_at: Vec<(usize, f64)>,
    pub distinct_2: f64,
    pub self_bleu: f64,
    pub semantic_diversity: Option<f64>,
    pub reward_mean: f64,
    pub prompts: usize,
    pub samples: usize,
    pub step: u64,
}

/// `[(k, value)]` as a JSON object `{"k": value}` in the order the user gave the k.
fn by_k<S: serde::Serializer>(values: &[(usize, f64)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(values.len()))?;
    for (k, v) in values {
        map.serialize_entry(&k.to_string(), v)?;
    }
    map.end()
}

/// Unbiased pass@k from `n` samples of which `c` are correct: `1 − C(n−c, k) / C(n, k)`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n - c < k {
        return 1.0;
    }
    // C(n−c, k) / C(n, k) = Π_{i = n−c+1}^{n} (1 − k / i), numerically stable.
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// coverage@k: the expected number of distinct correct answers (trimmed replies) among `k` of
/// the `n` samples drawn without replacement, estimated without bias from all of them:
/// `Σ_a 1 − C(n − m_a, k) / C(n, k)` over the distinct correct answers `a`, `m_a` being how
/// often `a` was sampled (each term is pass@k for answer `a`). Until this version coverage@k
/// counted the distinct correct answers among the first `k` samples, one draw of the same
/// expectation.
pub fn coverage_at_k(replies: &[String], correct: &[bool], k: usize) -> f64 {
    let n = replies.len();
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (r, _) in replies.iter().zip(correct).filter(|(_, c)| **c) {
        *counts.entry(r.trim()).or_default() += 1;
    }
    counts.values().map(|&m| pass_at_k(n, m, k.min(n))).sum()
}

/// Samples `options.samples` replies for every distinct held-out prompt of `run_dir` and scores them.
pub fn evaluate_run(run_dir: &Path, options: &EvalOptions) -> Result<EvalReport> {
    if options.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if let Some(&bad) = options.k.iter().find(|&&k| k == 0 || k > options.samples) {
        bail!("--k {bad}: every k must be between 1 and --samples ({})", options.samples);
    }
    let run = load_checkpointed_model(run_dir, options.step)?;
    let data = crate::data::prepare(&run.config, run_dir)?;
    // Distinct prompts of the held-out split, in file order.
    let mut seen = BTreeSet::new();
    let held_out: Vec<&Example> = data
        .validation
        .examples()
        .iter()
        .filter(|e| e.record.as_ref().is_some_and(|r| seen.insert(r.prompt.clone())))
        .collect();
    if held_out.is_empty() {
        bail!("{}: the held-out split has no prompt/reply records to evaluate", run_dir.display());
    }
    let mut sampling = SamplingOptions::from_config(&run.config.objective.sampling, run.tokenizer.eos_id(), options.seed);
    if let Some(t) = options.temperature {
        sampling.temperature = t;
    }
    let step = run.checkpoint.state()?.global_step;
    let prompts: Vec<Vec<u32>> = held_out.iter().map(|e| e.prompt_tokens().to_vec()).collect();
    let context = ForwardContext::at_step(step);
    let replies = generate_batch(&run.model, &prompts, options.samples, &sampling, &context, Decoding::KvCache, &run.device)?;
    let rewards = Rewards::from_config(&run.config.objective.rewards);
    let encoder = match &options.encoder {
        Some(id) => Some(SentenceEncoder::load(id, &burn::tensor::Device::flex()).with_context(|| {
            "--encoder: run .ci/fetch-minilm to cache all-MiniLM-L6-v2, or pass --encoder none"
        })?),
        None => None,
    };

    let n = options.samples;
    let mut pass = vec![0.0; options.k.len()];
    let mut coverage = vec![0.0; options.k.len()];
    let (mut distinct, mut bleu, mut semantic, mut reward_total) = (0.0, 0.0, 0.0, 0.0);
    for (example, group) in held_out.iter().zip(&replies) {
        let record = example.record.as_ref().expect("filtered above");
        let texts: Vec<String> = group.iter().map(|r| run.tokenizer.decode(r)).collect::<Result<_>>()?;
        let correct: Vec<bool> = texts.iter().map(|t| Verifier::accepts(record, t)).collect();
        let c = correct.iter().filter(|&&x| x).count();
        for (i, &k) in options.k.iter().enumerate() {
            pass[i] += pass_at_k(n, c, k);
            coverage[i] += coverage_at_k(&texts, &correct, k);
        }
        distinct += distinct_n(group, 2);
        bleu += self_bleu(group);
        reward_total += texts.iter().map(|t| rewards.score(record, t)).sum::<f64>() / n as f64;
        if let Some(encoder) = &encoder {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            semantic += semantic_diversity(&encoder.embed(&refs)?)?;
        }
    }
    let p = held_out.len() as f64;
    let by_k = |v: &[f64]| options.k.iter().zip(v).map(|(&k, x)| (k, x / p)).collect();
    Ok(EvalReport {
        pass_at: by_k(&pass),
        coverage_at: by_k(&coverage),
        distinct_2: distinct / p,
        self_bleu: bleu / p,
        semantic_diversity: encoder.is_some().then_some(semantic / p),
        reward_mean: reward_total / p,
        prompts: held_out.len(),
        samples: n,
        step,
    })
}

impl EvalReport {
    pub fn markdown(&self, run_dir: &Path) -> String {
        let mut out = format!(
            "## Evaluation of {} (step {}, {} held-out prompts × {} samples)\n\n| metric | value |\n|---|---|\n",
            run_dir.display(),
            self.step,
            self.prompts,
            self.samples
        );
        for (k, v) in &self.pass_at {
            out += &format!("| pass@{k} | {v:.4} |\n");
        }
        for (k, v) in &self.coverage_at {
            out += &format!("| coverage@{k} (distinct correct answers) | {v:.3} |\n");
        }
        out += &format!("| distinct-2 | {:.4} |\n| self-BLEU | {:.4} |\n", self.distinct_2, self.self_bleu);
        if let Some(s) = self.semantic_diversity {
            out += &format!("| semantic diversity | {s:.4} |\n");
        }
        out += &format!("| reward mean | {:.4} |\n", self.reward_mean);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pass@k by enumerating every k-subset of n samples.
    fn pass_at_k_by_subsets(n: usize, c: usize, k: usize) -> f64 {
        let (mut hit, mut all) = (0u64, 0u64);
        for mask in 0u32..(1 << n) {
            if mask.count_ones() as usize == k {
                all += 1;
                if (0..c).any(|i| mask & (1 << i) != 0) {
                    hit += 1;
                }
            }
        }
        hit as f64 / all as f64
    }

    #[test]
    fn pass_at_k_is_the_unbiased_estimator() {
        for n in 1..=10 {
            for c in 0..=n {
                for k in 1..=n {
                    let (a, b) = (pass_at_k(n, c, k), pass_at_k_by_subsets(n, c, k));
                    assert!((a - b).abs() < 1e-12, "n={n} c={c} k={k}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn coverage_is_the_mean_over_every_k_subset_of_distinct_correct_answers() {
        let r: Vec<String> = ["bear", "bee", " bear", "cat", "bison", "bee", "bear"].iter().map(|s| s.to_string()).collect();
        let ok = [true, true, true, false, true, true, true];
        let n = r.len();
        for k in 1..=n {
            let subsets: Vec<u32> = (0u32..1 << n).filter(|m| m.count_ones() as usize == k).collect();
            let total: usize = subsets
                .iter()
                .map(|m| (0..n).filter(|i| m >> i & 1 == 1 && ok[*i]).map(|i| r[i].trim()).collect::<BTreeSet<_>>().len())
                .sum();
            let want = total as f64 / subsets.len() as f64;
            let got = coverage_at_k(&r, &ok, k);
            assert!((got - want).abs() < 1e-12, "k={k}: {got} vs {want}");
        }
        assert_eq!(coverage_at_k(&r, &ok, n), 3.0, "all samples: bear, bee, bison");
        assert_eq!(coverage_at_k(&r, &[false; 7], 3), 0.0);
    }
}
