//! `grpo`: M × N replies per prompt form one group; each reply's advantage is its reward
//! minus the group mean (divided as `objective.scale_rewards` says).

use anyhow::Result;

use super::sampling::{policy_gradient_step, scaled_advantages, reward_spread_metrics, sample, score};
use super::{Loss, Objective, StepInput};

pub struct Grpo;

impl Objective for Grpo {
    fn loss(&self, mut input: StepInput) -> Result<Loss> {
        policy_gradient_step(&mut input, |input| {
            let (config, device) = (input.config, input.device);
            let ob = &config.objective;
            let group = ob.n_sets * ob.n_samples;
            let mut sampled = sample(input, group)?;
            let tools = input.tools()?;
            let scored = score(tools, &sampled)?;
            sampled.stats.keep_samples(&sampled.examples, &scored);
            // The group's diversity is logged (not trained on), for comparison with polychromic_rl.
            let diversities = tools.diversities(ob.diversity, &config.kernels, device, &sampled.replies, &scored.texts, &mut sampled.stats)?;
            let advantages = scaled_advantages(&scored.rewards, ob.reward_scaling());
            sampled.stats.add("train/reward_mean", scored.mean_reward());
            reward_spread_metrics(&scored, &mut sampled.stats);
            sampled.stats.add("train/diversity", diversities.iter().sum::<f64>() / diversities.len() as f64);
            Ok((sampled, advantages))
        })
    }
}
