//! CPU-only check of the CUDA kernels (feature `cuda`): the kernel source compiles with NVRTC
//! to PTX for sm_80 and sm_90, with every entry point present, and a broken source is reported.
//! Needs only the NVRTC library (PyPI `nvidia-cuda-nvrtc`, see `.ci/run`), not a GPU. Ignored by
//! default, so that a run without the library reports the tests as ignored rather than passed;
//! `.ci/run` installs the library and runs them with `--ignored` (they fail if it is missing).
#![cfg(feature = "cuda")]

use sparse_kernels::cuda::{gpu, KERNEL_NAMES, TARGET_ARCHS};

fn require_nvrtc() {
    assert!(
        gpu::libraries_present().1,
        "libnvrtc cannot be loaded: is the PyPI package nvidia-cuda-nvrtc's lib folder on \
         LD_LIBRARY_PATH?"
    );
}

#[test]
#[ignore = "needs the NVRTC library (see the module documentation)"]
fn every_kernel_compiles_for_sm80_and_sm90() {
    require_nvrtc();
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
#[ignore = "needs the NVRTC library (see the module documentation)"]
fn a_type_error_in_a_kernel_is_reported() {
    require_nvrtc();
    let broken = "extern \"C\" __global__ void k(float* y) { y[0] = undefined_name; }";
    let err = gpu::compile_source(broken, "compute_80")
        .unwrap_err()
        .to_string();
    assert!(err.contains("NVRTC could not compile"), "{err}");
}
