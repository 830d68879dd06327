//! Reading corpora: plain text for next-token LM, JSONL prompt/reply or chat records for
//! supervised fine-tuning (loss on reply tokens only), and the train/validation split.

use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::chat::{ASSISTANT, ChatMessage};
use crate::rng::{Stream, derive_seed, permutation};

/// One record from a JSONL file: `{"prompt", "reply"}`, or `{"messages": [{"role",
/// "content"}, …]}` whose last message is the assistant's reply.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptReply {
    /// The prompt (for a chat record, the last message before the reply).
    pub prompt: String,
    /// The reference reply (for a chat record, the last message's content).
    pub reply: String,
    /// Every reply a verifier accepts (tasks with many right answers); empty means only
    /// `reply` is right.
    #[serde(default)]
    pub answers: Vec<String>,
    /// A chat record's whole conversation; empty for prompt/reply records.
    #[serde(skip)]
    pub messages: Vec<ChatMessage>,
}

/// The JSONL shape of a chat record.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRecord {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    answers: Vec<String>,
}

impl PromptReply {
    fn parse(line: &str) -> std::result::Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        if value.get("messages").is_none() {
            return serde_json::from_value(value).map_err(|e| e.to_string());
        }
        let ChatRecord { messages, answers } = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let Some((last, earlier)) = messages.split_last().filter(|(last, _)| last.role == ASSISTANT) else {
            return Err("a chat record's last message must be the assistant's reply".into());
        };
        let prompt = earlier.last().map_or(String::new(), |m| m.content.clone());
        Ok(Self { prompt, reply: last.content.clone(), answers, messages })
    }

    /// The record as a conversation: its messages, or the prompt as a user turn and the reply
    /// as the assistant's.
    pub fn conversation(&self) -> Vec<ChatMessage> {
        if self.messages.is_empty() {
            vec![ChatMessage::new("user", &self.prompt), ChatMessage::new(ASSISTANT, &self.reply)]
        } else {
            self.messages.clone()
        }
    }
}

/// JSONL records read from one file, with how many bad lines were skipped.
#[derive(Debug, Clone)]
pub struct JsonlRecords {
    pub records: Vec<PromptReply>,
    pub skipped_lines: usize,
}

pub fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read corpus {}", path.display()))?;
    if text.trim().is_empty() {
        bail!("corpus {} is empty", path.display());
    }
    Ok(text)
}

/// Parses JSONL `{"prompt": ..., "reply": ...}` or `{"messages": [...]}` lines. A bad line is an error naming
/// `file:line`, unless `skip_bad_lines`, which skips and counts it. Blank lines are ignored.
pub fn read_jsonl(path: &Path, skip_bad_lines: bool) -> Result<JsonlRecords> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read corpus {}", path.display()))?;
    let mut records = Vec::new();
    let mut skipped_lines = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match PromptReply::parse(line) {
            Ok(r) => records.push(r),
            Err(_) if skip_bad_lines => skipped_lines += 1,
            Err(e) => bail!(
                "{}:{}: bad JSONL record ({e}); expected {{\"prompt\": ..., \"reply\": ...}} or \
                 {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}} (set data.skip_bad_lines: true \
                 to skip such lines)",
                path.display(),
                i + 1
            ),
        }
    }
    if records.is_empty() {
        bail!("{}: no usable prompt/reply records", path.display());
    }
    Ok(JsonlRecords { records, skipped_lines })
}

/// A record's token sequence and the token ranges the loss covers: the reply, or every
/// assistant turn of a conversation. The last range is the reply; what precedes it is the
/// prompt a sampling objective or evaluation generates from.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// Tokens predicted with loss, in order; tokens outside them are context only.
    pub loss_spans: Vec<Range<usize>>,
    /// The JSONL record it came from (rewards and evaluation need its texts).
    pub record: Option<std::sync::Arc<PromptReply>>,
}

impl Example {
    /// Where the reply (the last loss span) starts.
    pub fn prompt_len(&self) -> usize {
        self.loss_spans.last().map_or(self.tokens.len(), |s| s.start)
    }

    /// The prompt's tokens.
    pub fn prompt_tokens(&self) -> &[u32] {
        &self.tokens[..self.prompt_len()]
    }
}

/// A tokenized corpus, ready for batching.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenCorpus {
    /// One long token stream, cut into windows.
    Stream(Vec<u32>),
    /// Separate examples, each its own sequence.
    Examples(Vec<Example>),
}

impl TokenCorpus {
    pub fn token_count(&self) -> usize {
        match self {
            TokenCorpus::Stream(t) => t.len(),
            TokenCorpus::Examples(e) => e.iter().map(|e| e.tokens.len()).sum(),
        }
    }
}

