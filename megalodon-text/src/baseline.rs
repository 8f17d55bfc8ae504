//! A same-size full-attention Transformer language model and [`compare`], which trains it and a
//! Megalodon preset on the same tokens with the same steps, optimizer and schedule.
//!
//! The Transformer is a pre-norm GPT-style decoder in the spirit of the core benchmark's
//! baseline (`examples/bench_scaling.rs`): learned token and position embeddings, `layers`
//! blocks of LayerNorm -> one causal attention head of width `D` over all `T` positions ->
//! residual, LayerNorm -> GELU FFN of width `F` -> residual, a final LayerNorm and an untied
//! output layer. Unlike the benchmark's, its vocabulary and batch size are run-time values and
//! it has position embeddings (it must learn text, not only be timed).

use crate::preset::TextModel;
use crate::{Batch, Corpus, Tokenizer, TrainWindows, ValWindows};
use anyhow::{ensure, Context, Result};
use dfdx::prelude::*;
use megalodon_core::checkpoint::HasBuffers;
use megalodon_core::fit::{fit_with, FitConf, Progress, StepLog, Trainable};
use megalodon_core::nn::model::{cross_entropy, Logits};
use megalodon_core::optim::{OptimConf, Schedule};
use megalodon_core::params::{join, ParamVisitor, Params};
use std::path::PathBuf;
use std::time::Instant;

type Act<const D: usize> = Tensor<(usize, usize, Const<D>), f32, Cpu, OwnedTape<f32, Cpu>>;

/// One pre-norm block.
pub struct TfLayer<const D: usize, const F: usize> {
    ln1: modules::LayerNorm1D<D, f32, Cpu>,
    q: modules::Linear<D, D, f32, Cpu>,
    k: modules::Linear<D, D, f32, Cpu>,
    v: modules::Linear<D, D, f32, Cpu>,
    o: modules::Linear<D, D, f32, Cpu>,
    ln2: modules::LayerNorm1D<D, f32, Cpu>,
    ff1: modules::Linear<D, F, f32, Cpu>,
    ff2: modules::Linear<F, D, f32, Cpu>,
}

/// A pre-norm Transformer LM of width `D` and FFN width `F` (f32, CPU).
pub struct Transformer<const D: usize, const F: usize> {
    embed: Tensor<(usize, Const<D>), f32, Cpu>,
    pos: Tensor<(usize, Const<D>), f32, Cpu>,
    layers: Vec<TfLayer<D, F>>,
    ln_f: modules::LayerNorm1D<D, f32, Cpu>,
    head: Tensor<(usize, Const<D>), f32, Cpu>,
}

/// The Transformer compared with the `cpu` preset: D 128, FFN 512, 4 layers (about as many
/// parameters per layer as a `TextCpu` layer).
pub type CompareTransformer = Transformer<128, 512>;

impl<const D: usize, const F: usize> Transformer<D, F> {
    /// A fresh model for `vocab` ids and sequences of at most `max_len` tokens.
    pub fn new(dev: &Cpu, layers: usize, vocab: usize, max_len: usize) -> Result<Self> {
        ensure!(
            vocab >= 1 && max_len >= 1 && layers >= 1,
            "empty Transformer"
        );
        let table = |n: usize| dev.sample_normal_like(&(n, Const::<D>)) * 0.02;
        Ok(Transformer {
            embed: table(vocab),
            pos: table(max_len),
            layers: (0..layers)
                .map(|_| TfLayer {
                    ln1: dev.build_module::<builders::LayerNorm1D<D>, f32>(),
                    q: dev.build_module::<builders::Linear<D, D>, f32>(),
                    k: dev.build_module::<builders::Linear<D, D>, f32>(),
                    v: dev.build_module::<builders::Linear<D, D>, f32>(),
                    o: dev.build_module::<builders::Linear<D, D>, f32>(),
                    ln2: dev.build_module::<builders::LayerNorm1D<D>, f32>(),
                    ff1: dev.build_module::<builders::Linear<D, F>, f32>(),
                    ff2: dev.build_module::<builders::Linear<F, D>, f32>(),
                })
                .collect(),
            ln_f: dev.build_module::<builders::LayerNorm1D<D>, f32>(),
            head: table(vocab),
        })
    }

