//! Model configuration, mirroring the official `ModelConf` (`megalodon/config.py`) field names so
//! that an official `config.json` reads unchanged.

use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// Fields a `config.json` must have: the widths and the chunk size.
pub const REQUIRED_FIELDS: &[&str] = &[
    "num_layers",
    "model_dim",
    "z_dim",
    "value_dim",
    "num_heads",
    "ffn_hidden_dim",
    "cema_ndim",
    "norm_num_groups",
    "chunk_size",
    "vocab_size",
];

/// The serde twin of the official `ModelConf`. Widths (`model_dim` ... `norm_num_groups`,
/// `num_layers`) are also fixed at compile time by the preset type; [`ModelConf::check_dims`]
/// compares the two. `vocab_size` and `chunk_size` are run-time values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConf {
    /// Number of Megalodon layers (L).
    pub num_layers: usize,
    /// Model width D (`model_dim`).
    pub model_dim: usize,
    /// Shared query/key width Z.
    pub z_dim: usize,
    /// Value width E.
    pub value_dim: usize,
    /// Attention heads H.
    pub num_heads: usize,
    /// FFN hidden width F.
    pub ffn_hidden_dim: usize,
    /// CEMA order N.
    pub cema_ndim: usize,
    /// Attention chunk size C (changes no parameter shape).
    pub chunk_size: usize,
    /// TimestepNorm groups G.
    pub norm_num_groups: usize,
    /// Vocabulary size V (run time; read from the tokenizer or checkpoint).
    pub vocab_size: usize,
    /// Epsilon of every norm.
    pub norm_eps: f64,
    /// RoPE base; `None` means 10000.
    pub rope_base: Option<f64>,
    /// SwiGLU FFN (adds `nffn.fc3`).
    pub swiglu: bool,
    /// Multiply embeddings by sqrt(D).
    pub scale_emb: bool,
    /// Tie the LM head to the embedding.
    pub share_emb: bool,
    /// Scale the FFN output by a learned `nffn.alpha` (init 0.1 * 0.5^layer).
    pub rescale_nffn: bool,
    /// Residual dropout probability.
    pub dropout: f64,
    /// Hidden dropout probability.
    pub hidden_dropout: f64,
    /// Attention-probability dropout.
    pub attention_dropout: f64,
    /// Weight init mode ("he" is the official default).
    pub init_mode: String,
    /// Official attention kernel selector (unused here; kept for config round trips).
    pub efficient_attn: Option<String>,
    /// Norms carry affine weights (always true in official configs).
    pub norm_affine: bool,
}

impl Default for ModelConf {
    /// The official `ModelConf` defaults.
    fn default() -> Self {
        Self {
            num_layers: 8,
            model_dim: 1024,
            z_dim: 256,
            value_dim: 2048,
            num_heads: 1,
            ffn_hidden_dim: 2048,
            cema_ndim: 16,
            chunk_size: 2048,
            norm_num_groups: 32,
            vocab_size: 32000,
            norm_eps: 1e-5,
            rope_base: None,
            swiglu: false,
            scale_emb: false,
            share_emb: false,
            rescale_nffn: false,
            dropout: 0.0,
            hidden_dropout: 0.0,
            attention_dropout: 0.0,
            init_mode: "he".to_string(),
            efficient_attn: None,
            norm_affine: true,
        }
    }
}

/// Compile-time widths of a model type, used to check a [`ModelConf`] against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub num_layers: usize,
    pub model_dim: usize,
    pub z_dim: usize,
    pub value_dim: usize,
    pub num_heads: usize,
    pub ffn_hidden_dim: usize,
    pub cema_ndim: usize,
    pub norm_num_groups: usize,
}

impl Dims {
    /// The widths of a type with const generics `<L, M, Z, V, H, F, N, G>` (docs/design.md §0).
    pub const fn of<
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
    >() -> Self {
        Self {
            num_layers: L,
            model_dim: M,
            z_dim: Z,
            value_dim: V,
            num_heads: H,
            ffn_hidden_dim: F,
            cema_ndim: N,
            norm_num_groups: G,
        }
    }
}

impl ModelConf {
    /// A config with the given compile-time widths and the official defaults elsewhere.
    pub fn from_dims(d: Dims, chunk_size: usize, vocab_size: usize) -> Self {
        Self {
            num_layers: d.num_layers,
            model_dim: d.model_dim,
            z_dim: d.z_dim,
            value_dim: d.value_dim,
            num_heads: d.num_heads,
            ffn_hidden_dim: d.ffn_hidden_dim,
            cema_ndim: d.cema_ndim,
            norm_num_groups: d.norm_num_groups,
            chunk_size,
            vocab_size,
            ..Self::default()
        }
    }

