//! Hugging Face model folders: the local cache (`HF_HOME`), downloads, and which weight files
//! a folder holds. A leaf module: `data` (pretrained tokenizers) and `model` (weights) use it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The tokenizer file of a model folder (and of a run directory).
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A local folder, or a hub id: looked up in the Hugging Face cache (`HF_HOME`), and
/// downloaded into it when missing unless `HF_HUB_OFFLINE=1`.
pub fn resolve(id_or_path: &str) -> Result<PathBuf> {
    let path = Path::new(id_or_path);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(id_or_path.to_string());
    let complete = |dir: &Path| dir.join(TOKENIZER_FILE).is_file() && weight_files(dir).is_ok();
    if let Some(config) = cached.get("config.json")
        && let Some(dir) = config.parent().filter(|d| complete(d))
    {
        return Ok(dir.to_path_buf());
    }
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
        bail!(
            "`{id_or_path}` is neither a model folder nor complete in the Hugging Face cache ({}), \
             and HF_HUB_OFFLINE=1 forbids downloading it",
            cache.path().display()
        );
    }
    download(id_or_path).with_context(|| {
        format!("`{id_or_path}` is not a local folder or cached model, and downloading it from the Hugging Face hub failed")
    })
}

/// Fetches config, tokenizer and weights (single file or every shard) into the HF cache.
fn download(id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).build()?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json")?;
    repo.get(TOKENIZER_FILE)?;
    if repo.get("model.safetensors").is_err() {
        let index = repo.get("model.safetensors.index.json")?;
        let dir = index.parent().expect("a file in a folder").to_path_buf();
        for shard in weight_files(&dir)? {
            repo.get(&shard.file_name().expect("a shard file").to_string_lossy())?;
        }
    }
    Ok(config.parent().expect("a file in a folder").to_path_buf())
}

/// The weight files of a model folder: one file, or the shards an index lists.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&index)?;
        let idx: Index = serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let mut shards: Vec<PathBuf> = idx.weight_map.values().map(|f| dir.join(f)).collect();
        shards.sort();
        shards.dedup();
        return Ok(shards);
    }
    bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
}

