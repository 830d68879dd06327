//! Corpora, tokenizers, splits and batches.

pub mod batcher;
pub mod corpus;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::config::{Config, DataFormat};
pub use batcher::{Batch, DataCursor, SampleSource, fit_to_context};
pub use corpus::{Example, TokenCorpus};
pub use tokenizer::TextTokenizer;

/// File name of the tokenizer a run uses, saved in its output directory.
pub use crate::hub::TOKENIZER_FILE;

/// Raw text of one corpus file, in the shape its format implies.
enum RawCorpus {
    Text(String),
    PromptReply(Vec<corpus::PromptReply>),
}

impl RawCorpus {
    fn read(path: &Path, format: DataFormat, skip_bad_lines: bool) -> Result<(Self, usize)> {
        let is_jsonl = match format {
            DataFormat::Jsonl => true,
            DataFormat::Text => false,
            DataFormat::Auto => path.extension().is_some_and(|e| e == "jsonl"),
        };
        if is_jsonl {
            let r = corpus::read_jsonl(path, skip_bad_lines)?;
            Ok((RawCorpus::PromptReply(r.records), r.skipped_lines))
        } else {
            Ok((RawCorpus::Text(corpus::read_text(path)?), 0))
        }
    }

    fn texts(&self) -> Vec<&str> {
        match self {
            RawCorpus::Text(t) => vec![t.as_str()],
            RawCorpus::PromptReply(r) => r.iter().flat_map(|r| [r.prompt.as_str(), r.reply.as_str()]).collect(),
        }
    }

    fn tokenize(&self, tok: &TextTokenizer) -> Result<TokenCorpus> {
        match self {
            RawCorpus::Text(t) => Ok(TokenCorpus::Stream(tok.encode_corpus(t)?)),
            RawCorpus::PromptReply(records) => {
                let Some(eos) = tok.eos_id() else {
                    bail!("the tokenizer has no end-of-text token; prompt/reply data needs one to end replies")
                };
                let examples = records
                    .iter()
                    .map(|r| {
                        let prompt = tok.encode(&r.prompt)?;
                        let mut tokens = prompt.clone();
                        tokens.extend(tok.encode(&r.reply)?);
                        tokens.push(eos);
                        Ok(Example { loss_from: prompt.len(), tokens, record: Some(std::sync::Arc::new(r.clone())) })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(TokenCorpus::Examples(examples))
            }
        }
    }
}

/// Everything the trainer needs from the data section of the config.
pub struct PreparedData {
    pub tokenizer: TextTokenizer,
    pub train: SampleSource,
    pub validation: SampleSource,
    pub train_tokens: usize,
    pub validation_tokens: usize,
    pub skipped_lines: usize,
}

/// The tokenizer a config asks for: the pretrained model's, else `char`, `bpe` or a
/// `tokenizer.json` path.
pub fn build_tokenizer(config: &Config, texts: &[&str]) -> Result<TextTokenizer> {
    if let Some(id) = &config.model.pretrained {
        let dir = crate::hub::resolve(id).context("model.pretrained")?;
        return TextTokenizer::from_file(&dir.join(TOKENIZER_FILE));
    }
    match config.data.tokenizer.as_str() {
        "char" => TextTokenizer::build_char_level(texts.iter().copied()),
        "bpe" => TextTokenizer::train_byte_bpe(texts.iter().copied(), config.model.vocab_size.unwrap_or(1024)),
        path => TextTokenizer::from_file(Path::new(path)).context("data.tokenizer"),
    }
}

/// Reads and tokenizes the corpora. A tokenizer already saved in `run_dir` (a resumed run)
/// wins over the config so ids never change under a checkpoint; a new one is saved there.
pub fn prepare(config: &Config, run_dir: &Path) -> Result<PreparedData> {
    let d = &config.data;
    let train_path: &PathBuf = d.train.as_ref().context("data.train: missing field")?;
    let (train_raw, mut skipped_lines) = RawCorpus::read(train_path, d.format, d.skip_bad_lines)?;
    let val_raw = match &d.validation {
        Some(p) => {
            let (raw, skipped) = RawCorpus::read(p, d.format, d.skip_bad_lines)?;
            skipped_lines += skipped;
            Some(raw)
        }
        None => None,
    };

    let saved = run_dir.join(TOKENIZER_FILE);
    let tokenizer = if saved.exists() {
        TextTokenizer::from_file(&saved)?
    } else {
        let tok = build_tokenizer(config, &train_raw.texts())?;
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        tok.save(&saved)?;
        tok
    };

    let train_tokens = train_raw.tokenize(&tokenizer)?;
    let (train, validation) = match val_raw {
        Some(v) => (train_tokens, v.tokenize(&tokenizer)?),
        None => corpus::split(train_tokens, d.validation_fraction, config.run.seed)?,
    };
    let context = config.model.context_length;
    Ok(PreparedData {
        train_tokens: train.token_count(),
        validation_tokens: validation.token_count(),
        train: SampleSource::new(train, context, config.run.seed, true).context("training split")?,
        validation: SampleSource::new(validation, context, config.run.seed, false).context("validation split")?,
        tokenizer,
        skipped_lines,
    })
}
