//! The image classifier: patch embedding, optional learned position embedding, the core's
//! [`BidirectionalEncoder`], masked mean pooling and the shared [`ClassHead`].
//!
//! ```text
//! image S×S×C -> (S/P)² patches of P·P·C values  (crate::patches, raster order)
//!             -> patch_embed: Linear(P·P·C -> M)     `patch_embed.weight`, `patch_embed.bias`
//!             -> + pos_embed[grid positions]         `pos_embed` (table × M), when enabled
//!             -> encoder (L bidirectional layers)    `encoder.layers.{i}.…`, `encoder.output.…`
//!             -> mean over the tokens
//!             -> head: Linear(M -> classes)          `head.weight`, `head.bias`
//! ```
//!
//! The patch size `P`, the channels `C` and the patch width `PD = P·P·C` are compile-time (a
//! `const` assertion ties them), as are the encoder widths. The image size is a run-time value
//! within the position table: the table covers a `(max_image_size / P)²` grid and an image of
//! side `S <= max_image_size` uses the top-left `(S / P)²` sub-grid (so the positions of a patch
//! do not depend on the image size). The class count is run-time (read from the data).
//!
//! Presets are type aliases plus a [`VisionPreset`] holding their run-time defaults:
//! [`FashionSmall`] ([`FASHION_SMALL`]) and [`ImageNetMegalodon`] ([`IMAGENET`]).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use dfdx::prelude::*;
use image::DynamicImage;
use megalodon_core::checkpoint::{self, Buffer, HasBuffers};
use megalodon_core::config::ModelConf;
use megalodon_core::device::MegaDevice;
use megalodon_core::fit::{load_trained, Trainable};
use megalodon_core::nn::classifier::{class_cross_entropy, softmax_rows, ClassHead, ClassLogits};
use megalodon_core::nn::layers::{normal_vec, Linear};
use megalodon_core::params::{join, ParamVisitor, Params};
use megalodon_core::util::{c, Float};
use megalodon_core::{masked_mean_pool, BidirectionalEncoder};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::loader::Batch;
use crate::patches::{num_patches, patch_dim, patchify};
use crate::transforms::{ColorMode, Normalize, Transform};

/// Everything that defines a vision model besides its compile-time type: written as
/// `config.json` in every checkpoint and checked when a run is loaded or used as `--init`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConf {
    /// Preset name (`fashion-small`, `imagenet`).
    pub preset: String,
    /// The encoder's widths and chunk size.
    pub encoder: ModelConf,
    /// Side of the (square) input images the model is trained on.
    pub image_size: usize,
    /// Side covered by the position table (`>= image_size`, a multiple of `patch`).
    pub max_image_size: usize,
    /// Patch side `P`.
    pub patch: usize,
    /// Input channels `C` (1 gray, 3 RGB).
    pub channels: usize,
    /// Whether a learned position embedding is added to the patch embeddings.
    pub pos_embed: bool,
    /// Class names; index = label id.
    pub classes: Vec<String>,
    /// Per-channel normalisation mean (on `[0, 1]` values).
    pub mean: Vec<f32>,
    /// Per-channel normalisation std.
    pub std: Vec<f32>,
}

impl VisionConf {
    /// Patches per image at `image_size`.
    pub fn tokens(&self) -> Result<usize> {
        num_patches(self.image_size, self.patch).context("model image and patch sizes")
    }

    /// The colour mode of the inputs.
    pub fn color(&self) -> Result<ColorMode> {
        match self.channels {
            1 => Ok(ColorMode::Gray),
            3 => Ok(ColorMode::Rgb),
            c => bail!("a vision model takes 1 (gray) or 3 (RGB) channels, not {c}"),
        }
    }

    /// The evaluation transform: shorter side resized to `image_size`, center crop, the
    /// model's colour mode and normalisation, HWC, inputs smaller than one patch rejected.
    pub fn eval_transform(&self) -> Result<Transform> {
        let size = u32::try_from(self.image_size)
            .with_context(|| format!("image size {} too large", self.image_size))?;
        let patch = u32::try_from(self.patch)
            .with_context(|| format!("patch size {} too large", self.patch))?;
        Ok(Transform::eval(size)
            .with_color(self.color()?)
            .with_normalize(Normalize::new(&self.mean, &self.std)?)
            .with_min_side(patch))
    }

