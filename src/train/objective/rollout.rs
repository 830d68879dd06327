//! Sample batches reused over `objective.num_iterations` (μ) optimizer updates, as GRPO's inner
//! iterations do: the first step of a cycle samples and scores the replies and records the
//! sampling policy's token log-probs; the next μ − 1 steps train on the same rows, so their
//! ratio to the sampling policy (and its clipping) is real. A cycle can span a checkpoint, so
//! the pending rollouts are saved with it ([`ROLLOUTS_FILE`]) and a resumed run trains on
//! exactly the replies it would have.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::sampling::ReplySample;

/// Checkpoint file holding the rollouts of a cycle that is not finished at the checkpoint.
pub const ROLLOUTS_FILE: &str = "rollouts.json";

/// One micro-batch's sampled replies, their advantages and the sampling policy's log-probs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The step that sampled it (the first of its cycle).
    pub sampled_at: u64,
    /// The micro-batch's first sample.
    pub first: u64,
    /// `(prompt, reply, ended with the end token)` per row, prompt by prompt.
    pub rows: Vec<(Vec<u32>, Vec<u32>, bool)>,
    pub eos: u32,
    /// Per row, in `rows` order.
    #[serde(with = "exact")]
    pub advantages: Vec<f64>,
    /// The sampling policy's log-prob of every target token, `[rows, len]` row-major (f32
    /// values); empty until the first update has computed it.
    #[serde(with = "exact")]
    pub old_logp: Vec<f64>,
    /// What sampling and scoring measured (rewards, diversity; no timings), logged again at
    /// every update of the cycle so each logged step shows the rewards it trained on.
    #[serde(with = "exact_named")]
    pub metrics: Vec<(&'static str, f64)>,
    pub samples: Vec<ReplySample>,
}

impl Rollout {
    pub fn rows(&self) -> Vec<(&[u32], &[u32], bool)> {
        self.rows.iter().map(|(p, r, s)| (p.as_slice(), r.as_slice(), *s)).collect()
    }
}

/// The rollouts of the cycle in progress (one per micro-batch).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollouts {
    pub pending: Vec<Rollout>,
}

impl Rollouts {
    /// The rollout sampled at `sampled_at` for the micro-batch starting at `first`.
    pub fn get(&self, sampled_at: u64, first: u64) -> Option<&Rollout> {
        self.pending.iter().find(|r| r.sampled_at == sampled_at && r.first == first)
    }

    /// Keeps `rollout`, dropping those of earlier cycles.
    pub fn keep(&mut self, rollout: Rollout) {
        self.pending.retain(|r| r.sampled_at == rollout.sampled_at && r.first != rollout.first);
        self.pending.push(rollout);
    }

    /// Those still needed by the steps from `next_step` on (the cycle that sampled at
    /// `batch_step`, when `next_step` is inside it).
    pub fn needed_from(&self, next_step: u64, batch_step: u64) -> Option<&Self> {
        (next_step != batch_step && self.pending.iter().any(|r| r.sampled_at == batch_step)).then_some(self)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::weights::write_file_synced(path, &serde_json::to_vec(self)?)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Floats as Rust's shortest round-trip decimal strings: JSON numbers parsed by serde_json's
/// default float parser may differ in the last bit, and resume must be exact.
mod exact {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[f64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(values.iter().map(|v| v.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Vec::<String>::deserialize(d)?.iter().map(|s| s.parse().map_err(serde::de::Error::custom)).collect()
    }
}

/// Named metrics, values as in [`exact`]; names are interned once each (metric names are a
/// small fixed set).
mod exact_named {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[(&'static str, f64)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(values.iter().map(|(n, v)| (n, v.to_string())))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(&'static str, f64)>, D::Error> {
        Vec::<(String, String)>::deserialize(d)?
            .into_iter()
            .map(|(n, v)| Ok((super::intern(&n), v.parse().map_err(serde::de::Error::custom)?)))
            .collect()
    }
}

fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollouts_survive_a_save_and_load_bit_for_bit() {
        let values = [0.1f64, -1.0 / 3.0, 1e-310, f64::MAX, (0.7f32).ln() as f64];
        let rollout = Rollout {
            sampled_at: 7,
            first: 21,
            rows: vec![(vec![1, 2], vec![3], true), (vec![1, 2], vec![], false)],
            eos: 2,
            advantages: values.to_vec(),
            old_logp: values.to_vec(),
            metrics: vec![("train/reward_mean", 1.0 / 7.0)],
            samples: vec![ReplySample { prompt: "p".into(), reply: "r".into(), reward: 0.5 }],
        };
        let rollouts = Rollouts { pending: vec![rollout] };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ROLLOUTS_FILE);
        rollouts.save(&path).unwrap();
        let back = Rollouts::load(&path).unwrap();
        assert_eq!(back, rollouts);
        let bits = |r: &Rollouts| r.pending[0].advantages.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&rollouts));
        assert!(back.get(7, 21).is_some() && back.get(7, 0).is_none() && back.get(9, 21).is_none());
        assert!(back.needed_from(8, 7).is_some(), "step 8 is inside the cycle sampled at 7");
        assert!(back.needed_from(7, 7).is_none() && back.needed_from(9, 9).is_none(), "a new cycle samples afresh");
    }
}
