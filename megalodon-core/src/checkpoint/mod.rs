//! Checkpoints: safetensors files keyed by the official PyTorch state-dict names, and run
//! directories (`config.json` + `model.safetensors`).
//!
//! Everything here is device-generic: tensors are copied to the host to be written and copied
//! back with [`Tensor::copy_from`] when read. Parameters are always written as `F32`; reading
//! accepts `F32`, `F64`, `BF16` and `F16` and converts to the model dtype.
//!
//! Besides its trainable parameters (visited through [`Params`]), a model may declare
//! non-trainable buffers and tied (aliased) keys through [`HasBuffers`], so that files written by
//! the official code (which contain `rope.freqs`, `*.timenorm.prior_count`, `prior_mean`,
//! `prior_logv` and, when the embedding is shared, `output.output.weight`) load unchanged and
//! files written here load in the official code.
//!
//! Every file is written atomically: to `<path>.tmp` in the same directory, fsynced, then
//! renamed over `<path>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use ::safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use anyhow::{bail, Context, Result};
use dfdx::prelude::*;

use crate::config::ModelConf;
use crate::params::{ParamVisitor, Params};
use crate::util::Float;

pub mod models;
pub mod train_state;
pub use train_state::{load_checkpoint, save_checkpoint, TrainState, TRAIN_STATE_FILE};

/// Metadata key of the tensor checksum written into every safetensors file saved here.
pub const CHECKSUM_KEY: &str = "megalodon_crc32";

/// File name of the model weights inside a run directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// File name of the model config inside a run directory.
pub const CONFIG_FILE: &str = "config.json";

/// A non-trainable tensor stored in checkpoints (official `register_buffer`s).
#[derive(Debug, Clone, PartialEq)]
pub enum Buffer {
    /// A float buffer (written as `F32`).
    F32 { shape: Vec<usize>, data: Vec<f32> },
    /// An integer buffer (written as `I64`), e.g. `prior_count` with shape `[]`.
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

impl Buffer {
    /// The buffer's shape (`[]` for a scalar).
    pub fn shape(&self) -> &[usize] {
        match self {
            Buffer::F32 { shape, .. } | Buffer::I64 { shape, .. } => shape,
        }
    }

    /// The values as f64.
    pub fn values_f64(&self) -> Vec<f64> {
        match self {
            Buffer::F32 { data, .. } => data.iter().map(|&x| x as f64).collect(),
            Buffer::I64 { data, .. } => data.iter().map(|&x| x as f64).collect(),
        }
    }

