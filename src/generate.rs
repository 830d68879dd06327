//! Text generation from a trained run: greedy, temperature, top-k and top-p sampling.

use anyhow::{Result, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::model::{ForwardContext, Gpt};
use crate::rng::SplitMix64;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingOptions {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = all).
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Stop when this token is produced (it is not returned).
    pub stop_token: Option<u32>,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 200, stop_token: None, seed: 0 }
    }
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be >= 0 (0 is greedy), got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// Picks a token id from one row of logits.
pub fn sample_token(logits: &[f32], o: &SamplingOptions, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &l)| if l > best.1 { (i, l) } else { best }).0
    };
    if o.temperature == 0.0 {
        return argmax() as u32;
    }
    let mut candidates: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, l as f64 / o.temperature)).collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    if o.top_k > 0 {
        candidates.truncate(o.top_k);
    }
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if o.top_p < 1.0 {
        let mut mass = 0.0;
        let keep = probs.iter().position(|p| {
            mass += p;
            mass >= o.top_p
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        candidates.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return candidates[i].0 as u32;
        }
        u -= p;
    }
    candidates[probs.len() - 1].0 as u32
}

/// Continues `prompt` token by token; returns the new tokens only. The model sees at most
/// its context length (the oldest tokens slide out). `context` carries the checkpoint's step.
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    o: &SamplingOptions,
    context: &ForwardContext,
    device: &Device,
) -> Result<Vec<u32>> {
    o.validate()?;
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let mut rng = SplitMix64::new(o.seed);
    let mut tokens: Vec<u32> = prompt.to_vec();
    let mut new = Vec::new();
    for _ in 0..o.max_new_tokens {
        let window = &tokens[tokens.len().saturating_sub(model.context_length())..];
        let ids: Vec<i64> = window.iter().map(|&t| t as i64).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, window.len()]), device);
        let logits = model.forward(input, context);
        let [_, seq, vocab] = logits.dims();
        let last = logits.slice([0..1, seq - 1..seq, 0..vocab]).into_data().convert::<f32>();
        let next = sample_token(last.as_slice::<f32>().expect("f32 logits"), o, &mut rng);
        if Some(next) == o.stop_token {
            break;
        }
        tokens.push(next);
        new.push(next);
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p_restrict_choices() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = SplitMix64::new(1);
        let greedy = SamplingOptions { temperature: 0.0, ..Default::default() };
        assert_eq!(sample_token(&logits, &greedy, &mut rng), 1);
        let top2 = SamplingOptions { top_k: 2, ..Default::default() };
        let nucleus = SamplingOptions { top_p: 0.4, ..Default::default() };
        for _ in 0..200 {
            assert!([1, 3].contains(&sample_token(&logits, &top2, &mut rng)));
            assert_eq!(sample_token(&logits, &nucleus, &mut rng), 1);
        }
        let all = SamplingOptions::default();
        let seen: std::collections::BTreeSet<u32> = (0..500).map(|_| sample_token(&logits, &all, &mut rng)).collect();
        assert_eq!(seen.len(), 4);
    }
}
