//! Text generation: N replies per prompt in one batch over a KV cache; greedy, temperature,
//! top-k and top-p sampling.

use anyhow::{Result, bail};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::model::transformer::{KvCache, Positions};
use crate::model::{ForwardContext, Gpt};
use crate::rng::{SplitMix64, Stream, derive_seed};

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
    /// A run's `objective.sampling` (training and `eval`), stopping at `stop_token`.
    pub fn from_config(c: &crate::config::SamplingConfig, stop_token: Option<u32>, seed: u64) -> Self {
        Self { temperature: c.temperature, top_k: c.top_k, top_p: c.top_p, max_new_tokens: c.max_new_tokens, stop_token, seed }
    }

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
    let restricted = (o.top_k > 0 && o.top_k < logits.len()) || o.top_p < 1.0;
    if !restricted {
        // The whole vocabulary in id order: no sort (a sort per token per row cost more
        // than the model's decode step at vocab 8192).
        let max = logits[argmax()] as f64;
        let weights: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / o.temperature).exp()).collect();
        let u = rng.next_f64() * weights.iter().sum::<f64>();
        return pick(&weights, u).unwrap_or_else(argmax) as u32;
    }
    let mut candidates: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, l as f64 / o.temperature)).collect();
    let by_logit = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if o.top_k > 0 && o.top_k < candidates.len() {
        // Only the k best need ordering.
        candidates.select_nth_unstable_by(o.top_k - 1, by_logit);
        candidates.truncate(o.top_k);
    }
    candidates.sort_by(by_logit);
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
    let i = pick(&probs, rng.next_f64()).unwrap_or(probs.len() - 1);
    candidates[i].0 as u32
}

/// The index at which the running sum of `weights` first exceeds `u` (`u` drawn uniformly
/// below their total), or `None` when rounding leaves `u` past the end.
fn pick(weights: &[f64], mut u: f64) -> Option<usize> {
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return Some(i);
        }
        u -= w;
    }
    None
}

/// How the next token's logits are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decoding {
    /// Keys and values of earlier tokens stay in a preallocated [`KvCache`]; each step runs
    /// one token per sequence.
    #[default]
    KvCache,
    /// Every step runs the whole sequence again (the baseline `bench generate` compares with).
    Recompute,
}

/// `n` continuations of each prompt, sampled in one batch of `prompts.len() × n` sequences.
/// Returns the new tokens, `[prompt][reply]`; a reply ends before `stop_token` or after
/// `max_new_tokens`. Prompts may differ in length (they are left-padded). Each sequence
/// draws from its own seeded stream, so results do not depend on batch composition.
/// Past the context length the window restarts from the last half of each sequence.
pub fn generate_batch(
    model: &Gpt,
    prompts: &[Vec<u32>],
    n: usize,
    o: &SamplingOptions,
    context: &ForwardContext,
    decoding: Decoding,
    device: &Device,
) -> Result<Vec<Vec<Vec<u32>>>> {
    o.validate()?;
    if n == 0 {
        bail!("the number of replies per prompt must be at least 1");
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} is empty after tokenization");
    }
    let rows = prompts.len() * n;
    let window = model.context_length();
    let mut sequences: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), n)).collect();
    let mut replies: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut done = vec![false; rows];
    let mut rngs: Vec<SplitMix64> =
        (0..rows).map(|r| SplitMix64::new(derive_seed(o.seed, Stream::Sampling, r as u64))).collect();
    if rows == 0 || o.max_new_tokens == 0 {
        return Ok(vec![vec![Vec::new(); n]; prompts.len()]);
    }

    // Prefill each distinct prompt once, then share its cache among its n replies.
    let tails: Vec<&[u32]> = prompts.iter().map(|p| &p[p.len().saturating_sub(window - 1)..]).collect();
    let (mut state, mut logits) = Prefill::run(model, &tails, window, context, device);
    if n > 1 {
        state.cache = state.cache.repeat_rows(n);
        state.pads = state.pads.iter().flat_map(|&p| std::iter::repeat_n(p, n)).collect();
        logits = logits.iter().flat_map(|l| std::iter::repeat_n(l.clone(), n)).collect();
    }

    for step in 0..o.max_new_tokens {
        let mut last = Vec::with_capacity(rows);
        for r in 0..rows {
            if !done[r] {
                let next = sample_token(&logits[r], o, &mut rngs[r]);
                if Some(next) == o.stop_token {
                    done[r] = true;
                } else {
                    sequences[r].push(next);
                    replies[r].push(next);
                }
            }
            last.push(*sequences[r].last().expect("prompts are not empty"));
        }
        if step + 1 == o.max_new_tokens || done.iter().all(|&d| d) {
            break;
        }
        logits = if decoding == Decoding::Recompute || state.cache.len() == state.cache.capacity() {
            let keep = if decoding == Decoding::Recompute { window } else { window / 2 };
            let tails: Vec<&[u32]> = sequences.iter().map(|s| &s[s.len().saturating_sub(keep)..]).collect();
            let (fresh, logits) = Prefill::run(model, &tails, window, context, device);
            state = fresh;
            logits
        } else {
            state.decode(model, &last, context, device)
        };
    }
    Ok(replies.chunks(n).map(|c| c.to_vec()).collect())
}

