//! Run-time choice of the instruction set the kernels are compiled for.
//!
//! Each kernel body is written once as plain Rust (`#[inline(always)]` generics) and compiled
//! three times: for AVX-512, for AVX2 + FMA, and for the baseline target. [`Isa::detect`] picks
//! the best one the CPU supports, once; `SPARSE_KERNELS_ISA=scalar|avx2|avx512` forces one
//! (tests use [`Isa::available`] to check every variant against the scalar reference).

use std::sync::OnceLock;

/// An instruction set a kernel variant is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Baseline target features only, no fused multiply-add.
    Scalar,
    /// x86-64 AVX2 with FMA.
    Avx2,
    /// x86-64 AVX-512 (F, VL, BW) with FMA.
    Avx512,
}

impl Isa {
    /// Whether this CPU can run the variant.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every variant this CPU can run, best last.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.is_supported())
            .collect()
    }

    /// The best supported variant, or the one named by `SPARSE_KERNELS_ISA` if the CPU
    /// supports it. Computed once per process.
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let forced = std::env::var("SPARSE_KERNELS_ISA").ok().and_then(|s| {
                match s.to_ascii_lowercase().as_str() {
                    "scalar" => Some(Isa::Scalar),
                    "avx2" => Some(Isa::Avx2),
                    "avx512" => Some(Isa::Avx512),
                    _ => None,
                }
            });
            match forced {
                Some(i) if i.is_supported() => i,
                _ => *Isa::available().last().expect("scalar is always available"),
            }
        })
    }

    /// Lower-case name, as in `SPARSE_KERNELS_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// Defines `$name(isa, args...)` that runs the `#[inline(always)]` body
/// `$body::<Types..., CONSTS..., FMA>(args...)` compiled for the given [`Isa`]. The body must end
/// its generics with `const FMA: bool` (use [`crate::simd::madd`]), so that the scalar variant
/// never calls a software `fma`.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident<$($g:ident : $b:path),* ; $(const $c:ident : $ct:ty),*>($($a:ident : $t:ty),* $(,)?) => $body:ident) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$($g: $b,)* $(const $c: $ct),*>(isa: $crate::isa::Isa, $($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<$($g: $b,)* $(const $c: $ct),*>($($a: $t),*) { $body::<$($g,)* $($c,)* true>($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<$($g: $b,)* $(const $c: $ct),*>($($a: $t),*) { $body::<$($g,)* $($c,)* true>($($a),*) }
                match isa {
                    // SAFETY: `Isa::Avx512` / `Isa::Avx2` reach a kernel only through `Exec`,
                    // which replaces any variant the CPU does not support by `Isa::detect()`.
                    $crate::isa::Isa::Avx512 => return unsafe { avx512::<$($g,)* $($c),*>($($a),*) },
                    $crate::isa::Isa::Avx2 => return unsafe { avx2::<$($g,)* $($c),*>($($a),*) },
                    $crate::isa::Isa::Scalar => {}
                }
            }
            let _ = isa;
            $body::<$($g,)* $($c,)* false>($($a),*)
        }
    };
}
pub(crate) use multiversion;
