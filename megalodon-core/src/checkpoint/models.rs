//! Checkpoint glue of the model types: the official non-trainable buffers and tied keys
//! ([`HasBuffers`]) and the language model's run-directory save/load.

use super::{
    check_header_shape, load_config, load_run_weights, save_run, Buffer, HasBuffers, CONFIG_FILE,
    MODEL_FILE,
};
use crate::device::MegaDevice;
use crate::nn::attention::Rope;
use crate::nn::backbone::Backbone;
use crate::nn::encoder::BidirectionalEncoder;
use crate::nn::model::Megalodon;
use crate::util::Float;
use anyhow::Result;

impl<
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
    > HasBuffers for BidirectionalEncoder<L, M, Z, V, H, F, N, G, E, D>
{
}

fn timenorm_buffers(prefix: &str, groups: usize, out: &mut Vec<(String, Buffer)>) {
    out.push((
        format!("{prefix}.prior_count"),
        Buffer::I64 {
            shape: vec![],
            data: vec![0],
        },
    ));
    out.push((
        format!("{prefix}.prior_mean"),
        Buffer::F32 {
            shape: vec![groups],
            data: vec![0.0; groups],
        },
    ));
    out.push((
        format!("{prefix}.prior_logv"),
        Buffer::F32 {
            shape: vec![groups],
            data: vec![0.0; groups],
        },
    ));
}

impl<
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
    > HasBuffers for Backbone<L, M, Z, V, H, F, N, G, E, D>
{
    /// The official buffers: `rope.freqs`, and the (zero, unused) TimestepNorm priors.
    fn buffers(&self) -> Vec<(String, Buffer)> {
        let rope = Rope::new(Z / H, self.conf.rope_base());
        let mut out = vec![(
            "rope.freqs".to_string(),
            Buffer::F32 {
                shape: vec![rope.freqs.len()],
                data: rope.freqs,
            },
        )];
        for i in 0..L {
            timenorm_buffers(&format!("layers.{i}.mega.timenorm"), G, &mut out);
        }
        timenorm_buffers("output.final_norm", G, &mut out);
        out
    }
}

impl<
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
    > HasBuffers for Megalodon<L, M, Z, V, H, F, N, G, E, D>
{
    /// The backbone's buffers.
    fn buffers(&self) -> Vec<(String, Buffer)> {
        self.backbone.buffers()
    }

    /// With `share_emb`, `output.output.weight` is written as a copy of `embed.weight`.
    fn aliases(&self) -> Vec<(String, String)> {
        if self.output.is_none() {
            vec![(
                "output.output.weight".to_string(),
                "embed.weight".to_string(),
            )]
        } else {
            Vec::new()
        }
    }
}

impl<
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
    > Megalodon<L, M, Z, V, H, F, N, G, E, D>
{
    /// Writes `config.json` and `model.safetensors` (official key names) into `dir`, atomically.
    pub fn save_run(&mut self, dir: &std::path::Path) -> Result<()> {
        let conf = self.conf().clone();
        save_run(dir, &conf, self)
    }

    /// Loads a run directory written by [`save_run`](Self::save_run) or exported from the
    /// official model: the config is checked against this type's widths (error names the field),
    /// then every weight is loaded by its official key (errors name key and shapes).
    pub fn load_run(dev: &D, dir: &std::path::Path) -> Result<Self> {
        let conf = load_config(dir)?;
        Self::check_conf(&conf)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(CONFIG_FILE).display()))?;
        check_header_shape(&dir.join(MODEL_FILE), "embed.weight", &[conf.vocab_size, M])?;
        let mut model = Self::new(dev, conf, 0)?;
        load_run_weights(dir, &mut model)?;
        Ok(model)
    }
}