    /// Checks that a run initialised from `init` (a `config.json` of an earlier run) can take its
    /// weights: same preset, widths, patch, channels, position table and image size. The class
    /// names may differ (the head is then re-initialised). Errors name `--init` and the field.
    pub fn check_init(&self, init: &VisionConf) -> Result<()> {
        let pairs: [(&str, String, String); 7] = [
            ("preset", init.preset.clone(), self.preset.clone()),
            ("patch", init.patch.to_string(), self.patch.to_string()),
            (
                "channels",
                init.channels.to_string(),
                self.channels.to_string(),
            ),
            (
                "image_size",
                init.image_size.to_string(),
                self.image_size.to_string(),
            ),
            (
                "max_image_size",
                init.max_image_size.to_string(),
                self.max_image_size.to_string(),
            ),
            (
                "pos_embed",
                init.pos_embed.to_string(),
                self.pos_embed.to_string(),
            ),
            (
                "encoder widths",
                format!("{:?}", init.encoder.dims()),
                format!("{:?}", self.encoder.dims()),
            ),
        ];
        for (field, theirs, ours) in pairs {
            ensure!(
                theirs == ours,
                "--init run has {field} {theirs}, but this run needs {ours}: initialise from a run \
                 of the same preset, image size and position-embedding setting"
            );
        }
        Ok(())
    }
}

/// Run-time defaults of a preset (its type fixes the widths, patch and channels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VisionPreset {
    /// Name recorded in the config.
    pub name: &'static str,
    /// Default input side.
    pub image_size: usize,
    /// Side covered by the position table.
    pub max_image_size: usize,
    /// Patch side (must equal the type's `P`).
    pub patch: usize,
    /// Channels (must equal the type's `C`).
    pub channels: usize,
    /// Attention chunk size (tokens).
    pub chunk: usize,
    /// Default normalisation mean.
    pub mean: &'static [f32],
    /// Default normalisation std.
    pub std: &'static [f32],
}

/// The CPU preset: 28×28 gray, patch 4 (49 tokens), 2 layers, M 64, Z 32, V 128, H 2, F 128,
/// N 8, G 4; attention over all 49 tokens in one chunk.
pub const FASHION_SMALL: VisionPreset = VisionPreset {
    name: "fashion-small",
    image_size: 28,
    max_image_size: 28,
    patch: 4,
    channels: 1,
    chunk: 64,
    mean: &[crate::transforms::FASHION_MNIST_MEAN],
    std: &[crate::transforms::FASHION_MNIST_STD],
};

/// ImageNet: 224×224 RGB, patch 16 (196 tokens), 12 layers, D 768, Z 256, value and FFN 1536,
/// N 16, H 1, G 32, chunk 196 (attention over all tokens), ImageNet normalisation.
pub const IMAGENET: VisionPreset = VisionPreset {
    name: "imagenet",
    image_size: 224,
    max_image_size: 224,
    patch: 16,
    channels: 3,
    chunk: 196,
    mean: &crate::transforms::IMAGENET_MEAN,
    std: &crate::transforms::IMAGENET_STD,
};

/// The CPU preset's type (see [`FASHION_SMALL`]).
pub type FashionSmall<E, D> = ImageClassifier<4, 1, 16, 2, 64, 32, 128, 2, 128, 8, 4, E, D>;

/// The ImageNet preset's type (see [`IMAGENET`]); about 83M parameters with 1000 classes
/// ([`param_count`]).
pub type ImageNetMegalodon<E, D> =
    ImageClassifier<16, 3, 768, 12, 768, 256, 1536, 1, 1536, 16, 32, E, D>;