    fn to_raw(&self) -> Raw {
        match self {
            Buffer::F32 { shape, data } => Raw {
                dtype: StDtype::F32,
                shape: shape.clone(),
                bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
            Buffer::I64 { shape, data } => Raw {
                dtype: StDtype::I64,
                shape: shape.clone(),
                bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
        }
    }
}

/// Non-trainable buffers and tied keys of a model. Both default to none.
pub trait HasBuffers {
    /// `(key, value)` of every buffer, with full official keys (`rope.freqs`,
    /// `layers.0.mega.timenorm.prior_count`, ...).
    fn buffers(&self) -> Vec<(String, Buffer)> {
        Vec::new()
    }

    /// `(alias_key, param_key)` pairs: `alias_key` is written as a copy of the parameter
    /// `param_key` (e.g. `("output.output.weight", "embed.weight")` when the head is tied).
    fn aliases(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// `inner`'s buffers with their keys under `prefix`, for a model that holds another (a
/// classifier's `encoder`).
pub fn nested_buffers(prefix: &str, inner: &impl HasBuffers) -> Vec<(String, Buffer)> {
    inner
        .buffers()
        .into_iter()
        .map(|(k, b)| (crate::params::join(prefix, &k), b))
        .collect()
}

/// `inner`'s aliases with both keys under `prefix` (see [`nested_buffers`]).
pub fn nested_aliases(prefix: &str, inner: &impl HasBuffers) -> Vec<(String, String)> {
    let j = |k: &str| crate::params::join(prefix, k);
    inner
        .aliases()
        .into_iter()
        .map(|(a, k)| (j(&a), j(&k)))
        .collect()
}

// ------------------------------------------------------------------------------------------
// Atomic file writing
// ------------------------------------------------------------------------------------------

/// `<path>.tmp`, in the same directory as `path`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes a file atomically: `write` fills `<path>.tmp`, which is then fsynced and renamed over
/// `path`; the directory is fsynced afterwards (best effort). On failure the temporary file is
/// removed and `path` is left untouched.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let res = (|| -> Result<()> {
        write(&tmp)?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tmp)
            .with_context(|| format!("reopening {} to sync it", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res?;
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f =
            std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.flush()
            .with_context(|| format!("writing {}", tmp.display()))?;
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Raw tensors and safetensors I/O
// ------------------------------------------------------------------------------------------

/// A host tensor in safetensors layout (little-endian bytes).
#[derive(Debug, Clone)]
pub(crate) struct Raw {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Raw {
    pub(crate) fn f32_from<E: Float>(shape: Vec<usize>, data: &[E]) -> Self {
        let bytes = data
            .iter()
            .flat_map(|x| (x.to_f64().unwrap_or(f64::NAN) as f32).to_le_bytes())
            .collect();
        Raw {
            dtype: StDtype::F32,
            shape,
            bytes,
        }
    }

    /// Writes in the model dtype's width: `F64` for 8-byte dtypes, `F32` otherwise (exact for
    /// f32 and f64).
    pub(crate) fn native_from<E: Float>(shape: Vec<usize>, data: &[E]) -> Self {
        if std::mem::size_of::<E>() == 8 {
            let bytes = data
                .iter()
                .flat_map(|x| x.to_f64().unwrap_or(f64::NAN).to_le_bytes())
                .collect();
            Raw {
                dtype: StDtype::F64,
                shape,
                bytes,
            }
        } else {
            Self::f32_from(shape, data)
        }
    }
}

/// CRC-32 of named tensors: every key, dtype, shape and data byte, in key order.
fn checksum<'a>(tensors: impl Iterator<Item = (&'a str, StDtype, &'a [usize], &'a [u8])>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (k, dt, shape, bytes) in tensors {
        h.update(k.as_bytes());
        h.update(format!("{dt:?}{shape:?}").as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize()
}

/// Checks the tensors of a parsed file against the checksum in its metadata, when it has one
/// (files written by other tools have none). The error names the file.
pub(crate) fn verify_checksum(
    st: &SafeTensors<'_>,
    meta: &HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let Some(want) = meta.get(CHECKSUM_KEY) else {
        return Ok(());
    };
    let mut names: Vec<&String> = st.names();
    names.sort();
    let views = names
        .iter()
        .map(|k| {
            st.tensor(k)
                .map(|v| (k.as_str(), v))
                .map_err(|e| anyhow::anyhow!("reading `{k}` from {}: {e:?}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let got = checksum(
        views
            .iter()
            .map(|(k, v)| (*k, v.dtype(), v.shape(), v.data())),
    );
    if want != &format!("{got:08x}") {
        bail!(
            "{} is corrupt: its tensors have checksum {got:08x}, the file records {want}",
            path.display()
        );
    }
    Ok(())
}

/// Serializes named raw tensors (plus string metadata and a checksum of the tensors) to `path`,
/// atomically.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Raw>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut metadata = metadata.unwrap_or_default();
    let sum = checksum(
        tensors
            .iter()
            .map(|(k, r)| (k.as_str(), r.dtype, r.shape.as_slice(), r.bytes.as_slice())),
    );
    metadata.insert(CHECKSUM_KEY.to_string(), format!("{sum:08x}"));
    let metadata = Some(metadata);
    let views = tensors
        .iter()
        .map(|(k, r)| {
            TensorView::new(r.dtype, r.shape.clone(), &r.bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| anyhow::anyhow!("tensor {k}: {e:?}"))
        })
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("preparing {}", path.display()))?;
    write_atomic_with(path, |tmp| {
        ::safetensors::tensor::serialize_to_file(views, &metadata, tmp)
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(|| format!("writing safetensors file {}", tmp.display()))?;
        canonicalize_header(tmp)
    })
}

/// Rewrites, in place, the JSON header of the safetensors file at `path` with its string
/// metadata in key order. `safetensors` takes the metadata as a `HashMap`, whose iteration order
/// changes from process to process; sorted, the same tensors and metadata always give the same
/// bytes, so a resumed run's checkpoint is byte-identical to the uninterrupted one's. The
/// rewritten header has exactly the old length (same JSON, other key order), so no tensor moves.
fn canonicalize_header(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let ctx = || format!("rewriting the header of {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(ctx)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(ctx)?;
    let n = usize::try_from(u64::from_le_bytes(len)).with_context(ctx)?;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).with_context(ctx)?;
    let mut value: serde_json::Value = serde_json::from_slice(&header).with_context(ctx)?;
    let Some(top) = value.as_object_mut() else {
        bail!(
            "{}: the safetensors header is not a JSON object",
            path.display()
        );
    };
    if let Some(serde_json::Value::Object(meta)) = top.get_mut("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> =
            std::mem::take(meta).into_iter().collect();
        meta.extend(sorted);
    }
    let mut canonical = serde_json::to_vec(&value).with_context(ctx)?;
    if canonical.len() > n {
        bail!(
            "{}: the reordered safetensors header is longer ({} bytes) than the original ({n})",
            path.display(),
            canonical.len()
        );
    }
    canonical.resize(n, b' ');
    f.seek(SeekFrom::Start(8)).with_context(ctx)?;
    f.write_all(&canonical).with_context(ctx)?;
    Ok(())
}

/// Reads a whole file into memory; the error names it.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading safetensors file {}", path.display()))
}

/// Parses safetensors bytes and verifies their checksum (when recorded); errors name the file.
pub(crate) fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file (truncated or corrupt?): {e:?}",
            path.display()
        )
    })?;
    verify_checksum(&st, &parse_metadata(bytes, path)?, path)?;
    Ok(st)
}

/// Reads only the header of the safetensors file at `path` and checks that tensor `key` has
/// `shape`, so that a config can be checked against the weights before anything is allocated.
/// A missing key is left to the full load to report.
pub fn check_header_shape(path: &Path, key: &str, shape: &[usize]) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("opening safetensors file {}", path.display()))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .with_context(|| format!("{} is too short for a safetensors header", path.display()))?;
    let n = u64::from_le_bytes(n);
    let file_len = f
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    if n > file_len.saturating_sub(8) || n > 100_000_000 {
        bail!(
            "{} is not a valid safetensors file: header of {n} bytes in a file of {file_len}",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("reading the header of {}", path.display()))?;
    let header: serde_json::Value = serde_json::from_slice(&header).with_context(|| {
        format!(
            "{} is not a valid safetensors file (bad JSON header)",
            path.display()
        )
    })?;
    if let Some(found) = header.get(key).and_then(|t| t.get("shape")) {
        let found: Vec<usize> = serde_json::from_value(found.clone())
            .with_context(|| format!("{}: bad shape for `{key}`", path.display()))?;
        if found != shape {
            bail!(
                "{}: `{key}` has shape {found:?}, the config implies {shape:?}",
                path.display()
            );
        }
    }
    Ok(())
}

/// The string metadata (`__metadata__`) of safetensors bytes.
pub(crate) fn parse_metadata(bytes: &[u8], path: &Path) -> Result<HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file (truncated or corrupt?): {e:?}",
            path.display()
        )
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Converts a float tensor view to f64 values; the error names the key and the dtype.
pub(crate) fn view_to_f64(key: &str, v: &TensorView<'_>) -> Result<Vec<f64>> {
    let b = v.data();
    let out = match v.dtype() {
        StDtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        StDtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        StDtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        StDtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        other => bail!("tensor `{key}` has dtype {other:?}; expected F32, F64, BF16 or F16"),
    };
    Ok(out)
}

/// Converts any numeric tensor view (floats and integers) to f64 values.
fn view_to_f64_any(key: &str, v: &TensorView<'_>) -> Result<Vec<f64>> {
    let b = v.data();
    let out = match v.dtype() {
        StDtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)
            .collect(),
        StDtype::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        StDtype::U8 | StDtype::BOOL => b.iter().map(|&x| x as f64).collect(),
        _ => return view_to_f64(key, v),
    };
    Ok(out)
}

