//! The elementwise kernels' instruction set, chosen at run time, and the reductions they share.
//!
//! The workspace builds for the baseline x86-64 target (SSE2), so that one binary runs on
//! every x86-64 CPU. gemm picks its own kernels at run time; the rest of the fused ops (the
//! softmaxes, SwiGLU, RMSNorm, AdamW) were compiled for SSE2 and ran four lanes wide on CPUs
//! that have sixteen. [`kernel!`] compiles a kernel three times: for x86-64-v4 (AVX-512),
//! x86-64-v3 (AVX2 and FMA) and the baseline, and calls the best version this CPU runs.
//!
//! The three versions give the same bits. Rust never contracts `a·b + c` into an FMA, and
//! wider vectors change only how many lanes one instruction covers, not which additions
//! happen in which order, as long as no reduction leaves the order to the compiler: every sum
//! here goes through [`sum_map`], which keeps [`LANES`] partial sums in a fixed pattern that
//! does not depend on the vector width (a test checks each kernel at every level this CPU
//! has). So results do not depend on the CPU's ISA here, only on gemm's blocking.

use std::sync::atomic::{AtomicU8, Ordering};

/// Partial sums a reduction keeps: one AVX-512 vector, four SSE ones. Fixed, so the order of
/// a sum is the same at every level.
pub const LANES: usize = 16;

/// The instruction sets a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// x86-64 baseline (SSE2), or any other architecture.
    Baseline = 1,
    /// x86-64-v3: AVX2 and FMA.
    Avx2 = 2,
    /// x86-64-v4: AVX-512 F, BW, DQ and VL.
    Avx512 = 3,
}

impl Level {
    /// The level a name gives (`baseline`, `avx2`, `avx512`: what [`Level::name`] says).
    pub fn from_name(name: &str) -> Option<Level> {
        [Level::Baseline, Level::Avx2, Level::Avx512]
            .into_iter()
            .find(|l| l.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

/// 0 until first asked; then the level in use.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The best level this CPU runs.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let v3 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let v4 = v3
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl");
        if v4 {
            return Level::Avx512;
        }
        if v3 {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// The level the kernels run at: [`detected`] unless [`force`]d lower.
#[inline]
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        3 => Level::Avx512,
        2 => Level::Avx2,
        1 => Level::Baseline,
        _ => {
            let l = detected();
            LEVEL.store(l as u8, Ordering::Relaxed);
            l
        }
    }
}

/// Runs the kernels at `want` (at most what the CPU has) from now on, for every thread;
/// returns the level in use before. For tests and benchmarks: the levels give the same bits,
/// so changing it under a running computation changes its speed, never its results.
pub fn force(want: Level) -> Level {
    let before = level();
    LEVEL.store(want.min(detected()) as u8, Ordering::Relaxed);
    before
}

/// Defines `fn name(args) -> ret { body }` compiled for each [`Level`], calling the one
/// [`level`] names. The body is inlined into each version (its helpers must be
/// `#[inline(always)]` to be compiled for the level too: [`sum_map`], `exp`, ...). Arguments
/// are plain `name: Type` pairs; no generics.
macro_rules! kernel {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx,avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx,avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            match $crate::fused::simd::level() {
                // SAFETY: `level` never names a level the CPU lacks.
                #[cfg(target_arch = "x86_64")]
                $crate::fused::simd::Level::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::fused::simd::Level::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(crate) use kernel;

/// Σ f(xᵢ) in [`LANES`] partial sums (element i goes to sum i mod LANES), then added
/// pairwise in a fixed tree: one order at every vector width. Over chunks rather than
/// through [`sum_by`]'s indices: indexing kept its bounds checks and cost the attention op
/// 40% and the loss 20% (bench_ops).
#[inline(always)]
pub fn sum_map(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] += f(c[j]);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(x);
    }
    fold(acc)
}

/// Σ f(xᵢ, yᵢ) over two slices of one length, in the order of [`sum_map`].
#[inline(always)]
pub fn sum_map2(xs: &[f32], ys: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    debug_assert_eq!(xs.len(), ys.len());
    let n = xs.len().min(ys.len());
    let (xs, ys) = (&xs[..n], &ys[..n]);
    let mut acc = [0f32; LANES];
    let full = n / LANES * LANES;
    for (cx, cy) in xs[..full]
        .chunks_exact(LANES)
        .zip(ys[..full].chunks_exact(LANES))
    {
        for j in 0..LANES {
            acc[j] += f(cx[j], cy[j]);
        }
    }
    for ((a, &x), &y) in acc.iter_mut().zip(&xs[full..]).zip(&ys[full..]) {
        *a += f(x, y);
    }
    fold(acc)
}

/// Σ f(i) for i in 0..n, in the order of [`sum_map`].
#[inline(always)]
pub fn sum_by(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let full = n / LANES * LANES;
    for base in (0..full).step_by(LANES) {
        for (j, a) in acc.iter_mut().enumerate() {
            *a += f(base + j);
        }
    }
    for i in full..n {
        acc[i - full] += f(i);
    }
    fold(acc)
}

/// The partial sums added pairwise: lanes j and j + 8, then j and j + 4, ...
#[inline(always)]
fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for j in 0..width {
            acc[j] += acc[j + width];
        }
        width /= 2;
    }
    acc[0]
}

/// The largest element (−∞ for none); NaNs are passed over, as `f32::max` does. The same
/// value whatever the order it is taken in.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = a.max(x);
    }
    acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}