/// A KV cache over left-padded sequences: `pads[r]` slots of padding precede row `r`.
struct Prefill {
    cache: KvCache,
    pads: Vec<usize>,
}

impl Prefill {
    /// Runs the (left-padded) `rows` into a fresh cache; returns each row's next-token logits.
    fn run(model: &Gpt, rows: &[&[u32]], capacity: usize, context: &ForwardContext, device: &Device) -> (Self, Vec<Vec<f32>>) {
        let batch = rows.len();
        let len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let pads: Vec<usize> = rows.iter().map(|r| len - r.len()).collect();
        let mut ids = Vec::with_capacity(batch * len);
        let mut positions = Vec::with_capacity(batch * len);
        for (r, row) in rows.iter().enumerate() {
            let pad = pads[r];
            ids.extend(std::iter::repeat_n(0i64, pad).chain(row.iter().map(|&t| t as i64)));
            positions.extend((0..len).map(|j| j.saturating_sub(pad)));
        }
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, len]), device);
        let positions = Positions::per_row(positions, batch, len);
        let mut cache = model.new_cache(batch, capacity, device);
        // Padding queries see no key and output 0; nothing reads them.
        let logits = model.forward_cached(tokens, &positions, padding_mask(&pads, len, device), &mut cache, context);
        (Self { cache, pads }, last_logits(logits))
    }

    /// Appends one token per row; returns each row's next-token logits.
    fn decode(&mut self, model: &Gpt, tokens: &[u32], context: &ForwardContext, device: &Device) -> Vec<Vec<f32>> {
        let batch = tokens.len();
        let slot = self.cache.len();
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let positions = Positions::per_row(self.pads.iter().map(|&p| slot - p).collect(), batch, 1);
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, 1]), device);
        let padding = padding_mask(&self.pads, slot + 1, device);
        last_logits(model.forward_cached(tokens, &positions, padding, &mut self.cache, context))
    }
}

/// `[rows, keys]`, `true` on each row's `pads[r]` leading padding slots.
fn padding_mask(pads: &[usize], keys: usize, device: &Device) -> Tensor<2, Bool> {
    let hidden: Vec<bool> = pads.iter().flat_map(|&p| (0..keys).map(move |j| j < p)).collect();
    Tensor::<2, Bool>::from_data(TensorData::new(hidden, [pads.len(), keys]), device)
}

/// The last position's logits of each row of `[batch, seq, vocab]`, on the host.
fn last_logits(logits: Tensor<3>) -> Vec<Vec<f32>> {
    let [batch, seq, vocab] = logits.dims();
    let last = logits.narrow(1, seq - 1, 1).into_data().convert::<f32>();
    let values = last.as_slice::<f32>().expect("f32 logits");
    (0..batch).map(|b| values[b * vocab..(b + 1) * vocab].to_vec()).collect()
}