    /// Training forward: logits `(B, T, vocab)` with a tape into `grads`.
    pub fn forward_train(
        &self,
        batch: &Batch,
        grads: Gradients<f32, Cpu>,
    ) -> Result<Logits<f32, Cpu, OwnedTape<f32, Cpu>>> {
        let (b, t) = (batch.batch, batch.seq_len);
        let vocab = self.embed.shape().0;
        ensure!(
            t <= self.pos.shape().0,
            "sequence of {t} tokens is longer than the position table ({})",
            self.pos.shape().0
        );
        ensure!(batch.tokens.len() == b * t, "token buffer is not B x T");
        if let Some(&x) = batch.tokens.iter().find(|&&x| x >= vocab) {
            anyhow::bail!("token id {x} is outside the vocabulary ({vocab})");
        }
        let dev = self.embed.device().clone();
        let idx = dev.tensor_from_vec(batch.tokens.clone(), (b, t));
        let pidx = dev.tensor_from_vec((0..b).flat_map(|_| 0..t).collect::<Vec<_>>(), (b, t));
        let mut x: Act<D> = self.embed.clone().traced(grads).gather(idx);
        x = x + self.pos.retaped::<OwnedTape<f32, Cpu>>().gather(pidx);
        let mut mask = vec![0f32; t * t];
        for i in 0..t {
            mask[i * t + i + 1..(i + 1) * t].fill(f32::NEG_INFINITY);
        }
        let mask: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(mask, (t, t));
        let mask = mask.broadcast_like::<_, Axis<0>>(&(b, t, t));
        let scale = 1.0 / (D as f32).sqrt();
        for l in &self.layers {
            let h: Act<D> = l.ln1.forward(x.with_empty_tape());
            let q = l.q.forward(h.with_empty_tape()) * scale;
            let k = l.k.forward(h.with_empty_tape());
            let v = l.v.forward(h);
            let s = q.matmul(k.permute::<_, Axes3<0, 2, 1>>());
            let p = (s + mask.clone()).softmax::<Axis<2>>();
            // `x` keeps the tape of everything before; the branch's tape merges back here
            x = x + l.o.forward(p.matmul(v));
            let h: Act<D> = l.ln2.forward(x.with_empty_tape());
            x = x + l.ff2.forward(l.ff1.forward(h).fast_gelu());
        }
        let y = self.ln_f.forward(x);
        let w = self.head.retaped::<OwnedTape<f32, Cpu>>();
        Ok(y.matmul(w.permute::<_, Axes2<1, 0>>()))
    }

    /// Sum of the next-token losses of `batch` and how many targets were scored.
    pub fn loss_sum(&self, batch: &Batch) -> Result<(f64, usize)> {
        let n = batch.targets.iter().filter(|t| t.is_some()).count();
        let grads = Gradients::leaky();
        let logits = self.forward_train(batch, grads)?;
        let loss = cross_entropy(logits, &batch.targets)?.as_vec()[0];
        Ok((f64::from(loss) * n as f64, n))
    }
}

impl<const D: usize, const F: usize> Params<f32, Cpu> for Transformer<D, F> {
    fn visit_params<V: ParamVisitor<f32, Cpu>>(&mut self, prefix: &str, v: &mut V) -> Result<()> {
        v.visit(&join(prefix, "embed.weight"), &mut self.embed)?;
        v.visit(&join(prefix, "pos.weight"), &mut self.pos)?;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = join(prefix, &format!("layers.{i}"));
            v.visit(&join(&p, "ln1.weight"), &mut l.ln1.gamma)?;
            v.visit(&join(&p, "ln1.bias"), &mut l.ln1.beta)?;
            v.visit(&join(&p, "ln2.weight"), &mut l.ln2.gamma)?;
            v.visit(&join(&p, "ln2.bias"), &mut l.ln2.beta)?;
            for (name, lin) in [
                ("q", &mut l.q),
                ("k", &mut l.k),
                ("v", &mut l.v),
                ("o", &mut l.o),
            ] {
                v.visit(&join(&p, &format!("{name}.weight")), &mut lin.weight)?;
                v.visit(&join(&p, &format!("{name}.bias")), &mut lin.bias)?;
            }
            v.visit(&join(&p, "ff1.weight"), &mut l.ff1.weight)?;
            v.visit(&join(&p, "ff1.bias"), &mut l.ff1.bias)?;
            v.visit(&join(&p, "ff2.weight"), &mut l.ff2.weight)?;
            v.visit(&join(&p, "ff2.bias"), &mut l.ff2.bias)?;
        }
        v.visit(&join(prefix, "ln_f.weight"), &mut self.ln_f.gamma)?;
        v.visit(&join(prefix, "ln_f.bias"), &mut self.ln_f.beta)?;
        v.visit(&join(prefix, "head.weight"), &mut self.head)
    }
}