/// Splits off a validation part that never overlaps the training part: the tail of a text
/// stream (as nanoGPT does), or a seed-determined subset of the examples.
pub fn split(corpus: TokenCorpus, validation_fraction: f64, seed: u64) -> Result<(TokenCorpus, TokenCorpus)> {
    match corpus {
        TokenCorpus::Stream(tokens) => {
            let n_val = ((tokens.len() as f64) * validation_fraction).round() as usize;
            if n_val < 2 || n_val + 2 > tokens.len() {
                bail!(
                    "corpus of {} tokens is too small to hold out a validation_fraction of {validation_fraction}",
                    tokens.len()
                );
            }
            let cut = tokens.len() - n_val;
            Ok((TokenCorpus::Stream(tokens[..cut].to_vec()), TokenCorpus::Stream(tokens[cut..].to_vec())))
        }
        TokenCorpus::Examples(examples) => {
            let n = examples.len();
            let n_val = ((n as f64) * validation_fraction).round().max(1.0) as usize;
            if n_val >= n {
                bail!("{n} examples are too few to hold out a validation_fraction of {validation_fraction}");
            }
            let order = permutation(n, derive_seed(seed, Stream::Split, 0));
            let mut is_val = vec![false; n];
            for &i in &order[..n_val] {
                is_val[i] = true;
            }
            let (mut train, mut val) = (Vec::new(), Vec::new());
            for (ex, v) in examples.into_iter().zip(is_val) {
                if v { val.push(ex) } else { train.push(ex) }
            }
            Ok((TokenCorpus::Examples(train), TokenCorpus::Examples(val)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_tmp(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f
    }

    #[test]
    fn bad_jsonl_line_names_file_and_line() {
        let f = write_tmp("{\"prompt\": \"a\", \"reply\": \"b\"}\n\nnot json\n");
        let e = read_jsonl(f.path(), false).unwrap_err().to_string();
        assert!(e.contains(&format!("{}:3:", f.path().display())), "{e}");
        let ok = read_jsonl(f.path(), true).unwrap();
        assert_eq!(ok.records.len(), 1);
        assert_eq!(ok.skipped_lines, 1);
    }

    #[test]
    fn chat_records_keep_their_conversation_and_must_end_with_the_reply() {
        let f = write_tmp(concat!(
            r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answers": ["a", "b"]}"#,
            "\n",
            r#"{"prompt": "p", "reply": "r"}"#,
            "\n"
        ));
        let r = read_jsonl(f.path(), false).unwrap().records;
        assert_eq!((r[0].prompt.as_str(), r[0].reply.as_str(), r[0].answers.len()), ("q", "a", 2));
        assert_eq!(r[0].conversation().len(), 3);
        assert_eq!(r[1].conversation(), [ChatMessage::new("user", "p"), ChatMessage::new(ASSISTANT, "r")]);
        let f = write_tmp("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n");
        let e = read_jsonl(f.path(), false).unwrap_err().to_string();
        assert!(e.contains(":1:") && e.contains("last message"), "{e}");
        let f = write_tmp("{\"messages\": [{\"role\": \"user\", \"text\": \"q\"}]}\n");
        let e = read_jsonl(f.path(), false).unwrap_err().to_string();
        assert!(e.contains(":1:") && e.contains("text"), "{e}");
    }

    #[test]
    fn missing_field_is_a_bad_line() {
        let f = write_tmp("{\"prompt\": \"a\"}\n");
        let e = read_jsonl(f.path(), false).unwrap_err().to_string();
        assert!(e.contains(":1:") && e.contains("reply"), "{e}");
    }

    #[test]
    fn stream_split_is_disjoint_and_complete() {
        let tokens: Vec<u32> = (0..1000).collect();
        let (TokenCorpus::Stream(t), TokenCorpus::Stream(v)) =
            split(TokenCorpus::Stream(tokens.clone()), 0.1, 1).unwrap()
        else {
            panic!()
        };
        assert_eq!(v.len(), 100);
        assert_eq!([t, v].concat(), tokens);
    }

    #[test]
    fn example_split_is_disjoint_seeded_and_complete() {
        let examples: Vec<Example> =
            (0..200).map(|i| Example { tokens: vec![i], loss_spans: vec![0..1], record: None }).collect();
        let run = |seed| match split(TokenCorpus::Examples(examples.clone()), 0.25, seed).unwrap() {
            (TokenCorpus::Examples(t), TokenCorpus::Examples(v)) => (t, v),
            _ => panic!(),
        };
        let (t, v) = run(3);
        assert_eq!(v.len(), 50);
        let mut ids: Vec<u32> = t.iter().chain(&v).map(|e| e.tokens[0]).collect();
        let val_ids: Vec<u32> = v.iter().map(|e| e.tokens[0]).collect();
        assert!(t.iter().all(|e| !val_ids.contains(&e.tokens[0])));
        ids.sort();
        assert_eq!(ids, (0..200).collect::<Vec<_>>());
        assert_eq!(run(3).1, v);
        assert_ne!(run(4).1, v);
    }
}
