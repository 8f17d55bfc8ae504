//! The engine's CUDA backend (`docs/engine.md`, "CUDA backend"): the CPU [`Engine`]'s weights
//! uploaded once, the project's kernels (`kernels/*.cu`) compiled at run time with NVRTC, cuBLAS
//! for the matrix products, and a per-sequence [`CudaState`] held on the device. It mirrors
//! [`super::cpu::forward_block`] op for op and is tested against the same bodies
//! (`tests/engine.rs`).
//!
//! `cudarc` 0.19 loads `libcuda`, `libnvrtc` and `libcublas` (CUDA 13) when first asked: nothing
//! CUDA is needed to build, and on a machine without them [`CudaEngine::new`] returns an error
//! (never a panic). f32 throughout, or ([`Precision::Bf16`]) bf16 weights with bf16 inputs to the
//! matrix products and f32 accumulation; the int8 weights are a CPU option.

use super::{drive, Engine, EngineDims, Lin, RewindowCarry, StreamBackend, Want};
use crate::nn::state::Rewindow;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc19::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
use cudarc19::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc19::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use cudarc19::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::sync::Arc;

/// The kernel sources, each compiled with `kernels/common.cuh` in front of it.
pub(crate) const COMMON: &str = include_str!("../../../kernels/common.cuh");
pub(crate) const SOURCES: [(&str, &str); 5] = [
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
    ),
    ("norms.cu", include_str!("../../../kernels/norms.cu")),
    (
        "timestep_norm.cu",
        include_str!("../../../kernels/timestep_norm.cu"),
    ),
    ("cema.cu", include_str!("../../../kernels/cema.cu")),
    (
        "chunk_attention.cu",
        include_str!("../../../kernels/chunk_attention.cu"),
    ),
];

/// Every kernel entry point the engine launches (each defined in one of `kernels/*.cu`).
pub const KERNELS: [&str; 15] = [
    "embed_f32",
    "bias_act_f32",
    "mul_f32",
    "residual_f32",
    "qk_affine_f32",
    "rms_rows_f32",
    "layernorm_f32",
    "timestep_norm_f32",
    "cema_f32",
    "cema_scan_local_f32",
    "cema_scan_carry_f32",
    "cema_scan_out_f32",
    "rope_cache_f32",
    "chunk_attention_f32",
    "to_bf16",
];

/// The number format of a CUDA engine's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 weights and inputs (cuBLAS `sgemm`, no TF32): the CPU engine's numbers to 1e-4.
    #[default]
    F32,
    /// bf16 weights (half the bytes a decode step reads) and bf16 inputs, f32 accumulation
    /// (cuBLAS `GemmEx`); everything outside the products (norms, CEMA, attention, the carried
    /// state) stays f32. Tolerance against f32 in `docs/engine.md`.
    Bf16,
}

/// The bf16 bit pattern of `x`: the top half of its f32 bits, rounded to nearest even (NaN stays
/// NaN), as the `to_bf16` kernel rounds.
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if (b & 0x7f80_0000) == 0x7f80_0000 && (b & 0x007f_ffff) != 0 {
        return ((b >> 16) | 0x0040) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to bf16 and back: what a bf16 engine's products see of an f32 value.
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(x)) << 16)
}

/// Threads per block of the row kernels.
const THREADS: u32 = 256;

/// Rows per segment of the chunked CEMA scan (`kernels/cema.cu`); blocks of at least
/// `2 * CEMA_SEGMENT` rows take it, shorter ones the one-thread-per-channel recurrence.
pub const CEMA_SEGMENT: usize = 16;

/// The largest CEMA order `N` the chunked scan supports (`CEMA_SCAN_MAX_N` in `kernels/cema.cu`).
const CEMA_SCAN_MAX_N: usize = 64;

/// Runs `f`, turning a panic inside cudarc (a library or symbol that cannot be loaded) into an
/// error naming `what`.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            bail!("{what}: {msg}")
        }
    }
}

/// What NVRTC compiles for kernel source `src`: `common.cuh`, then the file.
pub(crate) fn nvrtc_source(src: &str) -> String {
    format!("{COMMON}\n{src}")
}

/// Compiles every kernel source to PTX with NVRTC (needs `libnvrtc.so.13`, no GPU): what CI runs
/// so that a kernel that does not compile fails without a GPU. Returns `(file, ptx)` pairs.
pub fn compile_kernels() -> Result<Vec<(&'static str, Ptx)>> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { cudarc19::nvrtc::sys::is_culib_present() } {
        bail!(
            "NVRTC (libnvrtc.so.13) not found: install the CUDA 13 NVRTC library (e.g. the \
             nvidia-cuda-nvrtc==13.0.48 wheel) and put its lib folder on LD_LIBRARY_PATH"
        );
    }
    SOURCES
        .iter()
        .map(|&(name, src)| {
            let full = nvrtc_source(src);
            let opts = CompileOptions {
                name: Some(name.to_string()),
                ..Default::default()
            };
            let ptx = guarded(&format!("compiling kernels/{name}"), || {
                compile_ptx_with_opts(full, opts).map_err(|e| anyhow!("{e:?}"))
            })
            .with_context(|| format!("NVRTC could not compile kernels/{name}"))?;
            Ok((name, ptx))
        })
        .collect()
}

struct Kernels {
    embed: CudaFunction,
    bias_act: CudaFunction,
    mul: CudaFunction,
    residual: CudaFunction,
    qk_affine: CudaFunction,
    rms_rows: CudaFunction,
    layernorm: CudaFunction,
    timestep_norm: CudaFunction,
    cema: CudaFunction,
    cema_local: CudaFunction,
    cema_carry: CudaFunction,
    cema_out: CudaFunction,
    rope_cache: CudaFunction,
    attention: CudaFunction,
    to_bf16: CudaFunction,
}