/// Number of parameters of a vision model with config `conf` and `classes` classes, computed
/// from the config alone (nothing is allocated). Errors on overflow or bad sizes.
pub fn param_count(conf: &VisionConf, classes: usize) -> Result<usize> {
    let e = &conf.encoder;
    let (d, z, v, f, n) = (
        e.model_dim,
        e.z_dim,
        e.value_dim,
        e.ffn_hidden_dim,
        e.cema_ndim,
    );
    let ovf = || anyhow::anyhow!("parameter count of {} overflows", conf.preset);
    let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(ovf);
    let add = |xs: &[usize]| {
        xs.iter()
            .try_fold(0usize, |s, &x| s.checked_add(x))
            .ok_or_else(ovf)
    };
    // one complex EMA: alpha, delta (D·N each), theta (D), gamma (D·N·2), omega (D)
    let cema = add(&[mul(mul(4, n)?, d)?, mul(2, d)?])?;
    // norm (2D), two EMAs, the gated projections as in the causal block's count
    // (`megalodon_core::nn::model::param_count`: 3DV + DZ + D² + 2V + 5Z + 2D)
    let mega = add(&[
        mul(4, d)?,
        mul(2, cema)?,
        mul(mul(3, d)?, v)?,
        mul(d, z)?,
        mul(d, d)?,
        mul(2, v)?,
        mul(5, z)?,
    ])?;
    let ffn = add(&[
        mul(2, d)?,
        mul(mul(2, d)?, f)?,
        if e.swiglu { mul(d, f)? } else { 0 },
        if e.rescale_nffn { d } else { 0 },
    ])?;
    let encoder = add(&[mul(e.num_layers, add(&[mega, ffn])?)?, mul(2, d)?])?;
    let pd = patch_dim(conf.patch, conf.channels)?;
    let patch_embed = add(&[mul(pd, d)?, d])?;
    let pos = if conf.pos_embed {
        mul(num_patches(conf.max_image_size, conf.patch)?, d)?
    } else {
        0
    };
    let head = add(&[mul(classes, d)?, classes])?;
    add(&[patch_embed, pos, encoder, head])
}

/// Indices into a `table × table` position grid of the top-left `grid × grid` sub-grid, in
/// raster order.
fn grid_positions(grid: usize, table: usize) -> Vec<usize> {
    (0..grid)
        .flat_map(|r| (0..grid).map(move |col| r * table + col))
        .collect()
}

/// Integer square root of `n` when `n` is a perfect square.
fn exact_sqrt(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r.checked_mul(r) == Some(n)).then_some(r)
}

/// An image classifier (see the module docs). Generics: `P` patch side, `C` channels, `PD =
/// P·P·C`, then the encoder's `L, M, Z, V, H, F, N, G`, dtype and device.
pub struct ImageClassifier<
    const P: usize,
    const C: usize,
    const PD: usize,
    const L: usize,
    const M: usize,
    const Z: usize,
    const V: usize,
    const H: usize,
    const F: usize,
    const N: usize,
    const G: usize,
    E: Dtype,
    D: Device<E>,
> {
    /// `patch_embed`: `P·P·C -> M`.
    pub patch_embed: Linear<PD, M, E, D>,
    /// `pos_embed`: `(max_image_size / P)² × M`, when enabled.
    pub pos_embed: Option<Tensor<(usize, Const<M>), E, D>>,
    /// `encoder`.
    pub encoder: BidirectionalEncoder<L, M, Z, V, H, F, N, G, E, D>,
    /// `head`: `M -> classes`.
    pub head: ClassHead<M, E, D>,
    /// The configuration (`config.json`).
    pub conf: VisionConf,
}

