//! Held-out sampling evaluation: replies sampled to every distinct held-out prompt, scored for
//! correctness (unbiased pass@k, coverage@k) and diversity (distinct-2, self-BLEU, semantic),
//! each metric a mean over prompts with its standard error. `polyburn eval` runs it on a
//! checkpoint, `training.eval_generate_every` during training.

use std::collections::BTreeSet;

use anyhow::{Result, bail};
use burn::tensor::Device;
use serde::Serialize;

use crate::config::Config;
use crate::data::{Example, SampleSource, TextTokenizer};
use crate::diversity::{distinct_n, self_bleu, semantic_diversity};
use crate::model::encoder::SentenceEncoder;
use crate::model::generate::{Decoding, SamplingOptions, generate_batch};
use crate::model::{ForwardContext, Gpt};
use crate::train::reward::{Rewards, Verifier};

#[derive(Debug, Clone)]
pub struct HeldOutOptions {
    pub k: Vec<usize>,
    /// Replies sampled per prompt (n of pass@k).
    pub samples: usize,
    /// Sampling temperature (the run's `objective.sampling` when `None`).
    pub temperature: Option<f64>,
    pub seed: u64,
}

impl HeldOutOptions {
    pub fn validate(&self) -> Result<()> {
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        if let Some(&bad) = self.k.iter().find(|&&k| k == 0 || k > self.samples) {
            bail!("--k {bad}: every k must be between 1 and --samples ({})", self.samples);
        }
        Ok(())
    }
}

/// The metrics of one evaluation (means over prompts), or their standard errors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeldOutMetrics {
    #[serde(serialize_with = "by_k")]
    pub pass_at: Vec<(usize, f64)>,
    #[serde(serialize_with = "by_k")]
    pub coverage_at: Vec<(usize, f64)>,
    pub distinct_2: f64,
    pub self_bleu: f64,
    pub semantic_diversity: Option<f64>,
    pub reward_mean: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    #[serde(flatten)]
    pub mean: HeldOutMetrics,
    /// Standard error of each mean over the prompts (sample std / √prompts).
    pub stderr: HeldOutMetrics,
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

impl HeldOutMetrics {
    /// Every number in a fixed order (the semantic diversity last, when present).
    fn values(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.pass_at.iter().chain(&self.coverage_at).map(|(_, x)| *x).collect();
        v.extend([self.distinct_2, self.self_bleu, self.reward_mean]);
        v.extend(self.semantic_diversity);
        v
    }

    /// The same fields as `self`, filled from `values` in [`Self::values`]' order.
    fn with_values(&self, values: &[f64]) -> Self {
        let (n_pass, n_cov) = (self.pass_at.len(), self.coverage_at.len());
        let rest = &values[n_pass + n_cov..];
        Self {
            pass_at: self.pass_at.iter().zip(values).map(|((k, _), v)| (*k, *v)).collect(),
            coverage_at: self.coverage_at.iter().zip(&values[n_pass..]).map(|((k, _), v)| (*k, *v)).collect(),
            distinct_2: rest[0],
            self_bleu: rest[1],
            reward_mean: rest[2],
            semantic_diversity: self.semantic_diversity.map(|_| rest[3]),
        }
    }

    /// Named values for logs: `pass@1`, `coverage@10`, `distinct_2`, ...
    pub fn named(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self.pass_at.iter().map(|(k, v)| (format!("pass@{k}"), *v)).collect();
        out.extend(self.coverage_at.iter().map(|(k, v)| (format!("coverage@{k}"), *v)));
        out.extend([("distinct_2".into(), self.distinct_2), ("self_bleu".into(), self.self_bleu), ("reward_mean".into(), self.reward_mean)]);
        out.extend(self.semantic_diversity.map(|s| ("semantic_diversity".into(), s)));
        out
    }
}

/// Mean and standard error of the mean of each column of `rows` (one row per prompt).
fn mean_and_stderr(rows: &[HeldOutMetrics]) -> (HeldOutMetrics, HeldOutMetrics) {
    let columns: Vec<Vec<f64>> = rows.iter().map(HeldOutMetrics::values).collect();
    let n = columns.len() as f64;
    let width = columns[0].len();
    let mean: Vec<f64> = (0..width).map(|j| columns.iter().map(|c| c[j]).sum::<f64>() / n).collect();
    let stderr: Vec<f64> = (0..width)
        .map(|j| {
            if columns.len() < 2 {
                return 0.0;
            }
            let var = columns.iter().map(|c| (c[j] - mean[j]).powi(2)).sum::<f64>() / (n - 1.0);
            (var / n).sqrt()
        })
        .collect();
    (rows[0].with_values(&mean), rows[0].with_values(&stderr))
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
    // A fold from +0: `sum` of no terms is −0.0, printed as "-0.00".
    counts.values().fold(0.0, |total, &m| total + pass_at_k(n, m, k.min(n)))
}

/// The distinct prompts of the held-out split, in file order.
pub fn held_out_prompts(validation: &SampleSource) -> Vec<&Example> {
    let mut seen = BTreeSet::new();
    validation.examples().iter().filter(|e| e.record.as_ref().is_some_and(|r| seen.insert(r.prompt.clone()))).collect()
}