impl<const D: usize, const F: usize> HasBuffers for Transformer<D, F> {}

impl<const D: usize, const F: usize> Trainable<f32, Cpu> for Transformer<D, F> {
    type Batch = Batch;
    type Config = String;

    fn config(&self) -> String {
        format!(
            "transformer D {D} F {F} layers {} vocab {}",
            self.layers.len(),
            self.embed.shape().0
        )
    }

    fn loss(
        &self,
        batch: &Batch,
        grads: Gradients<f32, Cpu>,
    ) -> Result<Tensor<Rank0, f32, Cpu, OwnedTape<f32, Cpu>>> {
        cross_entropy(self.forward_train(batch, grads)?, &batch.targets)
    }

    fn batch_len(batch: &Batch) -> u64 {
        batch.tokens.len() as u64
    }
}

/// Settings of [`compare`].
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Corpus (`None` = the bundled one).
    pub data: Option<PathBuf>,
    pub steps: u64,
    pub seq_len: usize,
    pub batch: usize,
    pub lr: f64,
    pub vocab_size: usize,
    pub seed: u64,
    pub eval_every: u64,
}

/// One model's result in [`CompareReport`].
#[derive(Debug, Clone)]
pub struct CompareModel {
    pub name: String,
    pub params: usize,
    /// Final validation loss (nats/token).
    pub val_loss: f64,
    /// `(step, validation loss)`.
    pub val_curve: Vec<(f64, f64)>,
    /// Training wall time (seconds).
    pub seconds: f64,
    /// CPU time of the process during training (seconds, all threads; `None` off Linux), a
    /// figure less sensitive than wall time to other load on the machine.
    pub cpu_seconds: Option<f64>,
}

/// User + system CPU time of this process (all threads) from `/proc/self/stat`, assuming the
/// usual 100 clock ticks per second; `None` where that file is missing or unreadable.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // fields after the parenthesised command name: state is field 3, utime 14, stime 15
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The result of [`compare`].
#[derive(Debug, Clone)]
pub struct CompareReport {
    pub models: Vec<CompareModel>,
    pub unigram_val_loss: f64,
}

struct Eval<'a, F> {
    val: &'a ValWindows,
    curve: Vec<(f64, f64)>,
    loss_sum: F,
}

impl<M, F: FnMut(&M, &Batch) -> Result<(f64, usize)>> Progress<M> for Eval<'_, F> {
    fn evaluate(&mut self, model: &M, step: u64) -> Result<Option<f64>> {
        let (mut s, mut n) = (0.0, 0usize);
        for b in self.val.iter() {
            let (a, k) = (self.loss_sum)(model, &b)?;
            s += a;
            n += k;
        }
        let v = s / n.max(1) as f64;
        self.curve.push((step as f64, v));
        Ok(Some(v))
    }
}

