//! Chat templates: a model's `chat_template` (Jinja, from `tokenizer_config.json`) rendered as
//! transformers' `apply_chat_template` renders it, and the conversation cut into the text
//! pieces that are assistant turns (the loss covers those only) and the rest.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

/// The name transformers gives the tokenizer's settings file (eos token, chat template).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// The role whose turns the loss covers.
pub const ASSISTANT: &str = "assistant";

/// One turn of a `{"messages": [...]}` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A piece of a rendered conversation; `assistant` marks an assistant turn's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub text: String,
    pub assistant: bool,
}

/// A compiled chat template with the special tokens its context provides.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({} bytes, eos={:?})", self.source.len(), self.eos_token)
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source` with transformers' Jinja settings: `trim_blocks`, `lstrip_blocks`,
    /// loop controls, `raise_exception`, Python string methods and a `tojson` that writes what
    /// Python's `json.dumps(ensure_ascii=False)` writes (minijinja's own escapes `<`, `>`, `&`,
    /// `'`), except that object keys come out sorted.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_filter("tojson", python_json);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(|e| anyhow!("the chat template does not compile: {e:#}"))?;
        Ok(Self { env, source: source.into(), bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=…)`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).expect("added in new");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| anyhow!("rendering the chat template: {e:#}"))
    }

    /// The whole conversation as consecutive pieces, assistant turns marked. An assistant turn
    /// `i` is what rendering `messages[..=i]` adds to rendering `messages[..i]` with the
    /// generation prompt, so the text before it is exactly the prompt the model sees when it
    /// writes that turn at inference. Templates that rewrite earlier turns once later ones
    /// exist (no such prefix) are an error.
    pub fn segments(&self, messages: &[ChatMessage]) -> Result<Vec<Segment>> {
        let full = self.render(messages, false)?;
        let mut segments = Vec::new();
        let mut done = 0;
        for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == ASSISTANT) {
            let prompt = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !(full.starts_with(&prompt) && full.starts_with(&through) && prompt.len() >= done && through.starts_with(&prompt)) {
                bail!(
                    "the chat template renders message {} (assistant) differently once later messages follow, \
                     so its turn cannot be located in the conversation; polyburn needs templates whose \
                     rendering of a conversation's first turns is a prefix of the whole",
                    i + 1
                );
            }
            if prompt.len() > done {
                segments.push(Segment { text: full[done..prompt.len()].into(), assistant: false });
            }
            segments.push(Segment { text: full[prompt.len()..through.len()].into(), assistant: true });
            done = through.len();
        }
        if full.len() > done {
            segments.push(Segment { text: full[done..].into(), assistant: false });
        }
        Ok(segments)
    }
}

impl ChatTemplate {
    /// The marker the template closes an assistant turn with (Qwen2's `<|im_end|>`): the text
    /// after a placeholder reply in its assistant turn, up to the first whitespace; `None` when
    /// the turn ends with the reply itself.
    pub fn end_of_turn(&self) -> Result<Option<String>> {
        const REPLY: &str = "\u{E001}";
        let messages = [ChatMessage::new("user", "\u{E000}"), ChatMessage::new(ASSISTANT, REPLY)];
        let turn = self.segments(&messages)?.into_iter().find(|s| s.assistant).map(|s| s.text).unwrap_or_default();
        let after = turn.rsplit_once(REPLY).map_or("", |(_, after)| after);
        Ok(after.split_whitespace().next().map(str::to_string))
    }
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=…)`,
/// whose separators are `", "` and `": "` (`","` at line ends when indenting).
fn python_json(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(value: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(key).expect("a string serialises"));
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        // Scalars, `[]` and `{}`: serde_json writes them as Python does (non-ASCII kept).
        other => out.push_str(&serde_json::to_string(other).expect("JSON serialises")),
    }
}

