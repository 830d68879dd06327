//! Corpora, tokenizers, splits and batches.

pub mod batcher;
pub mod chat;
pub mod corpus;
pub mod tokenizer;

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::config::{CHAT_TEMPLATE_AUTO, CHAT_TEMPLATE_NONE, Config, DataFormat};
use chat::ChatTemplate;
use corpus::PromptReply;
pub use batcher::{Batch, DataCursor, LossSequence, SampleSource, fit_to_context};
pub use corpus::{Example, TokenCorpus};
pub use tokenizer::TextTokenizer;

/// File name of the tokenizer a run uses, saved in its output directory.
pub use crate::hub::TOKENIZER_FILE;

/// Raw text of one corpus file, in the shape its format implies.
enum RawCorpus {
    Text(String),
    /// The records and the file they came from (errors name it).
    PromptReply(Vec<corpus::PromptReply>, PathBuf),
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
            Ok((RawCorpus::PromptReply(r.records, path.to_path_buf()), r.skipped_lines))
        } else {
            Ok((RawCorpus::Text(corpus::read_text(path)?), 0))
        }
    }

    fn is_text(&self) -> bool {
        matches!(self, RawCorpus::Text(_))
    }

    /// The texts a tokenizer is built from: what tokenizing will see, so records as the chat
    /// template renders them.
    fn texts(&self, template: Option<&ChatTemplate>) -> Result<Vec<Cow<'_, str>>> {
        match (self, template) {
            (RawCorpus::Text(t), _) => Ok(vec![Cow::Borrowed(t)]),
            (RawCorpus::PromptReply(r, _), None) => Ok(r.iter().flat_map(|r| [r.prompt.as_str().into(), r.reply.as_str().into()]).collect()),
            (RawCorpus::PromptReply(r, path), Some(t)) => r
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let text = t.render(&r.conversation(), false);
                    text.map(Cow::Owned).with_context(|| format!("{}: record {}", path.display(), i + 1))
                })
                .collect(),
        }
    }

    fn tokenize(&self, tok: &TextTokenizer) -> Result<TokenCorpus> {
        match self {
            RawCorpus::Text(t) => Ok(TokenCorpus::Stream(tok.encode_corpus(t)?)),
            RawCorpus::PromptReply(records, path) => {
                let examples = records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let record = Some(std::sync::Arc::new(r.clone()));
                        let (tokens, loss_spans) = match tok.chat_template() {
                            Some(template) => chat_tokens(tok, template, r),
                            None => plain_tokens(tok, r),
                        }
                        .with_context(|| format!("{}: record {}", path.display(), i + 1))?;
                        Ok(Example { tokens, loss_spans, record })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(TokenCorpus::Examples(examples))
            }
        }
    }
}

/// Prompt, reply and the end token, the loss on the reply and end token.
fn plain_tokens(tok: &TextTokenizer, r: &PromptReply) -> Result<(Vec<u32>, Vec<Range<usize>>)> {
    if !r.messages.is_empty() {
        bail!(
            "JSONL records with `messages` need a chat template: set data.chat_template to a Jinja file or \
             tokenizer_config.json, or use a model.pretrained whose tokenizer_config.json has one"
        );
    }
    let Some(eos) = tok.eos_id() else {
        bail!("the tokenizer has no end-of-text token; prompt/reply data needs one to end replies")
    };
    let mut tokens = tok.encode(&r.prompt)?;
    let prompt_len = tokens.len();
    tokens.extend(tok.encode(&r.reply)?);
    tokens.push(eos);
    let end = tokens.len();
    Ok((tokens, vec![prompt_len..end]))
}