impl<
        const P: usize,
        const C: usize,
        const PD: usize,
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > ImageClassifier<P, C, PD, L, M, Z, V, H, F, N, G, E, D>
{
    /// Compile-time check that `PD = P·P·C`.
    const PATCH_DIM_OK: () = assert!(PD == P * P * C, "PD must equal P * P * C");

    /// The config of `preset` for this type with the given classes and position-embedding flag.
    /// Errors when the preset's patch or channels differ from the type's, or the classes are
    /// fewer than two.
    pub fn preset_conf(
        preset: &VisionPreset,
        classes: Vec<String>,
        pos_embed: bool,
    ) -> Result<VisionConf> {
        let conf = VisionConf {
            preset: preset.name.to_string(),
            encoder: BidirectionalEncoder::<L, M, Z, V, H, F, N, G, E, D>::default_conf(
                preset.chunk,
            ),
            image_size: preset.image_size,
            max_image_size: preset.max_image_size,
            patch: preset.patch,
            channels: preset.channels,
            pos_embed,
            classes,
            mean: preset.mean.to_vec(),
            std: preset.std.to_vec(),
        };
        Self::check_conf(&conf)?;
        Ok(conf)
    }

    /// Checks `conf` against this type and for sizes the model cannot run with.
    pub fn check_conf(conf: &VisionConf) -> Result<()> {
        let () = Self::PATCH_DIM_OK;
        ensure!(
            conf.patch == P && conf.channels == C,
            "config {} has patch {} and {} channel(s), but this model type has patch {P} and {C} \
             channel(s)",
            conf.preset,
            conf.patch,
            conf.channels
        );
        conf.encoder
            .check_dims(&BidirectionalEncoder::<L, M, Z, V, H, F, N, G, E, D>::DIMS)
            .with_context(|| format!("encoder config of preset {}", conf.preset))?;
        conf.tokens()?;
        num_patches(conf.max_image_size, conf.patch).context("position table size")?;
        ensure!(
            conf.image_size <= conf.max_image_size,
            "image size {} exceeds the position table's {}",
            conf.image_size,
            conf.max_image_size
        );
        ensure!(
            conf.classes.len() >= 2,
            "a classifier needs at least two classes, found {} ({:?})",
            conf.classes.len(),
            conf.classes
        );
        Normalize::new(&conf.mean, &conf.std)?;
        conf.color()?;
        Ok(())
    }

    /// A freshly initialised model, deterministic in `seed`.
    pub fn new(dev: &D, conf: VisionConf, seed: u64) -> Result<Self> {
        Self::check_conf(&conf)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let patch_embed = Linear::new(dev, &mut rng, true);
        let table = num_patches(conf.max_image_size, conf.patch)?;
        let pos_len = table
            .checked_mul(M)
            .with_context(|| format!("position table of {table} x {M} overflows"))?;
        let pos_embed = conf.pos_embed.then(|| {
            dev.tensor_from_vec(
                normal_vec::<E>(&mut rng, pos_len, 0.02, Some(0.04)),
                (table, Const::<M>),
            )
        });
        let encoder = BidirectionalEncoder::init(dev, conf.encoder.clone(), &mut rng)?;
        let head = ClassHead::new(dev, &mut rng, conf.classes.len())?;
        Ok(Self {
            patch_embed,
            pos_embed,
            encoder,
            head,
            conf,
        })
    }

    /// Replaces the head by a freshly initialised one for `classes` (fine-tuning on other
    /// classes).
    pub fn reset_head(&mut self, classes: Vec<String>, seed: u64) -> Result<()> {
        self.head.reinit(classes.len(), seed)?;
        self.conf.classes = classes;
        Ok(())
    }

    /// Loads a run directory on `dev`: a run's `out` folder (its latest checkpoint is used) or
    /// a checkpoint folder holding `config.json` and `model.safetensors`.
    pub fn load_on(dev: &D, run: impl AsRef<Path>) -> Result<Self> {
        load_trained(run.as_ref(), "a vision run", |conf| Self::new(dev, conf, 0))
    }

    /// Class names.
    pub fn classes(&self) -> &[String] {
        &self.conf.classes
    }

    /// The positions added to `tokens` patches (`tokens` must be a square grid fitting the
    /// table).
    fn positions(&self, tokens: usize) -> Result<Option<Vec<usize>>> {
        if self.pos_embed.is_none() {
            return Ok(None);
        }
        let table = self.conf.max_image_size / self.conf.patch;
        let grid = exact_sqrt(tokens)
            .with_context(|| format!("{tokens} patches do not form a square grid"))?;
        ensure!(
            grid <= table,
            "a {grid}x{grid} patch grid exceeds the {table}x{table} position table (image larger \
             than {} pixels)",
            self.conf.max_image_size
        );
        Ok(Some(grid_positions(grid, table)))
    }

    /// Class logits of patchified images `x (B, T, P·P·C)`.
    pub fn logits<T: Tape<E, D> + Merge<NoneTape>>(
        &self,
        x: Tensor<(usize, usize, Const<PD>), E, D, T>,
    ) -> Result<ClassLogits<E, D, T>> {
        let shape = *x.shape();
        let (b, t) = (shape.0, shape.1);
        ensure!(
            b > 0 && t > 0,
            "empty image batch ({b} images of {t} patches)"
        );
        let mut h = self.patch_embed.forward(x)?;
        if let (Some(pos), Some(idx)) = (&self.pos_embed, self.positions(t)?) {
            let dev = pos.device().clone();
            let idx: Tensor<(usize,), usize, D> = dev.tensor_from_vec(idx, (t,));
            let p = pos.retaped::<T>().gather(idx);
            h = h + p.broadcast_like::<_, Axis<0>>(&(b, t, Const::<M>));
        }
        let h = self.encoder.forward(h, None)?;
        Ok(self.head.forward(masked_mean_pool(h, None)?))
    }

    /// Host class logits `(batch, classes)` of `batch` patchified images (`batch × T × PD`
    /// values, as [`Batch::patches`]).
    pub fn logits_host(&self, patches: &[f32], batch: usize) -> Result<Vec<f32>> {
        let per = batch
            .checked_mul(PD)
            .filter(|&n| n > 0)
            .with_context(|| format!("batch of {batch} images"))?;
        ensure!(
            patches.len().is_multiple_of(per),
            "{} patch values do not split into {batch} images of {PD}-value patches",
            patches.len()
        );
        let t = patches.len() / per;
        let dev = self.head.weight.device().clone();
        let x = dev.tensor_from_vec(
            patches.iter().map(|&v| c::<E>(v as f64)).collect(),
            (batch, t, Const::<PD>),
        );
        Ok(self
            .logits(x)?
            .as_vec()
            .into_iter()
            .map(|v| v.to_f32().unwrap_or(f32::NAN))
            .collect())
    }

    /// Class probabilities of `img` (transformed as at evaluation: shorter side resized to the
    /// model's image size, center crop, normalised), sorted from the most likely.
    ///
    /// ```
    /// use megalodon_vision::model::{FashionSmall, FASHION_SMALL};
    /// use megalodon_vision::megalodon_core::checkpoint::save_run;
    /// use dfdx::prelude::Cpu;
    /// # fn main() -> anyhow::Result<()> {
    /// // a (random) model saved as a run directory, as `vision train` leaves one
    /// let dev = Cpu::default();
    /// let classes = vec!["shirt".to_string(), "boot".to_string()];
    /// let conf = FashionSmall::<f32, Cpu>::preset_conf(&FASHION_SMALL, classes, true)?;
    /// let mut model = FashionSmall::<f32, Cpu>::new(&dev, conf.clone(), 0)?;
    /// let run = tempfile::tempdir()?;
    /// save_run(run.path(), &conf, &mut model)?;
    ///
    /// let model = FashionSmall::<f32, Cpu>::load(run.path())?;
    /// let img = image::DynamicImage::new_luma8(28, 28);
    /// let ranked = model.classify(&img)?; // [(label, probability)], most likely first
    /// assert_eq!(ranked.len(), 2);
    /// assert!((ranked.iter().map(|(_, p)| p).sum::<f32>() - 1.0).abs() < 1e-5);
    /// assert!(ranked[0].1 >= ranked[1].1);
    /// # Ok(()) }
    /// ```
    pub fn classify(&self, img: &DynamicImage) -> Result<Vec<(String, f32)>> {
        let rgb = img.to_rgb8();
        let pixels = self
            .conf
            .eval_transform()?
            .apply(&rgb, Path::new("<input image>"), 0)?;
        let patches = patchify(&pixels, self.conf.image_size, P, C)?;
        let logits = self.logits_host(&patches, 1)?;
        let probs = softmax_rows(&logits, self.classes().len());
        let mut ranked: Vec<(String, f32)> = self.classes().iter().cloned().zip(probs).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(ranked)
    }
}

