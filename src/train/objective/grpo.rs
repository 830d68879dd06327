//! `grpo`: M × N replies per prompt form one group; each reply's advantage is its reward
//! minus the group mean (÷ the group's std with `objective.normalize_advantage`).

use anyhow::Result;

use super::sampling::{group_advantages, policy_gradient_step, reward_spread_metrics, sample, score};
use super::{Loss, Objective, StepInput};

pub struct Grpo;

impl Objective for Grpo {
    fn loss(&self, mut input: StepInput) -> Result<Loss> {
        let (config, device) = (input.config, input.device);
        let ob = &config.objective;
        let group = ob.n_sets * ob.n_samples;
        let mut sampled = sample(&mut input, group)?;
        let tools = input.tools()?;
        let scored = score(tools, &sampled)?;
        // The group's diversity is logged (not trained on), for comparison with polychromic_rl.
        let diversities = tools.diversities(ob.diversity, &config.kernels, device, &sampled.replies, &scored.texts, &mut sampled.stats)?;
        let advantages: Vec<f64> = scored.rewards.iter().flat_map(|r| group_advantages(r, ob.normalize_advantage)).collect();
        sampled.stats.add("train/reward_mean", scored.mean_reward());
        reward_spread_metrics(&scored, &mut sampled.stats);
        sampled.stats.add("train/diversity", diversities.iter().sum::<f64>() / diversities.len() as f64);
        policy_gradient_step(&mut input, sampled, &advantages)
    }
}
