//! Hot loops compiled twice, for plain x86-64 and for AVX2, and run as the CPU allows. Both
//! builds do the same operations in the same order (no fused multiply-add), so their results are
//! the same to the bit; AVX2 only does more of them per instruction.

/// Runs `kernel` compiled for AVX2 where the CPU has it (checked once, then cached by std), as
/// plain x86-64 code otherwise. `kernel` should be `#[inline(always)]` all the way down: what is
/// not inlined into it is compiled for the plain target.
#[inline(always)]
pub fn with_avx2<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn avx2<R>(kernel: impl FnOnce() -> R) -> R {
            kernel()
        }
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2(kernel) };
    }
    kernel()
}