impl<
        const P: usize,
        const C: usize,
        const PD: usize,
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E> + Default,
    > ImageClassifier<P, C, PD, L, M, Z, V, H, F, N, G, E, D>
{
    /// [`Self::load_on`] a default device (the CPU).
    pub fn load(run: impl AsRef<Path>) -> Result<Self> {
        Self::load_on(&D::default(), run)
    }
}

pub use megalodon_core::fit::resolve_run;

/// Reads the [`VisionConf`] of a run directory (see [`resolve_run`]).
pub fn load_conf(run: &Path) -> Result<VisionConf> {
    megalodon_core::fit::load_run_config(run, "a vision run")
}

impl<
        const P: usize,
        const C: usize,
        const PD: usize,
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > Params<E, D> for ImageClassifier<P, C, PD, L, M, Z, V, H, F, N, G, E, D>
{
    fn visit_params<Vis: ParamVisitor<E, D>>(&mut self, p: &str, v: &mut Vis) -> Result<()> {
        self.patch_embed.visit_params(&join(p, "patch_embed"), v)?;
        if let Some(pos) = &mut self.pos_embed {
            v.visit(&join(p, "pos_embed"), pos)?;
        }
        self.encoder.visit_params(&join(p, "encoder"), v)?;
        self.head.visit_params(&join(p, "head"), v)
    }
}

impl<
        const P: usize,
        const C: usize,
        const PD: usize,
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > HasBuffers for ImageClassifier<P, C, PD, L, M, Z, V, H, F, N, G, E, D>
{
    fn buffers(&self) -> Vec<(String, Buffer)> {
        checkpoint::nested_buffers("encoder", &self.encoder)
    }

    fn aliases(&self) -> Vec<(String, String)> {
        checkpoint::nested_aliases("encoder", &self.encoder)
    }
}