/// A weight matrix on the device, in the engine's precision.
enum DW {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// A borrowed weight matrix (the tied head borrows the f32 embedding table).
#[derive(Clone, Copy)]
enum WRef<'a> {
    F32(&'a CudaSlice<f32>),
    Bf16(&'a CudaSlice<u16>),
}

impl DW {
    fn as_ref(&self) -> WRef<'_> {
        match self {
            DW::F32(w) => WRef::F32(w),
            DW::Bf16(w) => WRef::Bf16(w),
        }
    }
    fn num_bytes(&self) -> usize {
        match self {
            DW::F32(w) => w.num_bytes(),
            DW::Bf16(w) => w.num_bytes(),
        }
    }
}

struct DLin {
    w: DW,
    b: Option<CudaSlice<f32>>,
    out: usize,
    inp: usize,
}

struct DLayer {
    tn_w: CudaSlice<f32>,
    tn_b: CudaSlice<f32>,
    p: CudaSlice<f32>,
    q_re: CudaSlice<f32>,
    q_im: CudaSlice<f32>,
    eta_re: CudaSlice<f32>,
    eta_im: CudaSlice<f32>,
    omega: CudaSlice<f32>,
    rms_w: CudaSlice<f32>,
    wz: DLin,
    wv: DLin,
    wr: DLin,
    wh1: DLin,
    wh2: DLin,
    q_scale: CudaSlice<f32>,
    q_off: CudaSlice<f32>,
    k_scale: CudaSlice<f32>,
    k_off: CudaSlice<f32>,
    ln_w: CudaSlice<f32>,
    ln_b: CudaSlice<f32>,
    fc1: DLin,
    fc2: DLin,
    fc3: Option<DLin>,
    alpha: Option<CudaSlice<f32>>,
}

/// A language model ready for streaming inference on one CUDA device.
pub struct CudaEngine {
    pub dims: EngineDims,
    id: u64,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    precision: Precision,
    embed: CudaSlice<f32>,
    /// The output projection; `None`: tied to `embed` (f32 only; a bf16 engine keeps a bf16 copy).
    head: Option<DW>,
    emb_scale: f32,
    layers: Vec<DLayer>,
    final_w: CudaSlice<f32>,
    final_b: CudaSlice<f32>,
    freqs: CudaSlice<f32>,
    /// The device's name, e.g. "NVIDIA H200".
    pub device_name: String,
}

/// TimestepNorm statistics on the device (f64) with the step count on the host.
struct DNorm {
    count: u64,
    mean: CudaSlice<f64>,
    var: CudaSlice<f64>,
}

struct DCarry {
    norm: DNorm,
    h_re: CudaSlice<f32>,
    h_im: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
}

struct DScratch {
    toks: CudaSlice<i32>,
    x: CudaSlice<f32>,
    xn: CudaSlice<f32>,
    mx: CudaSlice<f32>,
    zq: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    vv: CudaSlice<f32>,
    r: CudaSlice<f32>,
    att: CudaSlice<f32>,
    y: CudaSlice<f32>,
    yn: CudaSlice<f32>,
    u: CudaSlice<f32>,
    u3: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    /// bf16 copy of a product's input rows (bf16 engines; one element otherwise).
    xb: CudaSlice<u16>,
    /// The chunked CEMA scan's per-segment states, `ceil(block / CEMA_SEGMENT) x M x N` (one
    /// element when `block` is too short for the chunked scan).
    seg_re: CudaSlice<f32>,
    seg_im: CudaSlice<f32>,
    host_toks: Vec<i32>,
    host_logits: Vec<f32>,
}

/// The streaming state of one sequence on the device (the CPU [`super::EngineState`]'s twin):
/// fixed size, nothing allocated per token.
pub struct CudaState {
    engine_id: u64,
    layers: Vec<DCarry>,
    final_norm: DNorm,
    /// Tokens processed so far.
    pub position: u64,
    /// Largest block a single internal step processes.
    pub block: usize,
    s: DScratch,
    rewindow: Option<RewindowCarry<CudaState>>,
}

fn cfg_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i32_of(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x)
        .with_context(|| format!("cuda engine: {what} = {x} does not fit a kernel's int"))
}

impl CudaEngine {
    /// Uploads `engine`'s (f32) weights to CUDA device `ordinal` and compiles the kernels.
    /// Errors, never panics, where there is no driver, NVRTC, cuBLAS or device.
    pub fn new(engine: &Engine, ordinal: usize) -> Result<Self> {
        Self::with_precision(engine, ordinal, Precision::F32)
    }

    /// [`CudaEngine::new`] with the matrix products in `precision` (the weight matrices are
    /// converted once, on the host, when uploaded).
    pub fn with_precision(engine: &Engine, ordinal: usize, precision: Precision) -> Result<Self> {
        ensure!(
            !engine.is_int8(),
            "cuda engine: int8 weights are a CPU option; build the CUDA engine from the f32 engine"
        );
        // SAFETY: these only probe whether the libraries can be opened.
        let (cu, nvrtc, blas) = unsafe {
            (
                cudarc19::driver::sys::is_culib_present(),
                cudarc19::nvrtc::sys::is_culib_present(),
                cudarc19::cublas::sys::is_culib_present(),
            )
        };
        ensure!(cu, "no CUDA driver library (libcuda.so) on this machine");
        ensure!(
            nvrtc,
            "no NVRTC library (libnvrtc.so.13) found on LD_LIBRARY_PATH"
        );
        ensure!(
            blas,
            "no cuBLAS library (libcublas.so.13) found on LD_LIBRARY_PATH"
        );
        guarded("cuda engine", || Self::build(engine, ordinal, precision))
    }