    /// The compile-time part of this config.
    pub fn dims(&self) -> Dims {
        Dims {
            num_layers: self.num_layers,
            model_dim: self.model_dim,
            z_dim: self.z_dim,
            value_dim: self.value_dim,
            num_heads: self.num_heads,
            ffn_hidden_dim: self.ffn_hidden_dim,
            cema_ndim: self.cema_ndim,
            norm_num_groups: self.norm_num_groups,
        }
    }

    /// RoPE base with the official default applied.
    pub fn rope_base(&self) -> f64 {
        self.rope_base.unwrap_or(10000.0)
    }

    /// Checks this config against the widths of a model type; the error names the field and
    /// both values.
    pub fn check_dims(&self, expected: &Dims) -> Result<(), ConfigError> {
        let found = self.dims();
        let pairs = [
            ("num_layers", expected.num_layers, found.num_layers),
            ("model_dim", expected.model_dim, found.model_dim),
            ("z_dim", expected.z_dim, found.z_dim),
            ("value_dim", expected.value_dim, found.value_dim),
            ("num_heads", expected.num_heads, found.num_heads),
            (
                "ffn_hidden_dim",
                expected.ffn_hidden_dim,
                found.ffn_hidden_dim,
            ),
            ("cema_ndim", expected.cema_ndim, found.cema_ndim),
            (
                "norm_num_groups",
                expected.norm_num_groups,
                found.norm_num_groups,
            ),
        ];
        for (field, e, f) in pairs {
            if e != f {
                return Err(ConfigError::Width {
                    field,
                    expected: e,
                    found: f,
                });
            }
        }
        self.validate()
    }

    /// Checks the run-time fields for values the model cannot run with. The vocabulary is not
    /// checked here: a backbone or encoder has none (the language model checks it).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = self.dims();
        let checks: [(bool, String); 8] = [
            (self.chunk_size > 0, "chunk_size must be > 0".into()),
            (self.norm_eps.is_finite(), format!("norm_eps must be finite, found {}", self.norm_eps)),
            (d.num_heads > 0 && d.z_dim.is_multiple_of(d.num_heads), format!("z_dim {} must be a multiple of num_heads {}", d.z_dim, d.num_heads)),
            (d.num_heads > 0 && d.value_dim.is_multiple_of(d.num_heads), format!("value_dim {} must be a multiple of num_heads {}", d.value_dim, d.num_heads)),
            ((d.z_dim / d.num_heads.max(1)).is_multiple_of(2), format!("per-head z width {} must be even (RoPE)", d.z_dim / d.num_heads.max(1))),
            (d.norm_num_groups > 0 && d.model_dim.is_multiple_of(d.norm_num_groups), format!("model_dim {} must be a multiple of norm_num_groups {}", d.model_dim, d.norm_num_groups)),
            (self.norm_eps > 0.0, format!("norm_eps must be > 0, found {}", self.norm_eps)),
            (self.dropout == 0.0 && self.hidden_dropout == 0.0 && self.attention_dropout == 0.0, "dropout is not implemented: dropout, hidden_dropout and attention_dropout must be 0".into()),
        ];
        for (ok, msg) in checks {
            if !ok {
                return Err(ConfigError::Invalid(msg));
            }
        }
        Ok(())
    }

    /// Reads a `config.json`; the error names the file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Parses a `config.json` text. The widths (`num_layers` ... `norm_num_groups`) and
    /// `chunk_size` are required (a missing one is reported as missing, not defaulted); the other
    /// fields default to the official values. Numbers that are not finite, or out of range for
    /// their field, are reported with the field's name.
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        // serde_json reads 1e400 as infinity and has no NaN: check the raw values first so the
        // message names the field
        let raw: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            // name the field on the offending line (e.g. `"norm_eps": 1e400` or `NaN`)
            let field = text
                .lines()
                .nth(e.line().saturating_sub(1))
                .and_then(|l| {
                    // the last `"key":` before the error's column
                    let upto = l.get(..e.column().min(l.len()))?;
                    let colon = upto.rfind("\":")?;
                    let start = upto[..colon].rfind('"')? + 1;
                    Some(upto[start..colon].to_string())
                })
                .map(|f| format!(" (field `{f}`)"))
                .unwrap_or_default();
            anyhow::anyhow!(
                "not valid JSON{field}: {e}; numbers must be finite (NaN, Infinity and \
                 out-of-range values like 1e400 are not allowed)"
            )
        })?;
        let obj = raw
            .as_object()
            .ok_or_else(|| anyhow::anyhow!("expected a JSON object of config fields"))?;
        for field in REQUIRED_FIELDS {
            if !obj.contains_key(*field) {
                return Err(ConfigError::Missing(field.to_string()).into());
            }
        }
        for (k, v) in obj {
            if let Some(x) = v.as_f64() {
                if !x.is_finite() {
                    return Err(ConfigError::Invalid(format!(
                        "field `{k}` is {v}, not a finite number"
                    ))
                    .into());
                }
            }
        }
        serde_json::from_value(raw).map_err(|e| anyhow::anyhow!("invalid config field: {e}"))
    }
}
