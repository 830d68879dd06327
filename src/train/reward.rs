//! Rewards for sampled replies. A [`Reward`] scores one reply to one record; the config's
//! `objective.rewards` list becomes a weighted sum of them ([`Rewards`]).

use crate::config::{RewardConfig, RewardKind};
use crate::data::corpus::PromptReply;
use polyburn_kernels::lcs::lcs_length_dp;

/// Scores a reply (already decoded, without the end-of-text token) to a record.
pub trait Reward: Send + Sync {
    fn score(&self, record: &PromptReply, reply: &str) -> f64;
}

/// ROUGE-L F1 over whitespace words against the reference reply.
pub struct RougeL;

impl Reward for RougeL {
    fn score(&self, record: &PromptReply, reply: &str) -> f64 {
        rouge_l_f1(reply, &record.reply)
    }
}

pub fn rouge_l_f1(candidate: &str, reference: &str) -> f64 {
    let c: Vec<&str> = candidate.split_whitespace().collect();
    let r: Vec<&str> = reference.split_whitespace().collect();
    if c.is_empty() || r.is_empty() {
        return if c.is_empty() && r.is_empty() { 1.0 } else { 0.0 };
    }
    let lcs = lcs_length_dp(&c, &r) as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (precision, recall) = (lcs / c.len() as f64, lcs / r.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

/// 1 when the reply's length in characters lies in `[min, max]`.
pub struct LengthWindow {
    pub min_chars: usize,
    pub max_chars: usize,
}

impl Reward for LengthWindow {
    fn score(&self, _: &PromptReply, reply: &str) -> f64 {
        let n = reply.trim().chars().count();
        if (self.min_chars..=self.max_chars).contains(&n) { 1.0 } else { 0.0 }
    }
}

/// The task's verifier: 1 when the trimmed reply is one of the record's accepted answers.
pub struct Verifier;

impl Verifier {
    pub fn accepts(record: &PromptReply, reply: &str) -> bool {
        let reply = reply.trim();
        if record.answers.is_empty() { reply == record.reply.trim() } else { record.answers.iter().any(|a| a.trim() == reply) }
    }
}

impl Reward for Verifier {
    fn score(&self, record: &PromptReply, reply: &str) -> f64 {
        if Self::accepts(record, reply) { 1.0 } else { 0.0 }
    }
}

/// A weighted sum of rewards.
pub struct Rewards(Vec<(f64, Box<dyn Reward>)>);

impl Rewards {
    pub fn from_config(configs: &[RewardConfig]) -> Self {
        Self(
            configs
                .iter()
                .map(|c| {
                    let reward: Box<dyn Reward> = match c.kind {
                        RewardKind::RougeL => Box::new(RougeL),
                        RewardKind::Verifier => Box::new(Verifier),
                        RewardKind::Length => Box::new(LengthWindow {
                            min_chars: c.min_chars.expect("validated"),
                            max_chars: c.max_chars.expect("validated"),
                        }),
                    };
                    (c.weight, reward)
                })
                .collect(),
        )
    }

    /// Adds a custom reward (library users plug their own in).
    pub fn with(mut self, weight: f64, reward: Box<dyn Reward>) -> Self {
        self.0.push((weight, reward));
        self
    }

    pub fn score(&self, record: &PromptReply, reply: &str) -> f64 {
        self.0.iter().map(|(w, r)| w * r.score(record, reply)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reply: &str, answers: &[&str]) -> PromptReply {
        PromptReply { prompt: "p".into(), reply: reply.into(), answers: answers.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn rouge_l_f1_of_known_pairs() {
        assert_eq!(rouge_l_f1("the cat sat", "the cat sat"), 1.0);
        // LCS "the cat" = 2: precision 2/3, recall 2/4, F1 = 4/7.
        assert!((rouge_l_f1("the cat sat", "the big cat ran") - 4.0 / 7.0).abs() < 1e-12);
        assert_eq!(rouge_l_f1("", "x"), 0.0);
        assert_eq!(rouge_l_f1("a", "b"), 0.0);
    }

    #[test]
    fn verifier_length_and_weighted_sum() {
        let r = record("bear", &["bear", "bee", "bison"]);
        assert_eq!(Verifier.score(&r, " bee "), 1.0);
        assert_eq!(Verifier.score(&r, "cat"), 0.0);
        assert_eq!(Verifier.score(&record("60", &[]), "60"), 1.0);
        let window = LengthWindow { min_chars: 2, max_chars: 4 };
        assert_eq!(window.score(&r, "abc"), 1.0);
        assert_eq!(window.score(&r, "abcde"), 0.0);
        let sum = Rewards(vec![(2.0, Box::new(Verifier)), (0.5, Box::new(window))]);
        assert_eq!(sum.score(&r, "bee"), 2.5);
        assert_eq!(sum.score(&r, "catfish"), 0.0);
    }
}