    /// The number format of the matrix products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes of the weights on the device.
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &DLin| l.w.num_bytes() + l.b.as_ref().map_or(0, |b| b.num_bytes());
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.tn_w, &l.tn_b, &l.p, &l.q_re, &l.q_im, &l.eta_re, &l.eta_im, &l.omega,
                    &l.rms_w, &l.q_scale, &l.q_off, &l.k_scale, &l.k_off, &l.ln_w, &l.ln_b,
                ]
                .iter()
                .map(|b| b.num_bytes())
                .sum::<usize>()
                    + [&l.wz, &l.wv, &l.wr, &l.wh1, &l.wh2, &l.fc1, &l.fc2]
                        .into_iter()
                        .chain(l.fc3.as_ref())
                        .map(lin)
                        .sum::<usize>()
                    + l.alpha.as_ref().map_or(0, |a| a.num_bytes())
            })
            .sum();
        layers
            + self.embed.num_bytes()
            + self.head.as_ref().map_or(0, DW::num_bytes)
            + self.final_w.num_bytes()
            + self.final_b.num_bytes()
            + self.freqs.num_bytes()
    }

    fn build(e: &Engine, ordinal: usize, precision: Precision) -> Result<Self> {
        let n = CudaContext::device_count().map_err(|err| anyhow!("CUDA driver: {err:?}"))?;
        ensure!(
            (ordinal as i64) < n as i64,
            "cuda engine: no CUDA device {ordinal} ({n} present)"
        );
        let ctx =
            CudaContext::new(ordinal).map_err(|err| anyhow!("CUDA device {ordinal}: {err:?}"))?;
        let device_name = ctx
            .name()
            .unwrap_or_else(|_| format!("CUDA device {ordinal}"));
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|err| anyhow!("cuBLAS: {err:?}"))?;
        let mut funcs = std::collections::HashMap::new();
        for (name, ptx) in compile_kernels()? {
            let module = ctx
                .load_module(ptx)
                .map_err(|err| anyhow!("loading kernels/{name}: {err:?}"))?;
            for f in KERNELS {
                if let Ok(func) = module.load_function(f) {
                    funcs.insert(f, func);
                }
            }
        }
        let mut get = |f: &str| {
            funcs
                .remove(f)
                .with_context(|| format!("cuda engine: kernel `{f}` missing from kernels/"))
        };
        let k = Kernels {
            embed: get("embed_f32")?,
            bias_act: get("bias_act_f32")?,
            mul: get("mul_f32")?,
            residual: get("residual_f32")?,
            qk_affine: get("qk_affine_f32")?,
            rms_rows: get("rms_rows_f32")?,
            layernorm: get("layernorm_f32")?,
            timestep_norm: get("timestep_norm_f32")?,
            cema: get("cema_f32")?,
            cema_local: get("cema_scan_local_f32")?,
            cema_carry: get("cema_scan_carry_f32")?,
            cema_out: get("cema_scan_out_f32")?,
            rope_cache: get("rope_cache_f32")?,
            attention: get("chunk_attention_f32")?,
            to_bf16: get("to_bf16")?,
        };
        let up = |v: &[f32]| -> Result<CudaSlice<f32>> {
            stream
                .clone_htod(v)
                .map_err(|err| anyhow!("uploading weights: {err:?}"))
        };
        let up_w = |v: &[f32]| -> Result<DW> {
            Ok(match precision {
                Precision::F32 => DW::F32(up(v)?),
                Precision::Bf16 => {
                    let bits: Vec<u16> = v.iter().map(|&x| bf16_bits(x)).collect();
                    DW::Bf16(
                        stream
                            .clone_htod(&bits)
                            .map_err(|err| anyhow!("uploading weights: {err:?}"))?,
                    )
                }
            })
        };
        let lin = |l: &Lin| -> Result<DLin> {
            Ok(DLin {
                w: up_w(&l.w)?,
                b: l.b.as_deref().map(up).transpose()?,
                out: l.out,
                inp: l.inp,
            })
        };
        let mut layers = Vec::with_capacity(e.layers.len());
        for l in &e.layers {
            layers.push(DLayer {
                tn_w: up(&l.tn_w)?,
                tn_b: up(&l.tn_b)?,
                p: up(&l.p)?,
                q_re: up(&l.q_re)?,
                q_im: up(&l.q_im)?,
                eta_re: up(&l.eta_re)?,
                eta_im: up(&l.eta_im)?,
                omega: up(&l.omega)?,
                rms_w: up(&l.rms_w)?,
                wz: lin(&l.wz)?,
                wv: lin(&l.wv)?,
                wr: lin(&l.wr)?,
                wh1: lin(&l.wh1)?,
                wh2: lin(&l.wh2)?,
                q_scale: up(&l.q_scale)?,
                q_off: up(&l.q_off)?,
                k_scale: up(&l.k_scale)?,
                k_off: up(&l.k_off)?,
                ln_w: up(&l.ln_w)?,
                ln_b: up(&l.ln_b)?,
                fc1: lin(&l.fc1)?,
                fc2: lin(&l.fc2)?,
                fc3: l.fc3.as_ref().map(lin).transpose()?,
                alpha: l.alpha.as_deref().map(up).transpose()?,
            });
        }
        let d = &e.dims;
        for (what, x) in [
            ("vocab x model_dim", d.vocab.checked_mul(d.m)),
            ("chunk x z_dim", d.chunk.checked_mul(d.z)),
            ("chunk x value_dim", d.chunk.checked_mul(d.v)),
            ("ffn_hidden_dim", Some(d.f)),
        ] {
            let x = x.with_context(|| format!("cuda engine: {what} overflows"))?;
            i32_of(x, what)?;
        }
        // the chunked CEMA scan keeps a channel's N states in registers (`cema_scan_out_f32`)
        // and walks the segments with one thread per state (`cema_scan_carry_f32`, one launch)
        ensure!(
            d.n <= CEMA_SCAN_MAX_N,
            "cuda engine: cema_ndim {} is above the {CEMA_SCAN_MAX_N} the CEMA scan kernel supports",
            d.n
        );
        ensure!(
            d.m * d.n <= 65_535 * THREADS as usize,
            "cuda engine: model_dim x cema_ndim = {} is above one launch's threads",
            d.m * d.n
        );
        // the attention scores of a chunk live in shared memory
        let smem = d.chunk * 4;
        ensure!(
            smem <= 48 * 1024,
            "cuda engine: chunk_size {} needs {smem} bytes of shared memory for the attention \
             scores (at most 49152)",
            d.chunk
        );
        Ok(Self {
            dims: d.clone(),
            id: e.id,
            embed: up(&e.embed.w)?,
            head: match (&e.head, precision) {
                (Some(h), _) => Some(up_w(&h.w)?),
                (None, Precision::F32) => None,
                (None, Precision::Bf16) => Some(up_w(&e.embed.w)?),
            },
            precision,
            emb_scale: e.emb_scale,
            layers,
            final_w: up(&e.final_w)?,
            final_b: up(&e.final_b)?,
            freqs: up(&e.freqs)?,
            device_name,
            k,
            blas,
            stream,
        })
    }

    fn zeros<T: cudarc19::driver::DeviceRepr + cudarc19::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|err| anyhow!("cuda engine: allocating {n} values: {err:?}"))
    }

    fn norm(&self) -> Result<DNorm> {
        let g = self.dims.g;
        Ok(DNorm {
            count: 0,
            mean: self.zeros(g)?,
            var: self
                .stream
                .clone_htod(&vec![1f64; g])
                .map_err(|err| anyhow!("cuda engine: {err:?}"))?,
        })
    }

    fn reset_norm(&self, n: &mut DNorm) -> Result<()> {
        n.count = 0;
        let g = self.dims.g;
        self.stream
            .memcpy_htod(&vec![0f64; g], &mut n.mean)
            .and_then(|_| self.stream.memcpy_htod(&vec![1f64; g], &mut n.var))
            .map_err(|err| anyhow!("cuda engine: {err:?}"))
    }

    /// A fresh state for one sequence (cumulative TimestepNorm), processing at most `block`
    /// tokens at a time.
    pub fn new_state(&self, block: usize) -> Result<CudaState> {
        ensure!(block >= 1, "engine: block must be at least 1");
        let d = &self.dims;
        let rows = |w: usize| -> Result<CudaSlice<f32>> {
            let n = block
                .checked_mul(w)
                .with_context(|| format!("engine: block {block} x {w} overflows"))?;
            i32_of(n, "block x width")?;
            self.zeros(n)
        };
        let s = DScratch {
            toks: self.zeros(block)?,
            x: rows(d.m)?,
            xn: rows(d.m)?,
            mx: rows(d.m)?,
            zq: rows(d.z)?,
            q: rows(d.z)?,
            k: rows(d.z)?,
            vv: rows(d.v)?,
            r: rows(d.v)?,
            att: rows(d.v)?,
            y: rows(d.m)?,
            yn: rows(d.m)?,
            u: rows(d.f.max(1))?,
            u3: rows(if self.layers.iter().any(|l| l.fc3.is_some()) {
                d.f
            } else {
                1
            })?,
            logits: rows(d.vocab)?,
            xb: match self.precision {
                Precision::F32 => self.zeros(1)?,
                Precision::Bf16 => {
                    let w = [d.m, d.z, d.v, d.f].into_iter().max().unwrap_or(1);
                    let n = block
                        .checked_mul(w)
                        .with_context(|| format!("engine: block {block} x {w} overflows"))?;
                    i32_of(n, "block x width")?;
                    self.zeros(n)?
                }
            },
            seg_re: self.zeros(Self::seg_len(block, d)?)?,
            seg_im: self.zeros(Self::seg_len(block, d)?)?,
            host_toks: vec![0; block],
            host_logits: vec![0.0; block * d.vocab],
        };
        let mut layers = Vec::with_capacity(d.layers);
        for _ in 0..d.layers {
            layers.push(DCarry {
                norm: self.norm()?,
                h_re: self.zeros(d.m * d.n)?,
                h_im: self.zeros(d.m * d.n)?,
                k: self.zeros(d.chunk * d.z)?,
                v: self.zeros(d.chunk * d.v)?,
            });
        }
        Ok(CudaState {
            engine_id: self.id,
            layers,
            final_norm: self.norm()?,
            position: 0,
            block,
            s,
            rewindow: None,
        })
    }

    /// Values of each segment-state buffer of a state processing `block` rows at a time.
    fn seg_len(block: usize, d: &EngineDims) -> Result<usize> {
        if block < 2 * CEMA_SEGMENT {
            return Ok(1);
        }
        block
            .div_ceil(CEMA_SEGMENT)
            .checked_mul(d.m * d.n)
            .with_context(|| {
                format!("engine: block {block} x model_dim x cema_ndim of CEMA states overflows")
            })
    }

    /// A fresh state with the official re-windowed TimestepNorm evaluation (as the CPU's).
    pub fn new_state_rewindowed(&self, block: usize, rewindow: Rewindow) -> Result<CudaState> {
        let fresh = self.new_state(block)?;
        let mut s = self.new_state(block)?;
        s.rewindow = Some(RewindowCarry::new(rewindow, self.dims.chunk, fresh)?);
        Ok(s)
    }

    /// Bytes of a state on the device and the host: constant for its life.
    pub fn state_bytes(state: &CudaState) -> usize {
        let s = &state.s;
        let dev: usize = [
            &s.x, &s.xn, &s.mx, &s.zq, &s.q, &s.k, &s.vv, &s.r, &s.att, &s.y, &s.yn, &s.u, &s.u3,
            &s.logits,
        ]
        .iter()
        .map(|b| b.num_bytes())
        .sum::<usize>()
            + s.toks.num_bytes()
            + s.xb.num_bytes()
            + s.seg_re.num_bytes()
            + s.seg_im.num_bytes();
        let carry: usize = state
            .layers
            .iter()
            .map(|l| {
                l.norm.mean.num_bytes()
                    + l.norm.var.num_bytes()
                    + l.h_re.num_bytes()
                    + l.h_im.num_bytes()
                    + l.k.num_bytes()
                    + l.v.num_bytes()
            })
            .sum();
        let host = 4 * (s.host_toks.capacity() + s.host_logits.capacity());
        let rw = state.rewindow.as_ref().map_or(0, |r| {
            r.history.capacity() * 8 + Self::state_bytes(&r.fresh)
        });
        dev + carry + host + state.final_norm.mean.num_bytes() * 2 + rw
    }

    /// Feeds `tokens` through `state` (as [`Engine::feed`]).
    pub fn feed(
        &self,
        state: &mut CudaState,
        tokens: &[usize],
        want: Want,
        mut on_logits: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        let at = (state.block, state.position, Some(self.dims.chunk));
        drive(
            (self.id, state.engine_id),
            tokens,
            self.dims.vocab,
            at,
            want,
            |piece, off, w| self.step_block(state, piece, w, &mut |i, row| on_logits(off + i, row)),
        )
    }

    /// Bytes of device memory in use (by every process), from the driver.
    pub fn device_mem_used(&self) -> Result<usize> {
        let (free, total) = self
            .stream
            .context()
            .mem_get_info()
            .map_err(|err| anyhow!("cuda engine: {err:?}"))?;
        Ok(total.saturating_sub(free))
    }

    /// Seconds per token of the decode step's matrix products alone (cuBLAS, every linear layer
    /// and the head, `reps` repetitions on `state`'s scratch, whose values are overwritten; the
    /// stream itself is untouched): the bound a decode step can approach.
    pub fn time_matvecs(&self, state: &mut CudaState, reps: usize) -> Result<f64> {
        let s = &mut state.s;
        let one =
            |dst: &mut CudaSlice<f32>, x: &CudaSlice<f32>, l: &DLin, xb: &mut CudaSlice<u16>| {
                self.gemm(dst, x, l.w.as_ref(), (1, l.out, l.inp), 0.0, xb)
            };
        self.synchronize()?;
        let t0 = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            for lw in &self.layers {
                one(&mut s.zq, &s.mx, &lw.wz, &mut s.xb)?;
                one(&mut s.vv, &s.xn, &lw.wv, &mut s.xb)?;
                one(&mut s.r, &s.mx, &lw.wr, &mut s.xb)?;
                one(&mut s.y, &s.mx, &lw.wh1, &mut s.xb)?;
                one(&mut s.y, &s.att, &lw.wh2, &mut s.xb)?;
                one(&mut s.u, &s.yn, &lw.fc1, &mut s.xb)?;
                if let Some(fc3) = &lw.fc3 {
                    one(&mut s.u3, &s.yn, fc3, &mut s.xb)?;
                }
                one(&mut s.xn, &s.u, &lw.fc2, &mut s.xb)?;
            }
            self.gemm(
                &mut s.logits,
                &s.xn,
                self.head_w(),
                (1, self.dims.vocab, self.dims.m),
                0.0,
                &mut s.xb,
            )?;
        }
        self.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() / reps.max(1) as f64)
    }

    /// Waits for the device to finish the queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|err| anyhow!("cuda engine: {err:?}"))
    }

    fn step_block(
        &self,
        state: &mut CudaState,
        tokens: &[usize],
        want: Want,
        on_logits: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<()> {
        let before = state.position;
        self.forward_block(state, tokens, want, on_logits)?;
        state.position += tokens.len() as u64;
        let after = state.position;
        let Some(mut rw) = state.rewindow.take() else {
            return Ok(());
        };
        let due = rw.record(tokens, before, after, self.dims.chunk);
        let res = if due {
            self.rerun_norms(state, &mut rw)
        } else {
            Ok(())
        };
        state.rewindow = Some(rw);
        res
    }

    /// The re-windowed statistics: the fresh state re-runs the kept tokens and its TimestepNorm
    /// statistics replace `state`'s.
    fn rerun_norms(&self, state: &mut CudaState, rw: &mut RewindowCarry<CudaState>) -> Result<()> {
        let fresh = &mut rw.fresh;
        fresh.position = 0;
        for l in &mut fresh.layers {
            self.reset_norm(&mut l.norm)?;
            self.stream
                .memset_zeros(&mut l.h_re)
                .and_then(|_| self.stream.memset_zeros(&mut l.h_im))
                .map_err(|err| anyhow!("cuda engine: {err:?}"))?;
        }
        self.reset_norm(&mut fresh.final_norm)?;
        let (a, b) = rw.history.as_slices();
        let toks: Vec<usize> = a.iter().chain(b).copied().collect();
        let c = self.dims.chunk;
        let mut off = 0;
        while off < toks.len() {
            let pos = (fresh.position % c as u64) as usize;
            let len = fresh.block.min(toks.len() - off).min(c - pos);
            self.forward_block(fresh, &toks[off..off + len], Want::None, &mut |_, _| {})?;
            fresh.position += len as u64;
            off += len;
        }
        let copy = |src: &DNorm, dst: &mut DNorm| -> Result<()> {
            dst.count = src.count;
            self.stream
                .memcpy_dtod(&src.mean, &mut dst.mean)
                .and_then(|_| self.stream.memcpy_dtod(&src.var, &mut dst.var))
                .map_err(|err| anyhow!("cuda engine: {err:?}"))
        };
        for (l, f) in state.layers.iter_mut().zip(&fresh.layers) {
            copy(&f.norm, &mut l.norm)?;
        }
        copy(&fresh.final_norm, &mut state.final_norm)
    }

    /// The output projection: the head, or the tied f32 embedding table.
    fn head_w(&self) -> WRef<'_> {
        self.head
            .as_ref()
            .map_or(WRef::F32(&self.embed), DW::as_ref)
    }

    /// `dst (t, out) = x (t, inp) W^T` (`beta` 1: accumulate) through cuBLAS: column-major,
    /// `dst^T = W x^T` with `W` read transposed. A bf16 `W` first rounds `x` into `xb` (bf16),
    /// then multiplies bf16 by bf16 with f32 accumulation into the f32 `dst`.
    fn gemm<X: DevicePtr<f32>, D: DevicePtrMut<f32>>(
        &self,
        dst: &mut D,
        x: &X,
        w: WRef<'_>,
        (t, out, inp): (usize, usize, usize),
        beta: f32,
        xb: &mut CudaSlice<u16>,
    ) -> Result<()> {
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: out as i32,
            n: t as i32,
            k: inp as i32,
            alpha: 1.0f32,
            lda: inp as i32,
            ldb: inp as i32,
            beta,
            ldc: out as i32,
        };
        let w = match w {
            // SAFETY: `w` holds out x inp values, `x` at least t x inp and `dst` t x out (the
            // scratch rows are block x width and t <= block; checked in `new_state`).
            WRef::F32(w) => {
                return unsafe { self.blas.gemm(cfg, w, x, dst) }
                    .map_err(|err| anyhow!("cuBLAS sgemm: {err:?}"))
            }
            WRef::Bf16(w) => w,
        };
        let n = t * inp;
        let ni = n as i32;
        {
            let (xp, _rx) = x.device_ptr(&self.stream);
            let mut a = self.stream.launch_builder(&self.k.to_bf16);
            a.arg(&xp).arg(&mut *xb).arg(&ni);
            // SAFETY: `x` holds at least t x inp values and `xb` block x (widest input), t <= block.
            unsafe { a.launch(cfg_1d(n)) }.map_err(launch_err("to_bf16"))?;
        }
        let (alpha, beta) = (1.0f32, beta);
        let (wp, _rw) = w.device_ptr(&self.stream);
        let (bp, _rb) = xb.device_ptr(&self.stream);
        let (cp, _rc) = dst.device_ptr_mut(&self.stream);
        // SAFETY: as for f32, with `w` out x inp bf16 values and `xb` t x inp; the handle runs on
        // `self.stream`, the pointers' stream.
        unsafe {
            cudarc19::cublas::result::gemm_ex(
                *self.blas.handle(),
                cfg.transa,
                cfg.transb,
                cfg.m,
                cfg.n,
                cfg.k,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                cudaDataType_t::CUDA_R_16BF,
                cfg.lda,
                bp as *const _,
                cudaDataType_t::CUDA_R_16BF,
                cfg.ldb,
                (&beta) as *const f32 as *const _,
                cp as *mut _,
                cudaDataType_t::CUDA_R_32F,
                cfg.ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|err| anyhow!("cuBLAS GemmEx (bf16): {err:?}"))
    }

    /// `dst = act(x W^T + b)` for `t` rows (`accumulate`: `dst += x W^T`, then `+ b`).
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        dst: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        l: &DLin,
        t: usize,
        accumulate: bool,
        silu: bool,
        xb: &mut CudaSlice<u16>,
    ) -> Result<()> {
        self.gemm(
            dst,
            x,
            l.w.as_ref(),
            (t, l.out, l.inp),
            if accumulate { 1.0 } else { 0.0 },
            xb,
        )?;
        if l.b.is_none() && !silu {
            return Ok(());
        }
        let (has_b, act, ti, out) = (l.b.is_some() as i32, silu as i32, t as i32, l.out as i32);
        let b = l.b.as_ref().unwrap_or(&self.final_w); // unread without a bias
        let mut a = self.stream.launch_builder(&self.k.bias_act);
        a.arg(dst).arg(b).arg(&has_b).arg(&act).arg(&ti).arg(&out);
        // SAFETY: `dst` holds t x out values and `b` out (or is unread).
        unsafe { a.launch(cfg_1d(t * l.out)) }.map_err(launch_err("bias_act_f32"))?;
        Ok(())
    }

    fn forward_block(
        &self,
        state: &mut CudaState,
        tokens: &[usize],
        want: Want,
        on_logits: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<()> {
        let d = &self.dims;
        let t = tokens.len();
        let (m, z, vd, h, c) = (d.m, d.z, d.v, d.h, d.chunk);
        let dz = z / h;
        let pos0 = (state.position % c as u64) as usize;
        debug_assert!(t >= 1 && t <= state.block && pos0 + t <= c);
        let (ti, mi, zi, vdi, hi, dzi, pos0i) = (
            t as i32,
            m as i32,
            z as i32,
            vd as i32,
            h as i32,
            dz as i32,
            pos0 as i32,
        );
        let eps = d.eps;
        let s = &mut state.s;
        for (h_t, &tok) in s.host_toks.iter_mut().zip(tokens) {
            *h_t = tok as i32;
        }
        let st = &self.stream;
        st.memcpy_htod(&s.host_toks[..t], &mut s.toks.slice_mut(..t))
            .map_err(|err| anyhow!("cuda engine: uploading tokens: {err:?}"))?;
        let mut a = st.launch_builder(&self.k.embed);
        a.arg(&mut s.x)
            .arg(&self.embed)
            .arg(&s.toks)
            .arg(&ti)
            .arg(&mi)
            .arg(&self.emb_scale);
        // SAFETY: x holds block x m values, the ids are < vocab (checked by `drive`).
        unsafe { a.launch(cfg_1d(t * m)) }.map_err(launch_err("embed_f32"))?;
        for (lw, lc) in self.layers.iter().zip(state.layers.iter_mut()) {
            self.timestep_norm(&s.x, &mut s.xn, &mut lc.norm, (&lw.tn_w, &lw.tn_b), t)?;
            // CEMA -> mx, then RMSNorm
            self.cema(lw, lc, s, t)?;
            self.rms_rows(&mut s.mx, Some(&lw.rms_w), t, m, eps)?;
            // Z -> per-head RMS -> Q, K
            self.linear(&mut s.zq, &s.mx, &lw.wz, t, false, false, &mut s.xb)?;
            self.rms_rows(&mut s.zq, None, t * h, dz, eps)?;
            let mut a = st.launch_builder(&self.k.qk_affine);
            a.arg(&s.zq)
                .arg(&mut s.q)
                .arg(&mut s.k)
                .arg(&lw.q_scale)
                .arg(&lw.q_off)
                .arg(&lw.k_scale)
                .arg(&lw.k_off)
                .arg(&ti)
                .arg(&zi);
            // SAFETY: zq, q, k hold t x z values; the affine vectors z.
            unsafe { a.launch(cfg_1d(t * z)) }.map_err(launch_err("qk_affine_f32"))?;
            self.linear(&mut s.vv, &s.xn, &lw.wv, t, false, true, &mut s.xb)?;
            self.linear(&mut s.r, &s.mx, &lw.wr, t, false, true, &mut s.xb)?;
            // RoPE, cache append, attention
            let mut a = st.launch_builder(&self.k.rope_cache);
            a.arg(&mut s.q)
                .arg(&s.k)
                .arg(&s.vv)
                .arg(&mut lc.k)
                .arg(&mut lc.v)
                .arg(&self.freqs)
                .arg(&ti)
                .arg(&zi)
                .arg(&vdi)
                .arg(&dzi)
                .arg(&pos0i);
            // SAFETY: pos0 + t <= chunk rows of the caches; q, k t x z; v t x vd.
            unsafe { a.launch(cfg_1d(t * (z / 2 + vd))) }.map_err(launch_err("rope_cache_f32"))?;
            let mut a = st.launch_builder(&self.k.attention);
            a.arg(&s.q)
                .arg(&lc.k)
                .arg(&lc.v)
                .arg(&mut s.att)
                .arg(&ti)
                .arg(&zi)
                .arg(&vdi)
                .arg(&hi)
                .arg(&pos0i);
            let cfg = LaunchConfig {
                grid_dim: (t as u32, h as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: ((pos0 + t) * 4) as u32,
            };
            // SAFETY: the scores of rows 0..pos0 + t fit the dynamic shared memory asked for.
            unsafe { a.launch(cfg) }.map_err(launch_err("chunk_attention_f32"))?;
            // Y = X + MX Wh1^T + bh1 + (A * R) Wh2^T
            st.memcpy_dtod(&s.x.slice(..t * m), &mut s.y.slice_mut(..t * m))
                .map_err(|err| anyhow!("cuda engine: {err:?}"))?;
            self.linear(&mut s.y, &s.mx, &lw.wh1, t, true, false, &mut s.xb)?;
            self.mul(&mut s.att, &s.r, t * vd)?;
            self.gemm(
                &mut s.y,
                &s.att,
                lw.wh2.w.as_ref(),
                (t, m, vd),
                1.0,
                &mut s.xb,
            )?;
            // normalized FFN, residual from the layer input
            let mut a = st.launch_builder(&self.k.layernorm);
            a.arg(&s.y)
                .arg(&mut s.yn)
                .arg(&lw.ln_w)
                .arg(&lw.ln_b)
                .arg(&ti)
                .arg(&mi)
                .arg(&eps);
            // SAFETY: y and yn hold t x m values, the weights m.
            unsafe { a.launch(rows_cfg(t)) }.map_err(launch_err("layernorm_f32"))?;
            self.linear(&mut s.u, &s.yn, &lw.fc1, t, false, true, &mut s.xb)?;
            if let Some(fc3) = &lw.fc3 {
                self.linear(&mut s.u3, &s.yn, fc3, t, false, false, &mut s.xb)?;
                self.mul(&mut s.u, &s.u3, t * lw.fc1.out)?;
            }
            self.linear(&mut s.xn, &s.u, &lw.fc2, t, false, false, &mut s.xb)?;
            let has_alpha = lw.alpha.is_some() as i32;
            let alpha = lw.alpha.as_ref().unwrap_or(&lw.ln_w);
            let mut a = st.launch_builder(&self.k.residual);
            a.arg(&mut s.x)
                .arg(&s.xn)
                .arg(alpha)
                .arg(&has_alpha)
                .arg(&ti)
                .arg(&mi);
            // SAFETY: x and xn hold t x m values, alpha m.
            unsafe { a.launch(cfg_1d(t * m)) }.map_err(launch_err("residual_f32"))?;
        }
        self.timestep_norm(
            &s.x,
            &mut s.xn,
            &mut state.final_norm,
            (&self.final_w, &self.final_b),
            t,
        )?;
        let (r0, rows) = match want {
            Want::All => (0, t),
            Want::Last => (t - 1, 1),
            Want::None => return Ok(()),
        };
        let v = d.vocab;
        let x = s.xn.slice(r0 * m..(r0 + rows) * m);
        self.gemm(
            &mut s.logits,
            &x,
            self.head_w(),
            (rows, v, m),
            0.0,
            &mut s.xb,
        )?;
        st.memcpy_dtoh(&s.logits.slice(..rows * v), &mut s.host_logits[..rows * v])
            .and_then(|_| st.synchronize())
            .map_err(|err| anyhow!("cuda engine: reading logits: {err:?}"))?;
        for i in 0..rows {
            on_logits(r0 + i, &s.host_logits[i * v..(i + 1) * v]);
        }
        Ok(())
    }

    /// CEMA of the block's `t` rows (`s.xn` into `s.mx`) on the layer's carried state: the
    /// one-thread-per-channel recurrence for short blocks, the chunked scan (three launches, see
    /// `kernels/cema.cu`) for blocks of at least `2 * CEMA_SEGMENT` rows.
    fn cema(&self, lw: &DLayer, lc: &mut DCarry, s: &mut DScratch, t: usize) -> Result<()> {
        let d = &self.dims;
        let (m, n) = (d.m, d.n);
        let (ti, mi, ni) = (t as i32, m as i32, n as i32);
        let st = &self.stream;
        if t < 2 * CEMA_SEGMENT {
            let mut a = st.launch_builder(&self.k.cema);
            a.arg(&s.xn)
                .arg(&mut s.mx)
                .arg(&mut lc.h_re)
                .arg(&mut lc.h_im)
                .arg(&lw.p)
                .arg(&lw.q_re)
                .arg(&lw.q_im)
                .arg(&lw.eta_re)
                .arg(&lw.eta_im)
                .arg(&lw.omega)
                .arg(&ti)
                .arg(&mi)
                .arg(&ni);
            // SAFETY: the CEMA buffers hold m x n values, xn and mx t x m.
            unsafe { a.launch(cfg_1d(m)) }.map_err(launch_err("cema_f32"))?;
            return Ok(());
        }
        let segs = t.div_ceil(CEMA_SEGMENT);
        let segi = CEMA_SEGMENT as i32;
        let mut a = st.launch_builder(&self.k.cema_local);
        a.arg(&s.xn)
            .arg(&mut s.seg_re)
            .arg(&mut s.seg_im)
            .arg(&lw.p)
            .arg(&lw.q_re)
            .arg(&lw.q_im)
            .arg(&ti)
            .arg(&mi)
            .arg(&ni)
            .arg(&segi);
        // SAFETY: the segment buffers hold ceil(block / seg) x m x n values (t <= block, and
        // t >= 2 seg implies block >= 2 seg, so they were sized for segments); xn t x m.
        unsafe { a.launch(cfg_1d(segs * m * n)) }.map_err(launch_err("cema_scan_local_f32"))?;
        let mut a = st.launch_builder(&self.k.cema_carry);
        a.arg(&mut s.seg_re)
            .arg(&mut s.seg_im)
            .arg(&mut lc.h_re)
            .arg(&mut lc.h_im)
            .arg(&lw.q_re)
            .arg(&lw.q_im)
            .arg(&ti)
            .arg(&mi)
            .arg(&ni)
            .arg(&segi);
        // SAFETY: as above; one thread per state element (m x n, checked to fit the grid).
        unsafe { a.launch(cfg_1d(m * n)) }.map_err(launch_err("cema_scan_carry_f32"))?;
        let mut a = st.launch_builder(&self.k.cema_out);
        a.arg(&s.xn)
            .arg(&mut s.mx)
            .arg(&s.seg_re)
            .arg(&s.seg_im)
            .arg(&lw.p)
            .arg(&lw.q_re)
            .arg(&lw.q_im)
            .arg(&lw.eta_re)
            .arg(&lw.eta_im)
            .arg(&lw.omega)
            .arg(&ti)
            .arg(&mi)
            .arg(&ni)
            .arg(&segi);
        // SAFETY: as above; mx holds t x m values.
        unsafe { a.launch(cfg_1d(segs * m)) }.map_err(launch_err("cema_scan_out_f32"))?;
        Ok(())
    }

    fn timestep_norm(
        &self,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        norm: &mut DNorm,
        (w, b): (&CudaSlice<f32>, &CudaSlice<f32>),
        t: usize,
    ) -> Result<()> {
        let d = &self.dims;
        let (count0, ti, mi, gi) = (norm.count as i64, t as i32, d.m as i32, d.g as i32);
        let mut a = self.stream.launch_builder(&self.k.timestep_norm);
        a.arg(x)
            .arg(out)
            .arg(&mut norm.mean)
            .arg(&mut norm.var)
            .arg(w)
            .arg(b)
            .arg(&count0)
            .arg(&ti)
            .arg(&mi)
            .arg(&gi)
            .arg(&d.eps);
        // SAFETY: x and out hold t x m values, the statistics g, the weights m.
        unsafe { a.launch(rows_cfg(d.g)) }.map_err(launch_err("timestep_norm_f32"))?;
        norm.count += t as u64;
        Ok(())
    }

    fn rms_rows(
        &self,
        x: &mut CudaSlice<f32>,
        w: Option<&CudaSlice<f32>>,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<()> {
        let (has_w, ri, wi) = (w.is_some() as i32, rows as i32, width as i32);
        let wv = w.unwrap_or(&self.final_w);
        let mut a = self.stream.launch_builder(&self.k.rms_rows);
        a.arg(x).arg(wv).arg(&has_w).arg(&ri).arg(&wi).arg(&eps);
        // SAFETY: x holds rows x width values, w width (or is unread).
        unsafe { a.launch(rows_cfg(rows)) }.map_err(launch_err("rms_rows_f32"))?;
        Ok(())
    }

    fn mul(&self, a_buf: &mut CudaSlice<f32>, b: &CudaSlice<f32>, n: usize) -> Result<()> {
        let ni = n as i32;
        let mut a = self.stream.launch_builder(&self.k.mul);
        a.arg(a_buf).arg(b).arg(&ni);
        // SAFETY: both hold at least n values.
        unsafe { a.launch(cfg_1d(n)) }.map_err(launch_err("mul_f32"))?;
        Ok(())
    }
}

fn launch_err(kernel: &'static str) -> impl Fn(cudarc19::driver::DriverError) -> anyhow::Error {
    move |err| anyhow!("cuda engine: launching {kernel}: {err:?}")
}

impl StreamBackend for CudaEngine {
    type State = CudaState;
    fn dims(&self) -> &EngineDims {
        &self.dims
    }
    fn new_state(&self, block: usize) -> Result<CudaState> {
        CudaEngine::new_state(self, block)
    }
    fn new_state_rewindowed(&self, block: usize, rewindow: Rewindow) -> Result<CudaState> {
        CudaEngine::new_state_rewindowed(self, block, rewindow)
    }
    fn feed(
        &self,
        state: &mut CudaState,
        tokens: &[usize],
        want: Want,
        on_logits: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<()> {
        CudaEngine::feed(self, state, tokens, want, on_logits)
    }
    fn position(state: &CudaState) -> u64 {
        state.position
    }
    fn state_bytes(state: &CudaState) -> usize {
        CudaEngine::state_bytes(state)
    }
}
