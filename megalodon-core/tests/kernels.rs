//! Every CUDA kernel source in `kernels/` compiles to PTX with NVRTC (no GPU needed), and each
//! entry point the CUDA engine launches is in the PTX. Where NVRTC (`libnvrtc.so.13`) is missing
//! the test skips with a message, unless `MEGALODON_REQUIRE_NVRTC=1` (set by `.ci/run`, which
//! installs the `nvidia-cuda-nvrtc==13.0.48` wheel) makes that a failure.

use megalodon_core::engine::cuda::{compile_kernels, KERNELS};

#[test]
fn every_kernel_compiles_with_nvrtc() {
    let required = std::env::var("MEGALODON_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let ptx = match compile_kernels() {
        Ok(p) => p,
        Err(e) if !required && format!("{e:#}").contains("not found") => {
            println!("SKIPPED: {e:#}");
            return;
        }
        Err(e) => panic!("{e:#}"),
    };
    let all: String = ptx.iter().map(|(_, p)| p.to_src()).collect();
    for (name, p) in &ptx {
        println!("kernels/{name}: {} bytes of PTX", p.to_src().len());
    }
    for entry in KERNELS {
        assert!(
            all.contains(&format!(".entry {entry}(")),
            "no entry point {entry} in the PTX"
        );
    }
}