/// Converts f64 values to the model dtype.
pub(crate) fn to_dtype<E: Float>(vals: &[f64]) -> Vec<E> {
    vals.iter()
        .map(|&x| <E as num_traits::NumCast>::from(x).unwrap_or_else(E::nan))
        .collect()
}

fn tensor_shape<S: Shape>(s: &S) -> Vec<usize> {
    s.concrete().into()
}

// ------------------------------------------------------------------------------------------
// Model save / load
// ------------------------------------------------------------------------------------------

/// Collects every parameter as an F32 raw tensor.
struct Collect(BTreeMap<String, Raw>);
impl<E: Float, D: Device<E>> ParamVisitor<E, D> for Collect {
    fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> Result<()> {
        let raw = Raw::f32_from(tensor_shape(t.shape()), &t.as_vec());
        if self.0.insert(name.to_string(), raw).is_some() {
            bail!("parameter name `{name}` is visited twice");
        }
        Ok(())
    }
}

/// Collects every parameter's shape.
struct Shapes(Vec<(String, Vec<usize>)>);
impl<E: Dtype, D: Device<E>> ParamVisitor<E, D> for Shapes {
    fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> Result<()> {
        self.0.push((name.to_string(), tensor_shape(t.shape())));
        Ok(())
    }
}

/// The names and shapes of a model's parameters, in visiting order.
pub fn param_shapes<E: Dtype, D: Device<E>, M: Params<E, D>>(
    model: &mut M,
) -> Result<Vec<(String, Vec<usize>)>> {
    let mut s = Shapes(Vec::new());
    model.visit_params("", &mut s)?;
    Ok(s.0)
}

