//! Numerical parity with the official Megalodon implementation on a golden-vector file.
//!
//! ```text
//! cargo run --release --example parity -- megalodon-core/tests/fixtures/megalodon-golden-tiny.json
//! cargo run --release --example parity -- megalodon-core/tests/fixtures/model_swiglu.json
//! ```
//! Reads any model golden file of the `Tiny` dims (plain or SwiGLU, any B and T, any
//! `incremental_split`), runs the full forward and the cached incremental forward with that
//! split, prints `full max|diff| = X` and `incremental max|diff| = Y` as its last two lines, and
//! exits non-zero if either exceeds 1e-4. Bad files give an error naming the key.

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use dfdx::prelude::*;
use megalodon_core::golden::{load_params, max_abs_diff, Golden};
use megalodon_core::presets::Tiny;
use megalodon_core::util::to_f64;
use megalodon_core::ModelConf;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Compare Tiny Megalodon with official golden logits")]
struct Args {
    /// Golden JSON file (layout of megalodon-core/tests/fixtures/megalodon-golden-tiny.json).
    file: PathBuf,
    /// Maximum allowed |difference|.
    #[arg(long, default_value_t = 1e-4)]
    tol: f64,
}

fn run(args: &Args) -> Result<(f64, f64)> {
    let g = Golden::load(&args.file)?;
    let conf: ModelConf = serde_json::from_value(g.value(&["config"])?.clone())
        .with_context(|| format!("{}: bad `config`", g.path))?;
    conf.check_dims(&Tiny::<f32, Cpu>::DIMS)
        .with_context(|| format!("{}: this example runs the Tiny dims", g.path))?;
    let dev: Cpu = Default::default();
    let mut model = Tiny::<f32, Cpu>::new(&dev, conf.clone(), 0)?;
    load_params(&mut model, &g, &["params"])?;
    let tok = g.tensor(&["tokens"])?;
    ensure!(
        tok.shape.len() == 2,
        "{}: `tokens` must be (B, T), found shape {:?}",
        g.path,
        tok.shape
    );
    let (b, t) = (tok.shape[0], tok.shape[1]);
    let tokens = tok.to_ids(&format!("{}: `tokens`", g.path))?;
    let v = conf.vocab_size;

    let full = to_f64(&model.forward(&tokens, b, t)?);
    let want_full = g.tensor_shaped(&["logits_full"], &[b, t, v])?;
    let d_full = max_abs_diff(&full, &want_full.data);

    let split = g.usizes(&["incremental_split"])?;
    let total = split
        .iter()
        .try_fold(0usize, |a, &n| a.checked_add(n))
        .with_context(|| format!("{}: incremental_split {split:?} overflows", g.path))?;
    ensure!(
        total <= t && !split.contains(&0),
        "{}: incremental_split {:?} must be positive and sum to at most T = {t}",
        g.path,
        split
    );
    let want_inc = g.tensor_shaped(&["logits_incremental"], &[b, total, v])?;
    let mut state = model.new_state(b);
    let inc: Vec<f64> = model
        .forward_in_calls(&tokens, b, t, &split, &mut state)?
        .iter()
        .map(|&x| x as f64)
        .collect();
    let d_inc = max_abs_diff(&inc, &want_inc.data);
    println!(
        "file: {} (B {b}, T {t}, swiglu {}, split {:?})",
        g.path, conf.swiglu, split
    );
    Ok((d_full, d_inc))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (d_full, d_inc) = run(&args)?;
    println!("full max|diff| = {d_full:.3e}");
    println!("incremental max|diff| = {d_inc:.3e}");
    if !(d_full <= args.tol && d_inc <= args.tol) {
        bail!("parity FAILED: tolerance {:.1e}", args.tol);
    }
    Ok(())
}
