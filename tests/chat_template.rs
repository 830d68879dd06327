//! Chat templates: rendering against transformers' `apply_chat_template`
//! (`tests/fixtures/chat/reference.json`, made by `make_reference.py` there), the loss on
//! assistant turns only, and where a run's template comes from.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use polyburn::config::Config;
use polyburn::data::chat::{ChatMessage, ChatTemplate};
use polyburn::data::{TextTokenizer, prepare};

#[test]
fn templates_render_as_transformers_apply_chat_template() {
    let dir = repo_root().join("tests/fixtures/chat");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let (bos, eos) = (reference["bos_token"].as_str().unwrap(), reference["eos_token"].as_str().unwrap());
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let source = std::fs::read_to_string(dir.join(case["template"].as_str().unwrap())).unwrap();
        let template = ChatTemplate::new(&source, bos, eos).unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&messages, add_generation_prompt).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{} on {messages:?}", case["template"]);
    }
    // The features template raises on a role it does not know.
    let source = std::fs::read_to_string(dir.join("features.jinja")).unwrap();
    let e = format!("{:#}", ChatTemplate::new(&source, bos, eos).unwrap().render(&[ChatMessage::new("tool", "x")], false).unwrap_err());
    assert!(e.contains("unknown role tool"), "{e}");
}

/// The tiny test config on the chat corpus.
fn config(dir: &Path) -> Config {
    let corpus = write_chat_corpus(dir);
    let yaml = tiny_text_config(&dir.join("run"))
        .replace(&repo_root().join("data/shakespeare_excerpt.txt").display().to_string(), &corpus.display().to_string());
    Config::load(&write_config(dir, "c.yaml", &yaml), &[]).unwrap()
}

#[test]
fn the_loss_covers_assistant_turns_and_the_prompt_is_the_generation_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let template_path = qwen2_template();
    let mut cfg = config(tmp.path());
    cfg.data.chat_template = template_path.display().to_string();
    cfg.model.context_length = 512;
    let run_dir = tmp.path().join("run");
    let data = prepare(&cfg, &run_dir).unwrap();
    let template = ChatTemplate::new(&std::fs::read_to_string(&template_path).unwrap(), "", "<|endoftext|>").unwrap();
    let tok = &data.tokenizer;
    let examples: Vec<_> = data.train.examples().iter().chain(data.validation.examples()).collect();
    assert!(examples.len() > 30);
    let mut multi_turn = 0;
    for ex in examples {
        let record = ex.record.as_ref().unwrap();
        let turns: Vec<&str> = record.messages.iter().filter(|m| m.role == "assistant").map(|m| m.content.as_str()).collect();
        assert_eq!(ex.loss_spans.len(), turns.len());
        multi_turn += usize::from(turns.len() > 1);
        for (span, turn) in ex.loss_spans.iter().zip(&turns) {
            assert_eq!(tok.decode_with_special_tokens(&ex.tokens[span.clone()]).unwrap(), format!("{turn}<|im_end|>\n"));
        }
        assert_eq!(tok.decode_with_special_tokens(&ex.tokens).unwrap(), template.render(&record.messages, false).unwrap());
        let before_reply = &record.messages[..record.messages.len() - 1];
        assert_eq!(tok.decode_with_special_tokens(ex.prompt_tokens()).unwrap(), template.render(before_reply, true).unwrap());
    }
    assert!(multi_turn > 10, "{multi_turn}");

    // The run keeps its template beside its tokenizer, where a resume and transformers find it.
    let saved = TextTokenizer::from_folder(&run_dir).unwrap();
    assert_eq!(saved.chat_template().unwrap().source(), template.source());
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("tokenizer_config.json")).unwrap()).unwrap();
    // Qwen2's end-of-turn marker became one special token and the end token: each turn's
    // loss ends with predicting it (then the newline), and generation stops there.
    assert_eq!(raw["eos_token"], "<|im_end|>");
    let eos = tok.eos_id().unwrap();
    assert_eq!(saved.eos_id(), Some(eos));
    for ex in data.train.examples() {
        for span in &ex.loss_spans {
            assert_eq!(ex.tokens[span.end - 2], eos);
        }
    }
}