/// Samples `options.samples` replies to every distinct held-out prompt with `model` (an
/// inference model on `device`) and scores them with `config`'s rewards and the verifier.
pub fn evaluate_held_out(
    model: &Gpt,
    tokenizer: &TextTokenizer,
    config: &Config,
    validation: &SampleSource,
    encoder: Option<&SentenceEncoder>,
    options: &HeldOutOptions,
    step: u64,
    device: &Device,
) -> Result<EvalReport> {
    options.validate()?;
    let held_out = held_out_prompts(validation);
    if held_out.is_empty() {
        bail!("the held-out split has no prompt/reply records to evaluate");
    }
    let mut sampling = SamplingOptions::from_config(&config.objective.sampling, tokenizer.eos_id(), options.seed);
    if let Some(t) = options.temperature {
        sampling.temperature = t;
    }
    let prompts: Vec<Vec<u32>> = held_out.iter().map(|e| e.prompt_tokens().to_vec()).collect();
    let replies = generate_batch(model, &prompts, options.samples, &sampling, &ForwardContext::at_step(step), Decoding::KvCache, device)?;
    let rewards = Rewards::from_config(&config.objective.rewards);
    let n = options.samples;
    let mut rows = Vec::with_capacity(held_out.len());
    for (example, group) in held_out.iter().zip(&replies) {
        let record = example.record.as_ref().expect("held-out prompts are records");
        let texts: Vec<String> = group.iter().map(|r| tokenizer.decode(r)).collect::<Result<_>>()?;
        let correct: Vec<bool> = texts.iter().map(|t| Verifier::accepts(record, t)).collect();
        let c = correct.iter().filter(|&&x| x).count();
        let semantic_diversity = match encoder {
            Some(encoder) => Some(semantic_diversity(&encoder.embed(&texts.iter().map(String::as_str).collect::<Vec<_>>())?)?),
            None => None,
        };
        rows.push(HeldOutMetrics {
            pass_at: options.k.iter().map(|&k| (k, pass_at_k(n, c, k))).collect(),
            coverage_at: options.k.iter().map(|&k| (k, coverage_at_k(&texts, &correct, k))).collect(),
            distinct_2: distinct_n(group, 2),
            self_bleu: self_bleu(group),
            semantic_diversity,
            reward_mean: texts.iter().map(|t| rewards.score(record, t)).sum::<f64>() / n as f64,
        });
    }
    let (mean, stderr) = mean_and_stderr(&rows);
    Ok(EvalReport { mean, stderr, prompts: held_out.len(), samples: n, step })
}

impl EvalReport {
    pub fn markdown(&self, title: &str) -> String {
        let mut out = format!(
            "## Evaluation of {title} (step {}, {} held-out prompts × {} samples; ± one standard error over prompts)\n\n| metric | value |\n|---|---|\n",
            self.step, self.prompts, self.samples
        );
        let (m, e) = (&self.mean, &self.stderr);
        for ((k, v), (_, se)) in m.pass_at.iter().zip(&e.pass_at) {
            out += &format!("| pass@{k} | {v:.4} ± {se:.4} |\n");
        }
        for ((k, v), (_, se)) in m.coverage_at.iter().zip(&e.coverage_at) {
            out += &format!("| coverage@{k} (distinct correct answers) | {v:.3} ± {se:.3} |\n");
        }
        out += &format!("| distinct-2 | {:.4} ± {:.4} |\n", m.distinct_2, e.distinct_2);
        out += &format!("| self-BLEU | {:.4} ± {:.4} |\n", m.self_bleu, e.self_bleu);
        if let (Some(s), Some(se)) = (m.semantic_diversity, e.semantic_diversity) {
            out += &format!("| semantic diversity | {s:.4} ± {se:.4} |\n");
        }
        out += &format!("| reward mean | {:.4} ± {:.4} |\n", m.reward_mean, e.reward_mean);
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

    fn row(pass1: f64, reward: f64, semantic: Option<f64>) -> HeldOutMetrics {
        HeldOutMetrics {
            pass_at: vec![(1, pass1), (4, 1.0)],
            coverage_at: vec![(4, 2.0 * pass1)],
            distinct_2: 0.5,
            self_bleu: pass1,
            semantic_diversity: semantic,
            reward_mean: reward,
        }
    }

    #[test]
    fn standard_errors_are_the_sample_std_over_prompts_over_root_n() {
        let rows = [row(0.0, 1.0, Some(0.2)), row(0.5, 1.0, Some(0.4)), row(1.0, 1.0, Some(0.9))];
        let (mean, se) = mean_and_stderr(&rows);
        assert_eq!(mean.pass_at, vec![(1, 0.5), (4, 1.0)]);
        assert_eq!(mean.coverage_at, vec![(4, 1.0)]);
        // Sample std of (0, 0.5, 1) is 0.5; over √3 prompts.
        let want = 0.5 / 3f64.sqrt();
        assert!((se.pass_at[0].1 - want).abs() < 1e-12 && (se.self_bleu - want).abs() < 1e-12, "{se:?}");
        assert!((se.coverage_at[0].1 - 2.0 * want).abs() < 1e-12);
        assert_eq!((se.pass_at[1].1, se.distinct_2, se.reward_mean), (0.0, 0.0, 0.0), "constant columns");
        assert!((mean.semantic_diversity.unwrap() - 0.5).abs() < 1e-12);
        assert!(se.semantic_diversity.unwrap() > 0.0);
        let (_, one) = mean_and_stderr(&rows[..1]);
        assert_eq!(one.pass_at[0].1, 0.0, "one prompt: no spread to measure");
        let report = EvalReport { mean, stderr: se, prompts: 3, samples: 4, step: 9 };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["pass_at"]["1"], 0.5, "{json}");
        assert!(json["stderr"]["pass_at"]["1"].as_f64().is_some_and(|v| (v - want).abs() < 1e-12), "{json}");
        assert!(report.markdown("run").contains("| pass@1 | 0.5000 ± 0.2887 |"), "{}", report.markdown("run"));
    }
}
