//! CPU-only check of the CUDA kernels (feature `cuda`): the kernel source compiles with NVRTC
//! to PTX for sm_80 and sm_90, with every entry point present, and a broken source is reported.
//! Needs only the NVRTC library (PyPI `nvidia-cuda-nvrtc`, see `.ci/run`), not a GPU. Without
//! it the test skips, unless `DST_REQUIRE_NVRTC` is set (CI sets it).
#![cfg(feature = "cuda")]

use sparse_kernels::cuda::{gpu, KERNEL_NAMES, TARGET_ARCHS};

fn nvrtc_or_skip() -> bool {
    if gpu::libraries_present().1 {
        return true;
    }
    assert!(
        std::env::var_os("DST_REQUIRE_NVRTC").is_none(),
        "DST_REQUIRE_NVRTC is set but libnvrtc cannot be loaded: is the PyPI package \
         nvidia-cuda-nvrtc's lib folder on LD_LIBRARY_PATH?"
    );
    eprintln!("skipped: no NVRTC library here");
    false
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip() {
        return;
    }
    for &arch in TARGET_ARCHS {
        let ptx = gpu::compile_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
        let src = ptx.to_src();
        let target = format!(".target sm_{}", arch.trim_start_matches("compute_"));
        assert!(src.contains(&target), "{arch}: no `{target}` in the PTX");
        for name in KERNEL_NAMES {
            assert!(
                src.contains(&format!(".entry {name}(")),
                "{arch}: no entry point `{name}` in the PTX"
            );
        }
    }
}

#[test]
fn a_type_error_in_a_kernel_is_reported() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = "extern \"C\" __global__ void k(float* y) { y[0] = undefined_name; }";
    let err = gpu::compile_source(broken, "compute_80")
        .unwrap_err()
        .to_string();
    assert!(err.contains("NVRTC could not compile"), "{err}");
}