/// Writes every parameter (as F32), every buffer and every alias of `model` to `path`
/// atomically.
pub fn save_safetensors<E, D, M>(model: &mut M, path: &Path) -> Result<()>
where
    E: Float,
    D: Device<E>,
    M: Params<E, D> + HasBuffers,
{
    let mut c = Collect(BTreeMap::new());
    model
        .visit_params("", &mut c)
        .with_context(|| format!("collecting parameters for {}", path.display()))?;
    let mut tensors = c.0;
    for (key, buf) in model.buffers() {
        let n: usize = buf.shape().iter().product();
        let len = match &buf {
            Buffer::F32 { data, .. } => data.len(),
            Buffer::I64 { data, .. } => data.len(),
        };
        if n != len {
            bail!(
                "buffer `{key}`: shape {:?} needs {n} values, has {len}",
                buf.shape()
            );
        }
        if tensors.insert(key.clone(), buf.to_raw()).is_some() {
            bail!("buffer key `{key}` collides with a parameter or another buffer");
        }
    }
    for (alias, target) in model.aliases() {
        let raw = tensors
            .get(&target)
            .cloned()
            .with_context(|| format!("alias `{alias}` points to unknown parameter `{target}`"))?;
        if tensors.insert(alias.clone(), raw).is_some() {
            bail!("alias key `{alias}` collides with a parameter, buffer or another alias");
        }
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(path, &tensors, Some(meta))
}

/// Copies file values into the parameters, checking shapes.
struct Load<'a> {
    st: &'a SafeTensors<'a>,
    /// param key -> key in the file to read it from (itself or an alias).
    source: &'a HashMap<String, String>,
    path: &'a Path,
}
impl<E: Float, D: Device<E>> ParamVisitor<E, D> for Load<'_> {
    fn visit<S: Shape>(&mut self, name: &str, t: &mut Tensor<S, E, D>) -> Result<()> {
        let expected = tensor_shape(t.shape());
        let src = self
            .source
            .get(name)
            .with_context(|| format!("missing parameter `{name}` (expected shape {expected:?})"))?;
        let v = self
            .st
            .tensor(src)
            .map_err(|e| anyhow::anyhow!("reading `{src}` from {}: {e:?}", self.path.display()))?;
        if v.shape() != expected.as_slice() {
            bail!(
                "shape mismatch for parameter `{name}`: the model expects {expected:?}, {} has {:?}",
                self.path.display(),
                v.shape()
            );
        }
        let vals = view_to_f64(src, &v)?;
        t.copy_from(&to_dtype::<E>(&vals));
        Ok(())
    }
}

