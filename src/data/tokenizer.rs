//! Text ↔ token ids through the `tokenizers` crate: load a `tokenizer.json`, or build a
//! character-level or byte-level BPE tokenizer from a corpus.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::chat::{ChatTemplate, TOKENIZER_CONFIG_FILE, TokenizerSettings};

/// The end-of-text token polyburn adds to the tokenizers it builds.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Names other tokenizers commonly use for end of sequence, tried in this order.
const EOS_CANDIDATES: [&str; 4] = [EOS_TOKEN, "</s>", "<eos>", "<|im_end|>"];

/// A tokenizer with what transformers keeps beside it in `tokenizer_config.json`: the end
/// token (when it names one) and the chat template.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    eos: Option<u32>,
    /// `bos_token` of the tokenizer config: chat templates write it, nothing else uses it.
    bos_token: Option<String>,
    /// Compiled with this tokenizer's `bos_token` and end token.
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer(vocab={}, eos={:?})", self.vocab_size(), self.eos)
    }
}

impl TextTokenizer {
    fn wrap(inner: Tokenizer) -> Self {
        let eos = EOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t));
        Self { inner, eos, bos_token: None, chat_template: None }
    }

    /// A model or run folder: its `tokenizer.json`, and the `eos_token` and `chat_template` of
    /// its `tokenizer_config.json` when it has one.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let mut tok = Self::from_file(&dir.join(crate::hub::TOKENIZER_FILE))?;
        let settings = TokenizerSettings::read_folder(dir)?;
        if let Some(eos) = &settings.eos_token {
            // A name missing from the vocabulary keeps the guessed end token.
            if let Some(id) = tok.inner.token_to_id(eos) {
                tok.eos = Some(id);
            }
        }
        tok.bos_token = settings.bos_token;
        tok.set_chat_template(settings.chat_template.as_deref())
            .with_context(|| format!("{}", dir.join(TOKENIZER_CONFIG_FILE).display()))?;
        Ok(tok)
    }

    /// Writes `tokenizer.json` and, when there is an end token or a chat template, the
    /// `tokenizer_config.json` that [`Self::from_folder`] (and transformers) read back.
    pub fn save_folder(&self, dir: &Path) -> Result<()> {
        self.save(&dir.join(crate::hub::TOKENIZER_FILE))?;
        let settings = TokenizerSettings {
            chat_template: self.chat_template.as_ref().map(|t| t.source().to_string()),
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token(),
        };
        if settings != TokenizerSettings::default() {
            settings.write(&dir.join(TOKENIZER_CONFIG_FILE))?;
        }
        Ok(())
    }

    /// The end token's text.
    fn eos_token(&self) -> Option<String> {
        self.eos.and_then(|id| self.inner.id_to_token(id))
    }

    /// Sets (or with `None` removes) the chat template, compiled with this tokenizer's
    /// `bos_token` and end token.
    pub fn set_chat_template(&mut self, source: Option<&str>) -> Result<()> {
        let (bos, eos) = (self.bos_token.clone().unwrap_or_default(), self.eos_token().unwrap_or_default());
        self.chat_template = source.map(|s| ChatTemplate::new(s, &bos, &eos)).transpose()?;
        Ok(())
    }

    /// Makes `token` a special token (added when missing) and the end token: a chat
    /// template's end-of-turn marker, so that generation stops where the template ends a turn.
    /// A chat template already set is recompiled with it.
    pub fn set_end_token(&mut self, token: &str) -> Result<()> {
        if self.inner.token_to_id(token).is_none() {
            self.inner.add_special_tokens(&[AddedToken::from(token.to_string(), true)]);
        }
        self.eos = self.inner.token_to_id(token);
        let source = self.chat_template.as_ref().map(|t| t.source().to_string());
        self.set_chat_template(source.as_deref())
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        Ok(Self::wrap(inner))
    }

    /// One token per distinct character of `texts`, plus the end-of-text token.
    pub fn build_char_level<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let chars: BTreeSet<char> = texts.into_iter().flat_map(str::chars).collect();
        if chars.is_empty() {
            bail!("cannot build a character tokenizer from an empty corpus");
        }
        let vocab: Vec<(String, u32)> =
            chars.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<ahash::AHashMap<_, _>>(), Vec::new())
            .build()
            .map_err(|e| anyhow!("building the character vocabulary: {e}"))?;
        let mut inner = Tokenizer::new(model);
        inner.with_decoder(Some(Fuse::new()));
        inner.add_special_tokens(&[AddedToken::from(EOS_TOKEN, true)]);
        Ok(Self::wrap(inner))
    }

    /// A GPT-2 style byte-level BPE trained on `texts` up to `vocab_size` tokens.
    pub fn train_byte_bpe<'a>(texts: impl IntoIterator<Item = &'a str>, vocab_size: usize) -> Result<Self> {
        // 256 byte symbols + the end-of-text token is the smallest useful vocabulary.
        if vocab_size < 257 {
            bail!("a byte-level BPE needs vocab_size >= 257, got {vocab_size}");
        }
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
            .build()
            .into();
        let mut inner = Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let lines: Vec<&str> = texts.into_iter().flat_map(str::lines).collect();
        inner
            .train(&mut trainer, lines.into_iter())
            .map_err(|e| anyhow!("training the BPE tokenizer: {e}"))?;
        Ok(Self::wrap(inner))
    }

    /// Writes `tokenizer.json` crash-safely (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.inner.to_string(false).map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
        crate::weights::write_file_atomic(path, json.as_bytes())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes a long corpus in line-aligned chunks (a single multi-megabyte "word" is slow for BPE).
    pub fn encode_corpus(&self, text: &str) -> Result<Vec<u32>> {
        const CHUNK: usize = 1 << 16;
        let mut ids = Vec::with_capacity(text.len() / 2);
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + CHUNK).min(text.len());
            if end < text.len() {
                // Cut after a newline so no token straddles a chunk border.
                end = text[start..end].rfind('\n').map(|p| start + p + 1).unwrap_or_else(|| {
                    let mut e = end;
                    while !text.is_char_boundary(e) {
                        e += 1;
                    }
                    e
                });
            }
            ids.extend(self.encode(&text[start..end]).context("tokenizing the corpus")?);
            start = end;
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens (end of text, chat markers) left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("decoding: {e}"))
    }

    /// Text of `ids` with the special tokens written out.
    pub fn decode_with_special_tokens(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("decoding: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_level_round_trips_and_has_eos() {
        let text = "hello world\nthe quick brown fox\n";
        let t = TextTokenizer::build_char_level([text]).unwrap();
        let ids = t.encode_corpus(text).unwrap();
        assert_eq!(ids.len(), text.chars().count());
        assert_eq!(t.decode(&ids).unwrap(), text);
        let eos = t.eos_id().unwrap();
        assert_eq!(eos as usize, t.vocab_size() - 1);
    }

    #[test]
    fn byte_bpe_round_trips_unseen_text_and_saves() {
        let text = "the cat sat on the mat. the cat ate the rat.\n".repeat(20);
        let t = TextTokenizer::train_byte_bpe([text.as_str()], 300).unwrap();
        assert!(t.vocab_size() <= 300 && t.vocab_size() > 257);
        let unseen = "Zebras émigrés 🦓!";
        assert_eq!(t.decode(&t.encode(unseen).unwrap()).unwrap(), unseen);
        let ids = t.encode("the cat").unwrap();
        assert!(ids.len() < "the cat".len(), "merges were learned");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        t.save(&path).unwrap();
        let back = TextTokenizer::from_file(&path).unwrap();
        assert_eq!(back.encode(unseen).unwrap(), t.encode(unseen).unwrap());
        assert_eq!(back.eos_id(), t.eos_id());
    }
}