/// Continues one prompt; returns the new tokens only (see [`generate_batch`]).
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    o: &SamplingOptions,
    context: &ForwardContext,
    device: &Device,
) -> Result<Vec<u32>> {
    let mut replies = generate_batch(model, &[prompt.to_vec()], 1, o, context, Decoding::KvCache, device)?;
    Ok(replies.remove(0).remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::GptConfig;

    fn model(llama: bool) -> (Gpt, Device) {
        let device = Device::flex();
        device.seed(7);
        let model = GptConfig::tiny_for_tests(19, llama).init(&device);
        crate::model::initialize_parameters(&model);
        (model, device)
    }

    fn greedy(max_new_tokens: usize) -> SamplingOptions {
        SamplingOptions { temperature: 0.0, max_new_tokens, ..Default::default() }
    }

    #[test]
    fn cached_prefill_logits_match_the_full_forward_pass() {
        for (llama, ctx) in [false, true].into_iter().flat_map(|l| contexts().map(|c| (l, c))) {
            let (model, device) = model(llama);
            let prompts: Vec<&[u32]> = vec![&[3, 1, 4, 1, 5], &[9, 2]];
            let (_, cached) = Prefill::run(&model, &prompts, 24, &ctx, &device);
            for (prompt, cached) in prompts.iter().zip(cached) {
                let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
                let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, prompt.len()]), &device);
                let full = last_logits(model.forward(input, &ctx)).remove(0);
                for (a, b) in full.iter().zip(&cached) {
                    assert!((a - b).abs() < 1e-4, "llama={llama} {:?}: {a} vs {b}", ctx.attention);
                }
            }
        }
    }

    /// Both attention implementations: the fused kernel (inference's default) hides the left
    /// padding by key masks, as the reference does.
    fn contexts() -> [ForwardContext; 2] {
        use polyburn_kernels::attention::AttentionImpl;
        [AttentionImpl::Fused, AttentionImpl::Reference].map(|attention| ForwardContext { attention, ..ForwardContext::default() })
    }

    #[test]
    fn kv_cache_decoding_equals_recomputation_for_mixed_length_prompts() {
        for (llama, ctx) in [false, true].into_iter().flat_map(|l| contexts().map(|c| (l, c))) {
            let (model, device) = model(llama);
            let prompts = vec![vec![3, 1, 4, 1, 5, 9, 2], vec![6], vec![5, 3, 5]];
            let run = |d| generate_batch(&model, &prompts, 2, &greedy(12), &ctx, d, &device).unwrap();
            let cached = run(Decoding::KvCache);
            assert_eq!(cached, run(Decoding::Recompute), "llama={llama} {:?}", ctx.attention);
            assert!(cached.iter().all(|g| g.len() == 2 && g[0].len() == 12 && g[0] == g[1]));
            // Padding and batch-mates change nothing: each prompt alone gives the same reply.
            for (prompt, replies) in prompts.iter().zip(&cached) {
                let alone = generate(&model, prompt, &greedy(12), &ctx, &device).unwrap();
                assert_eq!(&alone, &replies[0], "llama={llama}");
            }
        }
    }

    #[test]
    fn sampling_is_seeded_per_sequence_and_stops_at_the_stop_token() {
        let (model, device) = model(false);
        let ctx = ForwardContext::default();
        let o = SamplingOptions { temperature: 1.5, max_new_tokens: 30, seed: 11, ..Default::default() };
        let prompts = vec![vec![1, 2, 3], vec![4]];
        let a = generate_batch(&model, &prompts, 4, &o, &ctx, Decoding::KvCache, &device).unwrap();
        assert_eq!(a, generate_batch(&model, &prompts, 4, &o, &ctx, Decoding::KvCache, &device).unwrap());
        let distinct: std::collections::BTreeSet<_> = a[0].iter().collect();
        assert!(distinct.len() > 1, "hot sampling gave 4 identical replies");
        // Past the 24-token context the window restarts; generation goes on.
        assert!(a.iter().flatten().all(|r| r.len() == 30));
        let stop = a[0][0][2];
        let stopped = SamplingOptions { stop_token: Some(stop), ..o };
        let b = generate_batch(&model, &prompts, 4, &stopped, &ctx, Decoding::KvCache, &device).unwrap();
        assert_eq!(b[0][0], a[0][0][..a[0][0].iter().position(|&t| t == stop).unwrap()]);
        assert!(b.iter().flatten().all(|r| !r.contains(&stop)));
    }

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

    /// Unrestricted sampling (no sort), top-k (partial selection) and top-p draw each token
    /// with its softmax(logits / T) probability, renormalised over the kept tokens.
    #[test]
    fn sampling_frequencies_follow_the_tempered_softmax() {
        let logits = [0.5f32, -1.0, 2.0, 1.0, 0.0];
        let draws = 40_000;
        let softmax = |t: f64, keep: &[usize]| {
            let w: Vec<f64> = keep.iter().map(|&i| (logits[i] as f64 / t).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut p = vec![0.0; logits.len()];
            keep.iter().zip(&w).for_each(|(&i, w)| p[i] = w / total);
            p
        };
        let all: Vec<usize> = (0..logits.len()).collect();
        for (o, want) in [
            (SamplingOptions { temperature: 1.0, ..Default::default() }, softmax(1.0, &all)),
            (SamplingOptions { temperature: 0.7, ..Default::default() }, softmax(0.7, &all)),
            (SamplingOptions { temperature: 1.3, top_k: 3, ..Default::default() }, softmax(1.3, &[2, 3, 0])),
            // Sorted 2 (0.56), 3 (0.21), 0 (0.13): the mass reaches 0.7 at the second.
            (SamplingOptions { temperature: 1.0, top_p: 0.7, ..Default::default() }, softmax(1.0, &[2, 3])),
        ] {
            let mut rng = SplitMix64::new(3);
            let mut counts = vec![0usize; logits.len()];
            for _ in 0..draws {
                counts[sample_token(&logits, &o, &mut rng) as usize] += 1;
            }
            for (i, (&c, p)) in counts.iter().zip(&want).enumerate() {
                let f = c as f64 / draws as f64;
                assert!((f - p).abs() < 0.01, "{o:?}: token {i} drawn {f:.4}, expected {p:.4}");
            }
        }
    }
}
