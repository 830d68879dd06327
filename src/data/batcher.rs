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
    /// Packed rows (`data.pack`): the document of each position, counted from 0 in each row
    /// (the padding after the last document is one more); positions restart at 0 and attention
    /// stays inside each document. `None`: one sequence per row.
    pub documents: Option<Vec<u32>>,
    /// Positions that hold a token (the rest is padding).
    pub filled: usize,
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
        let rows: Vec<&[LossSequence]> = samples.iter().map(std::slice::from_ref).collect();
        let mut batch = Self::fill(&rows);
        batch.documents = None;
        batch
    }

    /// Rows that each hold several sequences one after another ([`pack`](Self::pack) per
    /// sequence, targets never crossing into the next one), with their document ids.
    pub fn pack_documents(rows: &[Vec<LossSequence>]) -> Batch {
        let rows: Vec<&[LossSequence]> = rows.iter().map(Vec::as_slice).collect();
        Self::fill(&rows)
    }

    fn fill(rows: &[&[LossSequence]]) -> Batch {
        let positions = |s: &LossSequence| s.tokens.len().saturating_sub(1);
        let batch_size = rows.len();
        let seq_len = rows.iter().map(|r| r.iter().map(positions).sum::<usize>()).max().unwrap_or(0).max(1);
        let mut batch = Batch {
            inputs: vec![0; batch_size * seq_len],
            targets: vec![0; batch_size * seq_len],
            loss_mask: vec![0.0; batch_size * seq_len],
            batch_size,
            seq_len,
            documents: Some(vec![0; batch_size * seq_len]),
            filled: rows.iter().flat_map(|r| r.iter()).map(positions).sum(),
        };
        let documents = batch.documents.as_mut().expect("just set");
        for (row, sequences) in rows.iter().enumerate() {
            let mut start = row * seq_len;
            for (document, LossSequence { tokens, loss_spans }) in sequences.iter().enumerate() {
                for t in 0..tokens.len().saturating_sub(1) {
                    batch.inputs[start + t] = tokens[t] as i64;
                    batch.targets[start + t] = tokens[t + 1] as i64;
                    documents[start + t] = document as u32;
                }
                // Position t predicts token t+1.
                for span in loss_spans {
                    for t in span.start.max(1)..span.end.min(tokens.len()) {
                        batch.loss_mask[start + t - 1] = 1.0;
                    }
                }
                start += tokens.len().saturating_sub(1);
            }
            documents[start..(row + 1) * seq_len].fill(sequences.len() as u32);
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

#[derive(Clone)]
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
    /// `data.pack`: the examples of each packed row; samples are then rows.
    packed_rows: Option<Vec<Vec<usize>>>,
}

/// Packs sequences that use `lengths[i]` positions each into as few rows of `capacity`
/// positions as best-fit decreasing finds: longest first, each into the fullest row it still
/// fits, a new row when none has room. A pure function of the lengths, so a resumed run packs
/// exactly as the first start did. Each row lists its sequences in placement order.
pub fn pack_rows(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // Rows by free positions, then index (the earliest row wins a tie).
    let mut free: std::collections::BTreeSet<(usize, usize)> = std::collections::BTreeSet::new();
    for i in order {
        let need = lengths[i].min(capacity);
        match free.range((need, 0)..).next().copied() {
            Some((room, row)) => {
                free.remove(&(room, row));
                rows[row].push(i);
                free.insert((room - need, row));
            }
            None => {
                free.insert((capacity - need, rows.len()));
                rows.push(vec![i]);
            }
        }
    }
    rows
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
        Ok(Self { corpus, context, seed, shuffle, max_offset, per_epoch, epoch_order: None, packed_rows: None })
    }

    /// `data.pack`: several examples share each row of `context` positions ([`pack_rows`]),
    /// so batches carry no padding but each row's tail; samples (and the epoch) are then
    /// packed rows, shuffled per epoch like examples.
    pub fn with_packing(mut self) -> Result<Self> {
        let TokenCorpus::Examples(examples) = &self.corpus else {
            bail!("data.pack: packing joins JSONL records; plain text already fills every context window");
        };
        let lengths: Vec<usize> =
            examples.iter().map(|ex| fit_to_context(&ex.tokens, &ex.loss_spans, self.context).tokens.len().saturating_sub(1)).collect();
        let rows = pack_rows(&lengths, self.context);
        self.per_epoch = rows.len();
        self.epoch_order = None;
        self.packed_rows = Some(rows);
        Ok(self)
    }

    /// Share of the positions of packed rows that hold tokens (1.0 without packing).
    pub fn packing_fill(&self) -> f64 {
        let (Some(rows), TokenCorpus::Examples(examples)) = (&self.packed_rows, &self.corpus) else { return 1.0 };
        let used: usize = rows
            .iter()
            .flatten()
            .map(|&i| fit_to_context(&examples[i].tokens, &examples[i].loss_spans, self.context).tokens.len().saturating_sub(1))
            .sum();
        used as f64 / (rows.len() * self.context).max(1) as f64
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
    /// ranges its loss covers: one sequence, or a packed row's sequences.
    fn sample(&mut self, index: u64) -> Vec<LossSequence> {
        let DataCursor { epoch, position, .. } = self.cursor(index);
        let slot = self.order(epoch)[position as usize];
        let context = self.context;
        if let (Some(rows), TokenCorpus::Examples(examples)) = (&self.packed_rows, &self.corpus) {
            return rows[slot].iter().map(|&i| fit_to_context(&examples[i].tokens, &examples[i].loss_spans, context)).collect();
        }
        vec![match &self.corpus {
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
        }]
    }

    /// The `index`-th example of the (endless, epoch-after-epoch) stream, for objectives that
    /// sample replies to its prompt; `None` for plain text.
    pub fn example(&mut self, index: u64) -> Option<Example> {
        // Config validation keeps data.pack to the sft objective.
        assert!(self.packed_rows.is_none(), "packed samples are rows of several examples, not one");
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
        let rows: Vec<Vec<LossSequence>> = (0..batch_size as u64).map(|i| self.sample(first + i)).collect();
        match self.packed_rows {
            Some(_) => Batch::pack_documents(&rows),
            None => Batch::pack(&rows.into_iter().flatten().collect::<Vec<_>>()),
        }
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

    #[test]
    fn best_fit_decreasing_packs_every_sequence_once_within_capacity() {
        let lengths = [5, 5, 5, 3, 2, 9, 1, 12, 4];
        let rows = pack_rows(&lengths, 10);
        let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for row in &rows {
            assert!(row.iter().map(|&i| lengths[i].min(10)).sum::<usize>() <= 10, "{row:?}");
        }
        // 44 positions (12 capped at 10): five rows is the least possible.
        assert_eq!(rows.len(), 5, "{rows:?}");
        assert_eq!(rows, pack_rows(&lengths, 10));
    }

    #[test]
    fn packed_rows_keep_documents_apart() {
        let a = LossSequence { tokens: vec![1, 2, 3, 4], loss_spans: vec![2..4] };
        let b = LossSequence { tokens: vec![5, 6, 7], loss_spans: vec![1..3] };
        let c = LossSequence { tokens: vec![8, 9], loss_spans: vec![0..2] };
        let batch = Batch::pack_documents(&[vec![a, b], vec![c]]);
        assert_eq!(batch.seq_len, 5);
        assert_eq!(batch.inputs, [1, 2, 3, 5, 6, 8, 0, 0, 0, 0]);
        // No target crosses into the next document.
        assert_eq!(batch.targets, [2, 3, 4, 6, 7, 9, 0, 0, 0, 0]);
        assert_eq!(batch.loss_mask, [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // Padding is one more document.
        assert_eq!(batch.documents.as_deref(), Some(&[0, 0, 0, 1, 1, 0, 1, 1, 1, 1][..]));
        assert_eq!(batch.filled, 6);
    }

    #[test]
    fn a_packed_epoch_visits_every_example_once() {
        let examples: Vec<Example> =
            (0..40u32).map(|i| Example { tokens: (0..3 + i % 7).map(|t| (i + 1) * 100 + t).collect(), loss_spans: vec![1..3], record: None }).collect();
        let mut s = SampleSource::new(TokenCorpus::Examples(examples), 16, 4, true).unwrap().with_packing().unwrap();
        let rows = s.samples_per_epoch() as u64;
        assert!(rows < 40 / 2, "{rows} rows for 40 short examples");
        assert!(s.packing_fill() > 0.9, "fill {}", s.packing_fill());
        for epoch in 0..2 {
            let batch = s.batch(epoch * rows, rows as usize);
            // Each example's first input token is a multiple of 100 and unique to it (padding is 0).
            let mut starts: Vec<i64> = batch.inputs.iter().copied().filter(|&t| t > 0 && t % 100 == 0).collect();
            starts.sort();
            assert_eq!(starts, (1..=40).map(|i| i * 100).collect::<Vec<i64>>(), "epoch {epoch}");
        }
        let text = SampleSource::new(TokenCorpus::Stream((0..100).collect()), 8, 0, true).unwrap();
        assert!(text.with_packing().err().unwrap().to_string().contains("data.pack"));
    }
}