#[test]
fn a_pretrained_models_template_is_used_unless_none() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(repo_root().join("tests/fixtures/tiny-gpt2")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let template = "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token if m.role == 'assistant' else '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";
    let settings = serde_json::json!({"chat_template": template, "eos_token": {"content": "<|endoftext|>"}});
    std::fs::write(model.join("tokenizer_config.json"), settings.to_string()).unwrap();
    let prepared = |choice: &str, run: &str| {
        let mut cfg = config(tmp.path());
        cfg.model.pretrained = Some(model.display().to_string());
        cfg.model.context_length = 256;
        cfg.data.chat_template = choice.into();
        prepare(&cfg, &tmp.path().join(run))
    };
    let data = prepared("auto", "auto").unwrap();
    let rendered_with = ChatTemplate::new(template, "", "<|endoftext|>").unwrap();
    for ex in data.train.examples() {
        // Token for token the folder's template, its pieces tokenized one by one.
        let messages = &ex.record.as_ref().unwrap().messages;
        let segments = rendered_with.segments(messages).unwrap();
        let tokens: Vec<u32> = segments.iter().flat_map(|s| data.tokenizer.encode(&s.text).unwrap()).collect();
        assert_eq!(ex.tokens, tokens);
        assert_eq!(ex.loss_spans.len(), messages.iter().filter(|m| m.role == "assistant").count());
        // The assistant turns end with the configured end token, which generation stops at.
        assert_eq!(ex.tokens[ex.loss_spans.last().unwrap().end - 1], data.tokenizer.eos_id().unwrap());
    }
    // `none` formats records without a template, which chat records cannot be.
    let e = format!("{:#}", prepared("none", "none").err().unwrap());
    assert!(e.contains("data.chat_template"), "{e}");
}

/// The chat corpus and the tiny config (writing to `out/`) in `dir`: `(config, out, corpus)`.
fn chat_run(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let out = dir.join("out");
    (write_config(dir, "c.yaml", &tiny_text_config(&out)), out, write_chat_corpus(dir))
}

/// `polyburn train --config CONFIG --quiet` with `--set`s.
fn train(config: &Path, sets: &[&str]) -> Run {
    let mut args = vec!["train", "--config", config.to_str().unwrap(), "--quiet"];
    for s in sets {
        args.extend(["--set", s]);
    }
    run(&args)
}

#[test]
fn bad_template_settings_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, _, corpus) = chat_run(tmp.path());
    let train_set = format!("data.train={}", corpus.display());
    // Chat records without a template.
    let r = train(&cfg, &[&train_set]).fails();
    assert!(r.stderr().contains("data.chat_template") && r.stderr().contains(&format!("{}: record 1", corpus.display())), "{}", r.stderr());
    // A template file that does not exist.
    let r = train(&cfg, &[&train_set, "data.chat_template=/no/such.jinja"]).fails();
    assert!(r.stderr().contains("data.chat_template") && r.stderr().contains("/no/such.jinja"), "{}", r.stderr());
    // One that does not compile names the template's error.
    let broken = write_config(tmp.path(), "broken.jinja", "{% for m in messages %}{{ m.content }}");
    let r = train(&cfg, &[&train_set, &format!("data.chat_template={}", broken.display())]).fails();
    assert!(r.stderr().contains("data.chat_template") && r.stderr().contains("compile"), "{}", r.stderr());
    // A template for plain text.
    let r = train(&cfg, &[&format!("data.chat_template={}", qwen2_template().display())]).fails();
    assert!(r.stderr().contains("plain text"), "{}", r.stderr());
}

#[test]
fn generate_chat_sends_the_prompt_through_the_runs_template() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, out, corpus) = chat_run(tmp.path());
    let sets = [format!("data.train={}", corpus.display()), format!("data.chat_template={}", qwen2_template().display())];
    train(&cfg, &[&sets[0], &sets[1], "training.max_steps=2", "model.context_length=128"]).ok();
    let prompt_ids = |chat: bool| {
        let mut a = vec!["generate", "--run", out.to_str().unwrap(), "--prompt", "1+1=", "--max-new-tokens", "3", "--json"];
        if chat {
            a.push("--chat");
        }
        let line = run(&a).ok().stdout().lines().next().unwrap().to_string();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()["prompt_ids"].as_array().unwrap().len()
    };
    let template = ChatTemplate::new(&std::fs::read_to_string(qwen2_template()).unwrap(), "", "<|endoftext|>").unwrap();
    let rendered = template.render(&[ChatMessage::new("user", "1+1=")], true).unwrap();
    assert_eq!(prompt_ids(true), TextTokenizer::from_folder(&out).unwrap().encode(&rendered).unwrap().len());
    assert_eq!(prompt_ids(false), 4);
}