/// The conversation rendered by the chat template, each piece tokenized on its own so the
/// text before an assistant turn tokenizes exactly as the prompt does at inference; the loss
/// covers the assistant turns (their end-of-turn markers included, so the model learns to stop).
fn chat_tokens(tok: &TextTokenizer, template: &ChatTemplate, r: &PromptReply) -> Result<(Vec<u32>, Vec<Range<usize>>)> {
    let mut tokens = Vec::new();
    let mut spans = Vec::new();
    for segment in template.segments(&r.conversation())? {
        let ids = tok.encode(&segment.text)?;
        if segment.assistant {
            spans.push(tokens.len()..tokens.len() + ids.len());
        }
        tokens.extend(ids);
    }
    Ok((tokens, spans))
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
/// `tokenizer.json` path, with the chat template `data.chat_template` names. `char` and `bpe`
/// are built from `corpus` as the template renders it.
fn build_tokenizer(config: &Config, corpus: &RawCorpus) -> Result<TextTokenizer> {
    let choice = config.data.chat_template.as_str();
    let template_file = match choice {
        CHAT_TEMPLATE_AUTO | CHAT_TEMPLATE_NONE => None,
        path => Some(chat::read_template_file(Path::new(path)).context("data.chat_template")?),
    };
    if corpus.is_text() && template_file.is_some() {
        bail!("data.chat_template: a chat template formats JSONL records, but data.train is plain text");
    }
    let mut tok = if let Some(id) = &config.model.pretrained {
        let dir = crate::hub::resolve(id).context("model.pretrained")?;
        TextTokenizer::from_folder(&dir)?
    } else {
        // Polyburn's own tokenizers end text with EOS_TOKEN; the template's `eos_token` is it.
        let render_with =
            template_file.as_deref().map(|t| ChatTemplate::new(t, "", tokenizer::EOS_TOKEN)).transpose().context("data.chat_template")?;
        let texts = corpus.texts(render_with.as_ref())?;
        let texts = texts.iter().map(|t| t.as_ref());
        let mut tok = match config.data.tokenizer.as_str() {
            "char" => TextTokenizer::build_char_level(texts)?,
            "bpe" => TextTokenizer::train_byte_bpe(texts, config.model.vocab_size.unwrap_or(1024))?,
            path => TextTokenizer::from_file(Path::new(path)).context("data.tokenizer")?,
        };
        // A template that closes turns with its own marker (`<|im_end|>`) gets it as one
        // special token and the end token: replies then stop where the template ends a turn.
        if let Some(marker) = render_with.as_ref().map(ChatTemplate::end_of_turn).transpose()?.flatten() {
            tok.set_end_token(&marker)?;
        }
        tok
    };
    match (choice, template_file) {
        (_, Some(source)) => tok.set_chat_template(Some(&source)).context("data.chat_template")?,
        (CHAT_TEMPLATE_NONE, None) => tok.set_chat_template(None)?,
        _ => {}
    }
    Ok(tok)
}

/// Reads and tokenizes the corpora. A tokenizer already saved in `run_dir` (a resumed run),
/// with its chat template, wins over the config so ids and texts never change under a
/// checkpoint; a new one is saved there.
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

    let saved = run_dir.join(TOKENIZER_FILE).exists();
    let tokenizer = if saved { TextTokenizer::from_folder(run_dir)? } else { build_tokenizer(config, &train_raw)? };

    let train_tokens = train_raw.tokenize(&tokenizer)?;
    let (train, validation) = match val_raw {
        Some(v) => (train_tokens, v.tokenize(&tokenizer)?),
        None => corpus::split(train_tokens, d.validation_fraction, config.run.seed)?,
    };
    // Saved once the data tokenizes, so a failed first start does not pin a tokenizer (or a
    // missing chat template) that a corrected config could no longer replace.
    if !saved {
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        tokenizer.save_folder(run_dir)?;
    }
    let context = config.model.context_length;
    let (train_tokens, validation_tokens) = (train.token_count(), validation.token_count());
    let mut train = SampleSource::new(train, context, config.run.seed, true).context("training split")?;
    if d.pack {
        train = train.with_packing()?;
    }
    Ok(PreparedData {
        train_tokens,
        validation_tokens,
        train,
        validation: SampleSource::new(validation, context, config.run.seed, false).context("validation split")?,
        tokenizer,
        skipped_lines,
    })
}