/// Loads every parameter of `model` from the safetensors file at `path`.
///
/// Errors (each naming the key or the file): a parameter missing from the file (with its
/// expected shape), a shape mismatch (expected and found shapes), an unsupported dtype, keys in
/// the file that are neither parameters, buffers nor aliases, a buffer that fails validation
/// (`prior_count` must be 0, `prior_mean`/`prior_logv` must match in shape, `rope.freqs` must
/// equal the model's within 1e-6 relative, or the precision of a BF16/F16 file), an alias that differs from its parameter, or a file
/// that is not a valid safetensors file. Buffers missing from the file are fine; an alias present
/// without its parameter supplies the parameter.
pub fn load_safetensors<E, D, M>(model: &mut M, path: &Path) -> Result<()>
where
    E: Float,
    D: Device<E>,
    M: Params<E, D> + HasBuffers,
{
    let bytes = read_file(path)?;
    let st = parse(&bytes, path)?;
    let in_file: BTreeSet<String> = st.names().into_iter().cloned().collect();

    let shapes = param_shapes(model)?;
    let params: BTreeSet<String> = shapes.iter().map(|(k, _)| k.clone()).collect();
    let buffers: BTreeMap<String, Buffer> = model.buffers().into_iter().collect();
    let aliases = model.aliases();

    // Extra keys.
    let extra: Vec<&String> = in_file
        .iter()
        .filter(|k| {
            !params.contains(*k)
                && !buffers.contains_key(*k)
                && !aliases.iter().any(|(a, _)| a == *k)
        })
        .collect();
    if !extra.is_empty() {
        bail!(
            "{} has {} unexpected key(s) (neither parameters, buffers nor aliases of this model): {}",
            path.display(),
            extra.len(),
            extra.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
        );
    }

    // Where each parameter comes from.
    let mut source: HashMap<String, String> = HashMap::new();
    let mut missing = Vec::new();
    for (k, shape) in &shapes {
        if in_file.contains(k) {
            source.insert(k.clone(), k.clone());
        } else if let Some((a, _)) = aliases.iter().find(|(a, p)| p == k && in_file.contains(a)) {
            source.insert(k.clone(), a.clone());
        } else {
            missing.push(format!("`{k}` (expected shape {shape:?})"));
        }
    }
    if !missing.is_empty() {
        bail!(
            "{} is missing parameter(s): {}",
            path.display(),
            missing.join(", ")
        );
    }

    // Buffers.
    for (key, buf) in &buffers {
        if !in_file.contains(key) {
            continue;
        }
        let v = st
            .tensor(key)
            .map_err(|e| anyhow::anyhow!("reading `{key}` from {}: {e:?}", path.display()))?;
        if v.shape() != Buffer::shape(buf) {
            bail!(
                "shape mismatch for buffer `{key}`: the model expects {:?}, {} has {:?}",
                buf.shape(),
                path.display(),
                v.shape()
            );
        }
        let vals = view_to_f64_any(key, &v)?;
        if key.ends_with("prior_count") {
            if vals.iter().any(|&x| x != 0.0) {
                bail!(
                    "buffer `{key}` in {} is {vals:?}: prior_count != 0 is not supported",
                    path.display()
                );
            }
        } else if key.ends_with("rope.freqs") {
            // 1e-6 relative, widened to the file dtype's precision for half-precision files.
            let tol = match v.dtype() {
                StDtype::BF16 => 1.0 / 256.0,
                StDtype::F16 => 1.0 / 2048.0,
                _ => 1e-6,
            };
            for (i, (&f, m)) in vals.iter().zip(buf.values_f64()).enumerate() {
                if (f - m).abs() > tol * m.abs().max(f.abs()) {
                    bail!(
                        "buffer `{key}` in {} differs from the model's at index {i}: file {f}, model {m} (different rope_base or head width?)",
                        path.display()
                    );
                }
            }
        }
    }

    // Aliases present in the file must equal their parameter.
    for (alias, target) in &aliases {
        if !in_file.contains(alias) || !in_file.contains(target) {
            continue;
        }
        let read = |k: &str| -> Result<(Vec<usize>, Vec<f64>)> {
            let v = st
                .tensor(k)
                .map_err(|e| anyhow::anyhow!("reading `{k}` from {}: {e:?}", path.display()))?;
            Ok((v.shape().to_vec(), view_to_f64(k, &v)?))
        };
        let (sa, va) = read(alias)?;
        let (sp, vp) = read(target)?;
        if sa != sp || va != vp {
            bail!(
                "tied key `{alias}` in {} differs from `{target}` (the model ties them)",
                path.display()
            );
        }
    }

    let mut l = Load {
        st: &st,
        source: &source,
        path,
    };
    model
        .visit_params("", &mut l)
        .with_context(|| format!("loading {}", path.display()))
}

// ------------------------------------------------------------------------------------------
// Run directories
// ------------------------------------------------------------------------------------------

/// Writes `config.json` (pretty JSON) and `model.safetensors` into `dir` (created if needed),
/// each atomically.
pub fn save_run<E, D, M>(dir: &Path, conf: &impl serde::Serialize, model: &mut M) -> Result<()>
where
    E: Float,
    D: Device<E>,
    M: Params<E, D> + HasBuffers,
{
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating run directory {}", dir.display()))?;
    save_config(dir, conf)?;
    save_safetensors(model, &dir.join(MODEL_FILE))
}

/// Writes `dir/config.json` (pretty JSON) atomically.
pub fn save_config(dir: &Path, conf: &impl serde::Serialize) -> Result<()> {
    let path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(conf).context("serializing the model config")?;
    write_atomic(&path, text.as_bytes())
}

/// Reads `dir/config.json`. Checking it against a model type (`ModelConf::check_dims`) is the
/// caller's job.
pub fn load_config(dir: &Path) -> Result<ModelConf> {
    ModelConf::load(&dir.join(CONFIG_FILE))
}

/// Reads `dir/config.json` as any head's config type; the error names the file.
pub fn load_json<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading config {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
}

/// Loads `dir/model.safetensors` into `model` (see [`load_safetensors`]).
pub fn load_run_weights<E, D, M>(dir: &Path, model: &mut M) -> Result<()>
where
    E: Float,
    D: Device<E>,
    M: Params<E, D> + HasBuffers,
{
    load_safetensors(model, &dir.join(MODEL_FILE))
}