/// Trains Megalodon preset `P` (chunk 128) and [`CompareTransformer`] on the same batches (same
/// windows, steps, AdamW settings and cosine schedule as `train`) and evaluates both on the same
/// validation tokens. `log` receives progress lines.
pub fn compare<P: TextModel>(
    o: &CompareOptions,
    mut log: impl FnMut(String),
) -> Result<CompareReport> {
    ensure!(o.steps >= 1, "--steps must be at least 1");
    let source = o
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::BUNDLED_CORPUS));
    let corpus = Corpus::load(&source).context("--data")?;
    let split = corpus.split(0.1)?;
    crate::check_vocab_size(o.vocab_size)?;
    let train_texts: Vec<&str> = split.train.iter().map(|d| d.text.as_str()).collect();
    let val_texts: Vec<&str> = split
        .val
        .iter()
        .map(|d| d.text.as_str())
        .filter(|t| !t.is_empty())
        .collect();
    let tok = Tokenizer::train_bpe(&train_texts, o.vocab_size)?;
    let sep = tok.end_of_text();
    let train_ids = tok.encode_docs(&train_texts, sep)?;
    let val_ids: Vec<usize> = tok
        .encode_docs(&val_texts, sep)?
        .into_iter()
        .take(32768)
        .collect();
    let vocab = tok.vocab_size();
    let unigram_val_loss = crate::unigram_cross_entropy(&train_ids, &val_ids, vocab)?;
    let windows = TrainWindows::new(train_ids, o.batch, o.seq_len, o.seed)?;
    let val = ValWindows::new(val_ids, o.batch, o.seq_len)?;
    let optim = OptimConf {
        lr: o.lr,
        warmup: usize::try_from(o.steps / 10).context("--steps")?,
        max_steps: usize::try_from(o.steps).context("--steps")?,
        weight_decay: 0.1,
        schedule: Schedule::Cosine,
        end_lr_ratio: 0.1,
        ..OptimConf::default()
    };
    let fc = FitConf {
        steps: o.steps,
        eval_every: o.eval_every,
        seed: o.seed,
        ..FitConf::default()
    };
    log(format!(
        "{} train tokens, {} validation tokens, vocabulary {vocab}; {} steps of {} x {} tokens; \
         unigram validation loss {unigram_val_loss:.4}",
        windows.tokens().len(),
        val.scored_tokens(),
        o.steps,
        o.batch,
        o.seq_len
    ));
    let dev: Cpu = Default::default();
    let mut models = Vec::new();
    // Megalodon
    {
        let conf = megalodon_core::ModelConf::from_dims(P::dims(), 128, vocab);
        let params = megalodon_core::nn::model::param_count(&conf);
        let mut m = P::build(&dev, conf, o.seed)?;
        let mut ev = Eval {
            val: &val,
            curve: Vec::new(),
            loss_sum: |m: &P, b: &Batch| m.loss_sum(b),
        };
        let (t0, c0) = (Instant::now(), process_cpu_seconds());
        let logs = fit_with(
            &mut m,
            optim.clone(),
            &fc,
            |s| Ok(windows.batch(s)),
            &mut ev,
        )?;
        let seconds = t0.elapsed().as_secs_f64();
        let cpu_seconds = process_cpu_seconds().zip(c0).map(|(a, b)| a - b);
        let val_loss = last_val(&logs)?;
        log(format!(
            "Megalodon: validation loss {val_loss:.4} after {seconds:.1}s"
        ));
        models.push(CompareModel {
            name: "Megalodon (cpu preset, chunk 128)".into(),
            params,
            val_loss,
            val_curve: ev.curve,
            seconds,
            cpu_seconds,
        });
    }
    // Transformer
    {
        let dev2 = Cpu::seed_from_u64(o.seed);
        let mut m = CompareTransformer::new(&dev2, 4, vocab, o.seq_len)?;
        let params = m.num_params();
        let mut ev = Eval {
            val: &val,
            curve: Vec::new(),
            loss_sum: |m: &CompareTransformer, b: &Batch| m.loss_sum(b),
        };
        let (t0, c0) = (Instant::now(), process_cpu_seconds());
        let logs = fit_with(&mut m, optim, &fc, |s| Ok(windows.batch(s)), &mut ev)?;
        let seconds = t0.elapsed().as_secs_f64();
        let cpu_seconds = process_cpu_seconds().zip(c0).map(|(a, b)| a - b);
        let val_loss = last_val(&logs)?;
        log(format!(
            "Transformer: validation loss {val_loss:.4} after {seconds:.1}s"
        ));
        models.push(CompareModel {
            name: "Transformer (D 128, FFN 512, 4 layers, full attention)".into(),
            params,
            val_loss,
            val_curve: ev.curve,
            seconds,
            cpu_seconds,
        });
    }
    Ok(CompareReport {
        models,
        unigram_val_loss,
    })
}

fn last_val(logs: &[StepLog]) -> Result<f64> {
    logs.iter()
        .rev()
        .find_map(|l| l.val_loss)
        .context("no validation loss was computed")
}
