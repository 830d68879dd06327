//! Weight files and crash-safe file writes, shared by checkpoints, Hugging Face import/export
//! and the sentence encoder: safetensors reading and writing, parameters by dotted name, and
//! atomic file replacement (temp file, fsync, rename).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// safetensors metadata key holding Burn's parameter ids (optimizer state is keyed by them).
const PARAM_IDS_KEY: &str = "polyburn.param_ids";

pub(crate) fn fsync_path(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("fsync {}", path.display()))
}

/// Writes a file and flushes it to disk.
pub fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    f.sync_all().with_context(|| format!("fsync {}", path.display()))
}

/// Replaces `path` atomically: write a sibling temp file, fsync, rename. A crash leaves
/// either the old or the new content, never a torn file. The temp name is unique to the
/// process and the call, so two writers of one file (two sweeps writing one report) never
/// rename each other's temp file away; the last rename wins.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}.{call}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    write_file_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Collects every float parameter with its dotted path (`blocks.0.attn.qkv.weight`).
#[derive(Default)]
struct NamedParams {
    path: Vec<String>,
    tensors: Vec<(String, ParamId, TensorData)>,
}

impl ModuleVisitor for NamedParams {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data().convert::<f32>();
        self.tensors.push((self.path.join("."), param.id, data));
    }
}

/// Every float parameter of a module: `(name, id, data)` in module order.
pub fn named_parameters<M: Module>(module: &M) -> Vec<(String, ParamId, TensorData)> {
    let mut v = NamedParams::default();
    module.visit(&mut v);
    v.tensors
}

/// Each parameter's gradient by name, flattened (empty where `grads` has none); for tests
/// comparing two ways of computing the same gradients.
#[cfg(test)]
pub(crate) fn named_gradients<M: Module>(grads: &burn::optim::GradientsParams, module: &M) -> Vec<(String, Vec<f32>)> {
    named_parameters(module)
        .into_iter()
        .map(|(name, id, data)| {
            let values = match data.shape().len() {
                1 => grads.get::<1>(id).map(|g| g.into_data()),
                2 => grads.get::<2>(id).map(|g| g.into_data()),
                r => panic!("{name}: rank {r}"),
            };
            (name, values.map_or_else(Vec::new, |v| v.try_into_vec().unwrap()))
        })
        .collect()
}

/// Serialises a module's weights as safetensors (f32), parameter ids in the metadata.
/// Which parameters a weight file holds: all, or (LoRA runs) only the adapters, since the
/// frozen base is rebuilt from its source on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    All,
    AdaptersOnly,
}

impl Saved {
    pub fn includes(self, name: &str) -> bool {
        self == Saved::All || name.split('.').any(|part| part.starts_with("lora_"))
    }
}

