//! Turning a tokenized corpus into batches. The sample order is a pure function of the seed
//! and the global sample index, so the data cursor is just a number and resume is exact.

use std::ops::Range;

use anyhow::{Result, bail};

use super::corpus::{Example, TokenCorpus};
use crate::rng::{Stream, derive_seed, permutation};

/// One micro-batch as flat row-major buffers of shape `[batch_size, seq_len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    /// 1.0 where the target counts towards the loss (reply tokens, real positions), else 0.0.
    pub loss_mask: Vec<f32>,
    pub batch_size: usize,
    pub seq_len: usize,
}

impl Batch {
    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m > 0.0).count()
    }

    /// Loss positions per row.
    pub fn loss_tokens_per_row(&self) -> Vec<usize> {
        self.loss_mask.chunks(self.seq_len).map(|row| row.iter().filter(|&&m| m > 0.0).count()).collect()
    }

    /// Right-padded teacher-forcing rows from sequences of at most context + 1 tokens each
    /// ([`fit_to_context`]) with the token ranges the loss covers: inputs are `tokens[..n-1]`,
    /// targets `tokens[1..]`, and a target counts when its token lies in one of the ranges.
    pub fn pack(samples: &[LossSequence]) -> Batch {
        let batch_size = samples.len();
        let seq_len = samples.iter().map(|s| s.tokens.len().saturating_sub(1)).max().unwrap_or(0).max(1);
        let mut batch = Batch {
            inputs: vec![0; batch_size * seq_len],
            targets: vec![0; batch_size * seq_len],
            loss_mask: vec![0.0; batch_size * seq_len],
            batch_size,
            seq_len,
        };
        for (row, LossSequence { tokens, loss_spans }) in samples.iter().enumerate() {
            for t in 0..tokens.len().saturating_sub(1) {
                let at = row * seq_len + t;
                batch.inputs[at] = tokens[t] as i64;
                batch.targets[at] = tokens[t + 1] as i64;
            }
            // Position t predicts token t+1.
            for span in loss_spans {
                for t in span.start.max(1)..span.end.min(tokens.len()) {
                    batch.loss_mask[row * seq_len + t - 1] = 1.0;
                }
            }
        }
        batch
    }
}

/// A token sequence with the ranges of it the loss covers (a row of a [`Batch`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LossSequence {
    pub tokens: Vec<u32>,
    pub loss_spans: Vec<Range<usize>>,
}

/// A sequence cut to `context + 1` tokens: too long, it loses prompt tokens (those before the
/// last loss span, the reply) from the left first, keeping at least one, then the reply's end.
/// The spans move with the tokens; parts cut off are dropped.
pub fn fit_to_context(tokens: &[u32], loss_spans: &[Range<usize>], context: usize) -> LossSequence {
    let prompt_len = loss_spans.last().map_or(0, |s| s.start);
    let drop = tokens.len().saturating_sub(context + 1).min(prompt_len.saturating_sub(1));
    let tokens = &tokens[drop..];
    let kept = tokens.len().min(context + 1);
    let loss_spans = loss_spans
        .iter()
        .map(|s| s.start.saturating_sub(drop)..s.end.saturating_sub(drop).min(kept))
        .filter(|s| !s.is_empty())
        .collect();
    LossSequence { tokens: tokens[..kept].to_vec(), loss_spans }
}

/// Where the training stream is: derived from the number of samples consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataCursor {
    pub samples_seen: u64,
    pub epoch: u64,
    pub position: u64,
}

pub struct SampleSource {
    corpus: TokenCorpus,
    context: usize,
    seed: u64,
    /// Training data is reshuffled each epoch; evaluation data is read in order.
    shuffle: bool,
    /// Largest start offset of text windows (varies per epoch so windows don't repeat).
    max_offset: usize,
    per_epoch: usize,
    epoch_order: Option<(u64, Vec<usize>)>,
}

impl SampleSource {
    pub fn new(corpus: TokenCorpus, context: usize, seed: u64, shuffle: bool) -> Result<Self> {
        let (max_offset, per_epoch) = match &corpus {
            TokenCorpus::Stream(tokens) => {
                let need = context + 1;
                if tokens.len() < need {
                    bail!(
                        "text split has {} tokens, fewer than context_length + 1 = {need}; \
                         use more data or a shorter model.context_length",
                        tokens.len()
                    );
                }
                let max_offset = if shuffle { (context - 1).min(tokens.len() - need) } else { 0 };
                (max_offset, (tokens.len() - need - max_offset) / context + 1)
            }
            TokenCorpus::Examples(examples) => {
                if examples.is_empty() {
                    bail!("no examples in this split");
                }
                (0, examples.len())
            }
        };
        Ok(Self { corpus, context, seed, shuffle, max_offset, per_epoch, epoch_order: None })
    }

    pub fn samples_per_epoch(&self) -> usize {
        self.per_epoch
    }

    pub fn cursor(&self, samples_seen: u64) -> DataCursor {
        let per_epoch = self.per_epoch as u64;
        DataCursor { samples_seen, epoch: samples_seen / per_epoch, position: samples_seen % per_epoch }
    }