impl<
        const P: usize,
        const C: usize,
        const PD: usize,
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > Trainable<E, D> for ImageClassifier<P, C, PD, L, M, Z, V, H, F, N, G, E, D>
{
    type Batch = Batch;
    type Config = VisionConf;

    fn config(&self) -> VisionConf {
        self.conf.clone()
    }

    fn loss(
        &self,
        b: &Batch,
        grads: Gradients<E, D>,
    ) -> Result<Tensor<Rank0, E, D, OwnedTape<E, D>>> {
        ensure!(
            b.batch > 0,
            "batch {} of epoch {} has no readable image (all {} skipped)",
            b.index,
            b.epoch,
            b.skipped
        );
        ensure!(
            b.row_len.is_multiple_of(PD),
            "batch rows have {} values, not a whole number of patches of {PD} values (patch {P}, \
             {C} channel(s))",
            b.row_len
        );
        let tokens = b.row_len / PD;
        let want = b
            .batch
            .checked_mul(b.row_len)
            .context("batch size overflows")?;
        ensure!(
            b.values.len() == want,
            "batch holds {} values, expected {want}",
            b.values.len()
        );
        let dev = self.head.weight.device().clone();
        let x = dev
            .tensor_from_vec(
                b.values.iter().map(|&v| c::<E>(v as f64)).collect(),
                (b.batch, tokens, Const::<PD>),
            )
            .traced(grads);
        class_cross_entropy(self.logits(x)?, &b.labels)
    }

    fn batch_len(b: &Batch) -> u64 {
        b.batch as u64
    }

    fn shard(b: &Batch, part: usize, parts: usize) -> Result<Batch> {
        b.shard(part, parts)
    }
}

/// What the CLI and the tests need of any vision model type, so that code can be generic over
/// the presets (implemented for every [`ImageClassifier`]; see its inherent methods).
pub trait VisionModel<E: Float, D: MegaDevice<E>>:
    Trainable<E, D, Batch = Batch, Config = VisionConf> + Sized
{
    /// [`ImageClassifier::preset_conf`].
    fn preset_conf(
        preset: &VisionPreset,
        classes: Vec<String>,
        pos_embed: bool,
    ) -> Result<VisionConf>;
    /// [`ImageClassifier::check_conf`].
    fn check_conf(conf: &VisionConf) -> Result<()>;
    /// [`ImageClassifier::new`].
    fn build(dev: &D, conf: VisionConf, seed: u64) -> Result<Self>;
    /// [`ImageClassifier::load_on`].
    fn load_on(dev: &D, run: &Path) -> Result<Self>;
    /// The model's config.
    fn vision_conf(&self) -> &VisionConf;
    /// [`ImageClassifier::reset_head`].
    fn reset_head(&mut self, classes: Vec<String>, seed: u64) -> Result<()>;
    /// [`ImageClassifier::logits_host`].
    fn logits_host(&self, patches: &[f32], batch: usize) -> Result<Vec<f32>>;
    /// [`ImageClassifier::classify`].
    fn classify(&self, img: &DynamicImage) -> Result<Vec<(String, f32)>>;
}

impl<
        const P: usize,
        const C: usize,
        const PD: usize,
        const L: usize,
        const M: usize,
        const Z: usize,
        const V: usize,
        const H: usize,
        const F: usize,
        const N: usize,
        const G: usize,
        E: Float,
        D: MegaDevice<E>,
    > VisionModel<E, D> for ImageClassifier<P, C, PD, L, M, Z, V, H, F, N, G, E, D>
{
    fn preset_conf(
        preset: &VisionPreset,
        classes: Vec<String>,
        pos_embed: bool,
    ) -> Result<VisionConf> {
        Self::preset_conf(preset, classes, pos_embed)
    }
    fn check_conf(conf: &VisionConf) -> Result<()> {
        Self::check_conf(conf)
    }
    fn build(dev: &D, conf: VisionConf, seed: u64) -> Result<Self> {
        Self::new(dev, conf, seed)
    }
    fn load_on(dev: &D, run: &Path) -> Result<Self> {
        Self::load_on(dev, run)
    }
    fn vision_conf(&self) -> &VisionConf {
        &self.conf
    }
    fn reset_head(&mut self, classes: Vec<String>, seed: u64) -> Result<()> {
        Self::reset_head(self, classes, seed)
    }
    fn logits_host(&self, patches: &[f32], batch: usize) -> Result<Vec<f32>> {
        Self::logits_host(self, patches, batch)
    }
    fn classify(&self, img: &DynamicImage) -> Result<Vec<(String, f32)>> {
        Self::classify(self, img)
    }
}