/// What polyburn reads from and writes to a `tokenizer_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerSettings {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl TokenizerSettings {
    /// The folder's `tokenizer_config.json`, or defaults when it has none.
    pub fn read_folder(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_CONFIG_FILE);
        if !path.is_file() {
            return Ok(Self::default());
        }
        Self::read(&path)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let raw: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        // Special tokens are a string or an AddedToken object `{"content": …}`.
        let token = |key: &str| match &raw[key] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
            _ => None,
        };
        // A template is a string, or a list of named ones of which `default` is the chat one.
        let chat_template = match &raw["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(named) => Some(
                named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .with_context(|| format!("{}: chat_template lists no template named `default`", path.display()))?
                    .to_string(),
            ),
            serde_json::Value::Null => None,
            _ => bail!("{}: chat_template must be a string", path.display()),
        };
        Ok(Self { chat_template, bos_token: token("bos_token"), eos_token: token("eos_token") })
    }

    /// Writes the settings transformers reads back (`AutoTokenizer` sees the same template).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut raw = serde_json::Map::new();
        for (key, value) in [("bos_token", &self.bos_token), ("eos_token", &self.eos_token), ("chat_template", &self.chat_template)] {
            if let Some(v) = value {
                raw.insert(key.into(), v.clone().into());
            }
        }
        let text = serde_json::to_string_pretty(&raw)? + "\n";
        crate::weights::write_file_atomic(path, text.as_bytes())
    }
}

/// A `data.chat_template` file: a `tokenizer_config.json` (its `chat_template`) or Jinja source.
pub fn read_template_file(path: &Path) -> Result<String> {
    if path.extension().is_some_and(|e| e == "json") {
        return TokenizerSettings::read(path)?
            .chat_template
            .with_context(|| format!("{} has no chat_template", path.display()));
    }
    let source = std::fs::read_to_string(path).with_context(|| format!("cannot read chat template {}", path.display()))?;
    if source.trim().is_empty() {
        bail!("chat template {} is empty", path.display());
    }
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN2: &str = include_str!("../../tests/fixtures/chat/qwen2.jinja");

    #[test]
    fn assistant_turns_are_what_each_turn_adds_to_its_generation_prompt() {
        let t = ChatTemplate::new(QWEN2, "", "<|im_end|>").unwrap();
        let messages = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new(ASSISTANT, "hello"),
            ChatMessage::new("user", "bye"),
            ChatMessage::new(ASSISTANT, "ciao"),
        ];
        let segments = t.segments(&messages).unwrap();
        let text: String = segments.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(text, t.render(&messages, false).unwrap());
        let turns: Vec<&str> = segments.iter().filter(|s| s.assistant).map(|s| s.text.as_str()).collect();
        assert_eq!(turns, ["hello<|im_end|>\n", "ciao<|im_end|>\n"]);
        assert!(segments[0].text.ends_with("<|im_start|>assistant\n") && !segments[0].assistant);
        assert_eq!(segments.len(), 4);
    }

    #[test]
    fn the_end_of_turn_marker_is_what_follows_the_reply() {
        assert_eq!(ChatTemplate::new(QWEN2, "", "").unwrap().end_of_turn().unwrap().as_deref(), Some("<|im_end|>"));
        let plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}";
        assert_eq!(ChatTemplate::new(plain, "", "").unwrap().end_of_turn().unwrap(), None);
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_is_an_error_naming_the_message() {
        // Drops the content of every assistant turn but the last, as reasoning templates do.
        let source = "{% for m in messages %}{{ m.role }}:{% if m.role != 'assistant' or loop.last %}{{ m.content }}{% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(source, "", "").unwrap();
        let messages = [ChatMessage::new("user", "a"), ChatMessage::new(ASSISTANT, "b"), ChatMessage::new("user", "c")];
        let e = t.segments(&messages).unwrap_err().to_string();
        assert!(e.contains("message 2"), "{e}");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_reported() {
        let t = ChatTemplate::new("{{ raise_exception('no system role, please') }}", "", "").unwrap();
        let e = format!("{:#}", t.render(&[], false).unwrap_err());
        assert!(e.contains("no system role, please"), "{e}");
        let e = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err().to_string();
        assert!(e.contains("does not compile"), "{e}");
    }

    #[test]
    fn settings_read_added_token_objects_and_named_templates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKENIZER_CONFIG_FILE);
        std::fs::write(
            &path,
            r#"{"eos_token": {"content": "</s>", "lstrip": false}, "bos_token": "<s>",
                "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]}"#,
        )
        .unwrap();
        let s = TokenizerSettings::read(&path).unwrap();
        assert_eq!((s.eos_token.as_deref(), s.bos_token.as_deref(), s.chat_template.as_deref()), (Some("</s>"), Some("<s>"), Some("y")));
        s.write(&path).unwrap();
        assert_eq!(TokenizerSettings::read(&path).unwrap(), s);
        assert_eq!(read_template_file(&path).unwrap(), "y");
    }
}