    fn order(&mut self, epoch: u64) -> &[usize] {
        if self.epoch_order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let order = if self.shuffle {
                permutation(self.per_epoch, derive_seed(self.seed, Stream::Shuffle, epoch))
            } else {
                (0..self.per_epoch).collect()
            };
            self.epoch_order = Some((epoch, order));
        }
        &self.epoch_order.as_ref().expect("just filled").1
    }

    /// Tokens of the `index`-th sample of the (endless, epoch-after-epoch) stream and the
    /// ranges its loss covers.
    fn sample(&mut self, index: u64) -> LossSequence {
        let DataCursor { epoch, position, .. } = self.cursor(index);
        let slot = self.order(epoch)[position as usize];
        let context = self.context;
        match &self.corpus {
            TokenCorpus::Stream(tokens) => {
                let offset = if self.max_offset == 0 {
                    0
                } else {
                    (derive_seed(self.seed, Stream::WindowOffset, epoch) % (self.max_offset as u64 + 1)) as usize
                };
                let start = offset + slot * context;
                LossSequence { tokens: tokens[start..start + context + 1].to_vec(), loss_spans: vec![0..context + 1] }
            }
            TokenCorpus::Examples(examples) => {
                let ex = &examples[slot];
                fit_to_context(&ex.tokens, &ex.loss_spans, context)
            }
        }
    }

    /// The `index`-th example of the (endless, epoch-after-epoch) stream, for objectives that
    /// sample replies to its prompt; `None` for plain text.
    pub fn example(&mut self, index: u64) -> Option<Example> {
        let DataCursor { epoch, position, .. } = self.cursor(index);
        let slot = self.order(epoch)[position as usize];
        match &self.corpus {
            TokenCorpus::Examples(examples) => Some(examples[slot].clone()),
            TokenCorpus::Stream(_) => None,
        }
    }

    /// All examples in file order (empty for plain text).
    pub fn examples(&self) -> &[Example] {
        match &self.corpus {
            TokenCorpus::Examples(examples) => examples,
            TokenCorpus::Stream(_) => &[],
        }
    }

    /// `batch_size` consecutive samples starting at global sample index `first`.
    pub fn batch(&mut self, first: u64, batch_size: usize) -> Batch {
        let samples: Vec<LossSequence> = (0..batch_size as u64).map(|i| self.sample(first + i)).collect();
        Batch::pack(&samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_shifted_targets_and_reproducible() {
        let tokens: Vec<u32> = (0..100).collect();
        let mut a = SampleSource::new(TokenCorpus::Stream(tokens.clone()), 8, 1, true).unwrap();
        let mut b = SampleSource::new(TokenCorpus::Stream(tokens), 8, 1, true).unwrap();
        let batch = a.batch(5, 3);
        assert_eq!(batch, b.batch(5, 3));
        assert_eq!(batch.seq_len, 8);
        for (x, y) in batch.inputs.iter().zip(&batch.targets) {
            assert_eq!(x + 1, *y);
        }
        assert_eq!(batch.loss_tokens(), 24);
    }

    #[test]
    fn an_epoch_visits_every_window_once() {
        let tokens: Vec<u32> = (0..1000).collect();
        let mut s = SampleSource::new(TokenCorpus::Stream(tokens), 10, 9, true).unwrap();
        let n = s.samples_per_epoch() as u64;
        let firsts: std::collections::BTreeSet<i64> = (0..n).map(|i| s.batch(n + i, 1).inputs[0]).collect();
        assert_eq!(firsts.len() as u64, n);
    }

    #[test]
    fn prompt_positions_carry_no_loss_and_padding_is_masked() {
        let ex = |p: Vec<u32>, r: Vec<u32>| Example { loss_spans: vec![p.len()..p.len() + r.len()], tokens: [p, r].concat(), record: None };
        let corpus = TokenCorpus::Examples(vec![ex(vec![1, 2, 3], vec![4, 5]), ex(vec![6], vec![7])]);
        let mut s = SampleSource::new(corpus, 16, 0, false).unwrap();
        let b = s.batch(0, 2);
        assert_eq!(b.seq_len, 4);
        // Row 0: inputs 1 2 3 4 → targets 2 3 4 5; loss on predicting 4 and 5.
        assert_eq!(&b.targets[..4], &[2, 3, 4, 5]);
        assert_eq!(&b.loss_mask[..4], &[0.0, 0.0, 1.0, 1.0]);
        // Row 1: input 6 → target 7, then padding.
        assert_eq!(&b.loss_mask[4..], &[1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn long_examples_keep_the_reply() {
        let corpus = TokenCorpus::Examples(vec![Example { tokens: (0..20).collect(), loss_spans: vec![15..20], record: None }]);
        let mut s = SampleSource::new(corpus, 8, 0, false).unwrap();
        let b = s.batch(0, 1);
        assert_eq!(b.targets.last(), Some(&19));
        assert_eq!(b.loss_tokens(), 5);
    }

    #[test]
    fn every_assistant_turn_carries_loss_and_cut_turns_lose_theirs() {
        // prompt 0..3, turn 3..5, user 5..7, turn 7..10
        let spans = vec![3..5, 7..10];
        let b = Batch::pack(&[fit_to_context(&(0..10).collect::<Vec<u32>>(), &spans, 16)]);
        // Position t predicts token t+1: positions 2, 3 (tokens 3, 4) and 6, 7, 8.
        assert_eq!(b.loss_mask, [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        // A context of 5 drops the first 4 tokens: the first turn keeps only token 4, which
        // position 0 cannot predict (nothing before it).
        let cut = fit_to_context(&(0..10).collect::<Vec<u32>>(), &spans, 5);
        assert_eq!(cut.tokens, (4..10).collect::<Vec<u32>>());
        assert_eq!(cut.loss_spans, [0..1, 3..6]);
        assert_eq!(Batch::pack(&[cut]).loss_mask, [0.0, 0.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn too_short_corpus_is_a_clear_error() {
        let e = SampleSource::new(TokenCorpus::Stream(vec![1, 2]), 8, 0, true).err().unwrap();
        assert!(e.to_string().contains("context_length"));
    }
}
