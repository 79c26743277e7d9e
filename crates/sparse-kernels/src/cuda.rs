//! CUDA kernels (feature `cuda`).
//!
//! The kernels themselves (NVRTC-compiled CUDA C loaded through cudarc with dynamic loading,
//! so the workspace builds without a CUDA toolkit) arrive with the CUDA issue. Until then
//! [`available`] explains, at run time, why CUDA cannot be used.

use crate::KernelError;

/// Whether the CUDA kernels can run here; the error says why not.
pub fn available() -> Result<(), KernelError> {
    if cfg!(feature = "cuda") {
        Err(KernelError::Cuda(
            "CUDA kernels are not implemented yet in this build of sparse-kernels".into(),
        ))
    } else {
        Err(KernelError::Cuda(
            "no CUDA support built: rebuild sparse-kernels with `--features cuda`".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_why_cuda_is_unavailable() {
        let msg = super::available().unwrap_err().to_string();
        if cfg!(feature = "cuda") {
            assert!(msg.contains("not implemented yet"), "{msg}");
        } else {
            assert!(msg.contains("no CUDA support built"), "{msg}");
        }
    }
}