pub fn weights_to_safetensors<M: Module>(module: &M, saved: Saved) -> Result<Vec<u8>> {
    let params: Vec<_> = named_parameters(module).into_iter().filter(|(n, _, _)| saved.includes(n)).collect();
    let ids: BTreeMap<&str, u64> = params.iter().map(|(n, id, _)| (n.as_str(), id.val())).collect();
    let metadata = HashMap::from([
        (PARAM_IDS_KEY.to_string(), serde_json::to_string(&ids)?),
        ("format".to_string(), "pt".to_string()),
    ]);
    let views = params
        .iter()
        .map(|(name, _, data)| {
            let view = TensorView::new(Dtype::F32, data.shape().to_vec(), data.as_bytes())
                .map_err(|e| anyhow!("tensor {name}: {e}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| anyhow!("serialising weights: {e}"))
}

pub fn save_weights<M: Module>(module: &M, path: &Path, saved: Saved) -> Result<()> {
    write_file_synced(path, &weights_to_safetensors(module, saved)?)
}

/// Tensors read from one or more safetensors files, converted to f32, by name.
pub struct TensorFile {
    /// What the tensors came from, for error messages.
    pub source: String,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// Parameter ids recorded by polyburn checkpoints (empty for other files).
    ids: BTreeMap<String, u64>,
}

impl TensorFile {
    /// Tensors already in polyburn's names and layouts (e.g. converted from another format).
    pub fn from_tensors(source: String, tensors: HashMap<String, (Vec<usize>, Vec<f32>)>) -> Self {
        Self { source, tensors, ids: BTreeMap::new() }
    }

    /// Reads `paths` (the shards of one model); F32, F16 and BF16 tensors are accepted.
    pub fn read(paths: &[PathBuf]) -> Result<Self> {
        let source = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        let mut tensors = HashMap::new();
        let mut ids = BTreeMap::new();
        for path in paths {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let at = path.display();
            let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{at}: {e}"))?;
            if let Some(json) = meta.metadata().as_ref().and_then(|m| m.get(PARAM_IDS_KEY)) {
                ids.extend(serde_json::from_str::<BTreeMap<String, u64>>(json).with_context(|| format!("{at}: bad {PARAM_IDS_KEY}"))?);
            }
            let file = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{at}: {e}"))?;
            for (name, view) in file.tensors() {
                let data = view.data();
                let values: Vec<f32> = match view.dtype() {
                    Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                    Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                    Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                    // Integer buffers (BERT's `position_ids`) are recomputed, never parameters.
                    Dtype::I64 | Dtype::I32 | Dtype::U8 | Dtype::BOOL => continue,
                    other => bail!("{at}: tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 load"),
                };
                tensors.insert(name, (view.shape().to_vec(), values));
            }
        }
        Ok(Self { source, tensors, ids })
    }
}

/// Replaces each parameter's value (and id, when recorded) with the stored one.
struct LoadParams<'a, F> {
    file: &'a TensorFile,
    /// Parameters outside this selection keep their current values.
    saved: Saved,
    /// Our parameter path → the tensor name in the file.
    name_of: F,
    path: Vec<String>,
    used: Vec<String>,
    error: Option<anyhow::Error>,
}

impl<F: Fn(&str) -> String> ModuleMapper for LoadParams<'_, F> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let ours = self.path.join(".");
        if !self.saved.includes(&ours) {
            return param;
        }
        let name = (self.name_of)(&ours);
        let expected = param.val().dims().to_vec();
        let source = &self.file.source;
        let Some((shape, values)) = self.file.tensors.get(&name) else {
            self.error = Some(anyhow!("{source}: tensor `{name}` is missing"));
            return param;
        };
        if *shape != expected {
            self.error =
                Some(anyhow!("{source}: tensor `{name}` has shape {shape:?}, the model expects {expected:?}"));
            return param;
        }
        let device = param.val().device();
        let id = self.file.ids.get(&ours).map(|&id| ParamId::from(id)).unwrap_or(param.id);
        self.used.push(name);
        param.transform_for_load(Tensor::from_data(TensorData::new(values.clone(), shape.clone()), &device), id)
    }
}

/// Loads every parameter of `module` from `file`, where `name_of` maps a parameter path to
/// its tensor name. Missing or mis-shaped tensors are errors naming the tensor; so are
/// tensors the model has no place for, unless `ignorable` accepts them (nothing loads
/// half-way).
pub fn load_params<M: Module>(
    module: M,
    file: &TensorFile,
    saved: Saved,
    name_of: impl Fn(&str) -> String,
    ignorable: impl Fn(&str) -> bool,
) -> Result<M> {
    let mut loader = LoadParams { file, saved, name_of, path: Vec::new(), used: Vec::new(), error: None };
    let module = module.map(&mut loader);
    if let Some(e) = loader.error {
        return Err(e);
    }
    let used: std::collections::HashSet<&String> = loader.used.iter().collect();
    let mut extra: Vec<&String> = file.tensors.keys().filter(|n| !used.contains(n) && !ignorable(n)).collect();
    if !extra.is_empty() {
        extra.sort();
        let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        bail!("{}: tensors the model has no place for: {}", file.source, extra.join(", "));
    }
    Ok(module)
}

/// Loads weights saved by [`save_weights`] into `module` (parameter ids restored).
pub fn load_weights<M: Module>(module: M, path: &Path, saved: Saved) -> Result<M> {
    load_params(module, &TensorFile::read(&[path.to_path_buf()])?, saved, str::to_string, |_| false)
}
