//! Each fused op against the reference composition (values and gradients, f32 and bf16)
//! and against finite differences of its own forward pass.

use super::*;
use crate::llama::{self, ROPE_BASE};
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};

fn randn(rng: &mut Rng, shape: &[usize], std: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.normal_vec(n, std), shape, &Device::Cpu).unwrap()
}

/// Relative L2 distance.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap();
    (diff.to_scalar::<f64>().unwrap() / norm.to_scalar::<f64>().unwrap().max(1e-30)).sqrt()
}

/// `f` applied to `inputs` as Vars in `dtype`, reduced to a scalar against fixed random
/// weights: (output, the scalar, each input's gradient).
fn run(
    inputs: &[Tensor],
    dtype: DType,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> (Tensor, f64, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let probe = randn(&mut Rng::new(99), out.dims(), 1.0);
    let scalar = (out.to_dtype(DType::F32).unwrap() * probe)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = scalar.backward().unwrap();
    let gs = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
        .collect();
    (out, scalar.to_scalar::<f32>().unwrap() as f64, gs)
}

/// Fused against reference, in f32 (`tol`) and bf16 (`tol_bf16`, both sides in bf16).
fn compare(
    name: &str,
    inputs: &[Tensor],
    fused: &dyn Fn(&[Tensor]) -> Tensor,
    reference: &dyn Fn(&[Tensor]) -> Tensor,
    tol: f64,
    tol_bf16: f64,
) {
    for (dtype, tol) in [(DType::F32, tol), (DType::BF16, tol_bf16)] {
        let (yf, _, gf) = run(inputs, dtype, fused);
        let (yr, _, gr) = run(inputs, dtype, reference);
        assert_eq!(yf.dtype(), yr.dtype(), "{name}: output dtype");
        let e = rel(&yf, &yr);
        assert!(e < tol, "{name} {dtype:?}: output differs by {e:e}");
        for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
            assert_eq!(a.dtype(), dtype, "{name}: gradient dtype");
            let e = rel(a, b);
            assert!(e < tol, "{name} {dtype:?}: gradient {i} differs by {e:e}");
        }
    }
}

/// Directional finite differences of the fused op's own forward pass against its backward
/// pass, in f32 (hence the loose step and tolerance).
fn finite_differences(name: &str, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) {
    let (_, _, grads) = run(inputs, DType::F32, f);
    let mut rng = Rng::new(5);
    for (i, g) in grads.iter().enumerate() {
        let d = randn(&mut rng, inputs[i].dims(), 1.0);
        let analytic = (g * &d)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let eps = 1e-2;
        let at = |s: f64| {
            let mut moved = inputs.to_vec();
            moved[i] = (&inputs[i] + (&d * s).unwrap()).unwrap();
            run(&moved, DType::F32, f).1
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        let tol = 2e-3 * analytic.abs().max(numeric.abs()).max(1.0);
        assert!(
            (analytic - numeric).abs() < tol,
            "{name}: input {i}: analytic {analytic} vs numeric {numeric}"
        );
    }
}

#[test]
fn rms_norm_matches_reference_and_finite_differences() {
    let mut rng = Rng::new(1);
    let x = randn(&mut rng, &[3, 7, 16], 1.0);
    let w = (randn(&mut rng, &[16], 0.3) + 1.0).unwrap();
    let fused = |t: &[Tensor]| rms_norm(&t[0], &t[1], llama::RMS_EPS).unwrap();
    let reference = |t: &[Tensor]| llama::rms_norm(&t[0], &t[1]).unwrap();
    compare(
        "rms_norm",
        &[x.clone(), w.clone()],
        &fused,
        &reference,
        1e-6,
        2e-2,
    );
    finite_differences("rms_norm", &[x, w], &fused);
}

#[test]
fn rope_matches_reference_and_finite_differences() {
    let mut rng = Rng::new(2);
    let (b, t, h, d) = (2, 9, 3, 8);
    let x = randn(&mut rng, &[b, t, h, d], 1.0);
    let tables = RopeTables::new(t, d, ROPE_BASE);
    let fused = |x: &[Tensor]| rope(&x[0], &tables).unwrap();
    let reference = |x: &[Tensor]| {
        let (cos, sin) = tables.tensors(&Device::Cpu).unwrap();
        let (cos, sin) = (
            cos.to_dtype(x[0].dtype()).unwrap(),
            sin.to_dtype(x[0].dtype()).unwrap(),
        );
        let xh = x[0].transpose(1, 2).unwrap().contiguous().unwrap();
        llama::rope(&xh, &cos, &sin)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    };
    compare(
        "rope",
        std::slice::from_ref(&x),
        &fused,
        &reference,
        1e-6,
        1e-2,
    );
    finite_differences("rope", &[x], &fused);
}

#[test]
fn swiglu_matches_reference_and_finite_differences() {
    let mut rng = Rng::new(3);
    let g = randn(&mut rng, &[5, 24], 2.0);
    let u = randn(&mut rng, &[5, 24], 1.0);
    let fused = |t: &[Tensor]| swiglu(&t[0], &t[1]).unwrap();
    let reference = |t: &[Tensor]| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap();
    compare(
        "swiglu",
        &[g.clone(), u.clone()],
        &fused,
        &reference,
        1e-6,
        1e-2,
    );
    finite_differences("swiglu", &[g, u], &fused);
}

#[test]
fn causal_attention_matches_reference_and_finite_differences() {
    // 70 positions: two query blocks, the second partial.
    for (t, seed) in [(5, 4), (70, 5)] {
        let mut rng = Rng::new(seed);
        let (b, h, d) = (2, 3, 8);
        let qkv: Vec<Tensor> = (0..3)
            .map(|_| randn(&mut rng, &[b, t, h * d], 1.0))
            .collect();
        let scale = 1.0 / (d as f64).sqrt();
        // The reference composition applies RoPE too; so does the fused side (tested above).
        let tables = RopeTables::new(t, d, ROPE_BASE);
        let fused = |x: &[Tensor]| {
            let (q, k) = (rope(&x[0], &tables).unwrap(), rope(&x[1], &tables).unwrap());
            causal_attention(&q, &k, &x[2], h, scale).unwrap()
        };
        let reference = |x: &[Tensor]| {
            let master = if x[0].dtype() == DType::BF16 {
                DType::F32
            } else {
                x[0].dtype()
            };
            let heads = |y: &Tensor| y.reshape((b, t, h, d)).unwrap();
            llama::reference_attention(
                [heads(&x[0]), heads(&x[1]), heads(&x[2])],
                &tables,
                scale,
                master,
            )
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
        };
        compare("attention", &qkv, &fused, &reference, 1e-5, 2e-2);
        if t == 5 {
            finite_differences("attention", &qkv, &fused);
        }
    }
}

#[test]
fn cross_entropy_matches_reference_and_finite_differences() {
    let mut rng = Rng::new(6);
    let (n, v) = (12, 37);
    let logits = randn(&mut rng, &[n, v], 3.0);
    let targets = Tensor::from_vec(
        (0..n as u32)
            .map(|i| (i * 7) % v as u32)
            .collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    // Some tokens unscored, one weighted double.
    let mut w = vec![1f32; n];
    w[0] = 0.0;
    w[5] = 0.0;
    w[7] = 2.0;
    let weights = Tensor::from_vec(w, n, &Device::Cpu).unwrap();
    let fused = |t: &[Tensor]| cross_entropy(&t[0], &targets, &weights).unwrap();
    let reference = |t: &[Tensor]| llama::cross_entropy(&t[0], &targets, &weights).unwrap();
    compare(
        "cross_entropy",
        std::slice::from_ref(&logits),
        &fused,
        &reference,
        1e-6,
        1e-2,
    );
    finite_differences("cross_entropy", &[logits], &fused);
}

#[test]
fn cross_entropy_names_a_target_outside_the_vocabulary() {
    let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let targets = Tensor::new(&[1u32, 9], &Device::Cpu).unwrap();
    let weights = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    let err = cross_entropy(&logits, &targets, &weights).unwrap_err();
    assert!(err.to_string().contains("target 9 of token 1"), "{err}");
}

#[test]
fn lora_linear_matches_reference_and_finite_differences() {
    let mut rng = Rng::new(7);
    let (m, i, o, r) = (10, 12, 9, 3);
    let x = randn(&mut rng, &[m, i], 1.0);
    let w = randn(&mut rng, &[o, i], 0.5);
    let a = randn(&mut rng, &[r, i], 0.5);
    let b = randn(&mut rng, &[o, r], 0.5);
    let s = 1.5;
    for dropout in [0.0, 0.3] {
        let mask =
            (dropout > 0.0).then(|| crate::linear::mask_values(&mut Rng::new(3), m * i, dropout));
        let fused = |t: &[Tensor]| lora_linear(&t[0], &w, &t[1], &t[2], s, mask.clone()).unwrap();
        let reference = |t: &[Tensor]| {
            let dt = t[0].dtype();
            let xd = match &mask {
                Some(k) => (&t[0]
                    * Tensor::from_slice(k, (m, i), &Device::Cpu)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap())
                .unwrap(),
                None => t[0].clone(),
            };
            let frozen = crate::frozen::frozen_matmul(&t[0], &w.to_dtype(dt).unwrap()).unwrap();
            let low = crate::precision::matmul(&xd, &t[1].t().unwrap()).unwrap();
            let low = crate::precision::matmul(&(low * s).unwrap(), &t[2].t().unwrap()).unwrap();
            (frozen + low).unwrap()
        };
        let inputs = [x.clone(), a.clone(), b.clone()];
        compare("lora_linear", &inputs, &fused, &reference, 1e-6, 2e-2);
        finite_differences("lora_linear", &inputs, &fused);
    }
}

/// The LoRA layer with a compact frozen W against the same layer with that W dequantised
/// and dense: the forward pass bit for bit (blocks of W's rows split the output's columns,
/// not its sums), the gradients to rounding (dx = dy·W sums over W's rows block by block).
/// W is taller than one dequantisation block, so the blocks are exercised.
#[test]
fn lora_linear_with_a_compact_w_matches_the_dense_one() {
    use crate::quant::{FrozenFormat, QuantWeight};
    let mut rng = Rng::new(17);
    let (m, i, o, r) = (6, 256, 1100, 4);
    let x = randn(&mut rng, &[m, i], 1.0);
    let w = randn(&mut rng, &[o, i], 0.05);
    let a = randn(&mut rng, &[r, i], 0.5);
    let b = randn(&mut rng, &[o, r], 0.5);
    let data = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for format in [FrozenFormat::Bf16, FrozenFormat::Int8, FrozenFormat::Nf4] {
        let q = std::sync::Arc::new(QuantWeight::quantize(&data, (o, i), format, 64));
        let dense = Tensor::from_vec(q.dequantize(), (o, i), &Device::Cpu).unwrap();
        let compact = |t: &[Tensor]| {
            lora::lora_linear_quantized(&t[0], q.clone(), &t[1], &t[2], 2.0, None).unwrap()
        };
        let reference = |t: &[Tensor]| lora_linear(&t[0], &dense, &t[1], &t[2], 2.0, None).unwrap();
        let inputs = [x.clone(), a.clone(), b.clone()];
        let (yc, _, gc) = run(&inputs, DType::F32, &compact);
        let (yr, _, gr) = run(&inputs, DType::F32, &reference);
        assert_eq!(
            yc.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            yr.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{format:?}: forward"
        );
        for (k, (a, b)) in gc.iter().zip(&gr).enumerate() {
            let e = rel(a, b);
            assert!(e < 1e-6, "{format:?}: gradient {k} differs by {e:e}");
        }
    }
}

#[test]
fn linear_matches_reference_and_finite_differences() {
    let mut rng = Rng::new(8);
    let x = randn(&mut rng, &[2, 5, 12], 1.0);
    let w = randn(&mut rng, &[9, 12], 0.5);
    let fused = |t: &[Tensor]| linear(&t[0], &t[1]).unwrap();
    let reference = |t: &[Tensor]| {
        let x2 = t[0].reshape((10, 12)).unwrap();
        crate::precision::matmul(&x2, &t[1].t().unwrap())
            .unwrap()
            .reshape((2, 5, 9))
            .unwrap()
    };
    compare(
        "linear",
        &[x.clone(), w.clone()],
        &fused,
        &reference,
        1e-6,
        1e-2,
    );
    finite_differences("linear", &[x, w], &fused);
}

#[test]
fn head_cross_entropy_matches_reference_and_finite_differences() {
    let mut rng = Rng::new(9);
    let (n, h, v) = (12, 16, 37);
    let x = randn(&mut rng, &[n, h], 1.0);
    let head = randn(&mut rng, &[v, h], 0.5);
    let targets = Tensor::from_vec(
        (0..n as u32)
            .map(|i| (i * 5) % v as u32)
            .collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    let mut w = vec![1f32; n];
    w[3] = 0.0;
    let weights = Tensor::from_vec(w, n, &Device::Cpu).unwrap();
    let fused = |t: &[Tensor]| head_cross_entropy(&t[0], &t[1], &targets, &weights).unwrap();
    // The reference as the model composes it: logits in the compute dtype, the loss in f32.
    let reference = |t: &[Tensor]| {
        let logits = crate::precision::matmul(&t[0], &t[1].t().unwrap()).unwrap();
        llama::cross_entropy(&logits.to_dtype(DType::F32).unwrap(), &targets, &weights).unwrap()
    };
    compare(
        "head_cross_entropy",
        &[x.clone(), head.clone()],
        &fused,
        &reference,
        1e-6,
        2e-2,
    );
    finite_differences("head_cross_entropy", &[x, head], &fused);
}

/// The CUDA kernels (kernels.cu), run on the CPU by emulate/emulate.h, against plain
/// double-precision math: every kernel's indexing, reductions and launch shapes, without a
/// GPU. Needs a C++20 compiler (g++, or $CXX).
#[test]
fn cuda_kernels_match_plain_math_in_emulation() {
    use std::process::Command;
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fused/emulate");
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("check_kernels");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread"])
        .arg(src.join("check_kernels.cpp"))
        .arg("-o")
        .arg(&bin)
        .output()
        .unwrap_or_else(|e| {
            panic!("{cxx} could not be run ({e}): this test needs a C++20 compiler; install g++")
        });
    assert!(
        built.status.success(),
        "compiling the emulated kernels failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let ran = Command::new(&bin).output().unwrap();
    let out = String::from_utf8_lossy(&ran.stdout);
    assert!(ran.status.success(), "{out}");
    // Every check ran (a kernel left out of main() would not show as a failure).
    assert!(out.contains("KERNELS 29 checks, 0 failed"), "{out}");
}

/// Every kernel `cuda.rs` launches exists in kernels.cu and gets as many arguments as it has
/// parameters, and every kernel is launched. The launch code compiles only with `cuda` and
/// runs only on a GPU; its argument lists against the kernels' signatures are what can be
/// checked of it here.
#[test]
fn cuda_launches_match_the_kernels_signatures() {
    use std::collections::{BTreeMap, BTreeSet};
    let cu = include_str!("kernels.cu");
    let rs = include_str!("cuda.rs");
    let mut params = BTreeMap::new();
    for part in cu.split("extern \"C\" __global__ void ").skip(1) {
        let open = part.find('(').unwrap();
        let close = part.find(')').unwrap();
        params.insert(
            part[..open].trim(),
            part[open + 1..close].split(',').count(),
        );
    }
    // Top-level arguments of each `launch!(…)` call: dev, "name", config, then the kernel's.
    let mut launched = BTreeSet::new();
    for part in rs.split("launch!(").skip(1) {
        let (mut depth, mut args, mut arg) = (0, Vec::new(), String::new());
        for c in part.chars() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => break,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    args.push(std::mem::take(&mut arg));
                    continue;
                }
                _ => {}
            }
            arg.push(c);
        }
        args.push(arg);
        args.retain(|a| !a.trim().is_empty());
        let name = args[1].trim().trim_matches('"').to_string();
        let want = params
            .get(name.as_str())
            .unwrap_or_else(|| panic!("cuda.rs launches {name}, which kernels.cu lacks"));
        assert_eq!(args.len() - 3, *want, "arguments passed to {name}");
        launched.insert(name);
    }
    assert_eq!(params.len(), 16, "kernels found in kernels.cu");
    let all: BTreeSet<String> = params.keys().map(|k| k.to_string()).collect();
    assert_eq!(launched, all);
}

/// The matmul helper's products are the same bytes on 1 and 2 threads, for the shapes whose
/// long inner dimension a thread split could cut (a weight gradient over the batch's tokens,
/// a LoRA factor's gradient), and they agree with faer's kernels (another crate, other
/// blocking) to f32 rounding: both compute the same product.
#[test]
fn matmuls_do_not_depend_on_threads_and_agree_across_kernel_crates() {
    use super::gemm::{mm_with, Backend, Threads};
    let mut rng = Rng::new(5);
    // (m, n, k, lhs stored transposed): dW = dyᵀ·x, dA = vᵀ·x, dB = dyᵀ·u, y = x·Aᵀ.
    for (m, n, k, lhs_t) in [
        (96, 80, 1500, true),
        (32, 96, 2048, true),
        (200, 32, 2048, true),
        (1024, 32, 96, false),
    ] {
        let lhs = rng.normal_vec(m * k, 1.0);
        let rhs = rng.normal_vec(k * n, 1.0);
        let (lc, lr) = if lhs_t { (m, 1) } else { (1, k) };
        let product = |backend: Backend, threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut dst = vec![0f32; m * n];
            pool.install(|| unsafe {
                // SAFETY: the buffers have the extents given; dst is fresh.
                mm_with(
                    backend,
                    (m, n, k),
                    (dst.as_mut_ptr(), 1, n),
                    (lhs.as_ptr(), lc, lr),
                    (rhs.as_ptr(), 1, n),
                    1.0,
                    false,
                    Threads::All,
                )
            });
            dst
        };
        let one = product(Backend::Gemm, 1);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one), bits(&product(Backend::Gemm, 2)), "{m}×{n}×{k}");
        let faer = product(Backend::Faer, 2);
        let t = |v: Vec<f32>| Tensor::from_vec(v, (m, n), &Device::Cpu).unwrap();
        let err = rel(&t(faer), &t(one));
        assert!(err < 1e-6, "{m}×{n}×{k}: gemm against faer {err:e}");
    }
}

/// Every value an op computes (output and input gradients) as bits.
fn bits_of(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> Vec<u32> {
    let (out, _, grads) = run(inputs, DType::F32, f);
    std::iter::once(&out)
        .chain(&grads)
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .map(f32::to_bits)
        .collect()
}

/// The elementwise kernels compiled for AVX-512, AVX2 and the baseline give the same bits
/// (see simd.rs), at every level this CPU has. Sizes that are not multiples of the 16 lanes.
#[test]
fn kernels_give_the_same_bits_at_every_instruction_set_level() {
    use simd::Level;
    let mut rng = Rng::new(21);
    let (b, t, heads, d, vocab, inter) = (2, 37, 3, 12, 1003, 53);
    let x = randn(&mut rng, &[b, t, heads * d], 1.0);
    let w = randn(&mut rng, &[heads * d], 1.0);
    let qkv: Vec<Tensor> = (0..3)
        .map(|_| randn(&mut rng, &[b, t, heads * d], 1.0))
        .collect();
    let (g, u) = (
        randn(&mut rng, &[b, t, inter], 2.0),
        randn(&mut rng, &[b, t, inter], 1.0),
    );
    let head = randn(&mut rng, &[vocab, heads * d], 0.5);
    let flat = x.reshape((b * t, heads * d)).unwrap();
    let targets = Tensor::from_vec(
        (0..(b * t) as u32)
            .map(|i| (i * 31) % vocab as u32)
            .collect::<Vec<_>>(),
        b * t,
        &Device::Cpu,
    )
    .unwrap();
    let weights = Tensor::ones(b * t, DType::F32, &Device::Cpu).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let everything = || {
        let mut all = bits_of(&[x.clone(), w.clone()], &|v| {
            rms_norm(&v[0], &v[1], 1e-6).unwrap()
        });
        all.extend(bits_of(&qkv, &|v| {
            causal_attention(&v[0], &v[1], &v[2], heads, scale).unwrap()
        }));
        all.extend(bits_of(&[g.clone(), u.clone()], &|v| {
            swiglu(&v[0], &v[1]).unwrap()
        }));
        all.extend(bits_of(&[flat.clone(), head.clone()], &|v| {
            head_cross_entropy(&v[0], &v[1], &targets, &weights).unwrap()
        }));
        // AdamW with weight decay, and an accumulation, from fixed tensors.
        let p = g.flatten_all().unwrap().copy().unwrap();
        let (m, v) = (p.zeros_like().unwrap(), p.ones_like().unwrap());
        let step = adamw::AdamStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            one_minus_beta1: 0.1,
            one_minus_beta2: 0.001,
            eps: 1e-8,
            weight_decay: 0.1,
            bias1: 0.1,
            bias2: 0.001,
            grad_scale: 0.5,
        };
        let grad = u.flatten_all().unwrap();
        adamw::step(&p, &m, &v, &grad, step).unwrap();
        let mut acc = p.copy().unwrap();
        grads::accumulate(&mut acc, &grad).unwrap();
        for t in [&p, &m, &v, &acc] {
            all.extend(t.to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()));
        }
        all
    };
    let best = simd::detected();
    let want = everything();
    for level in [Level::Baseline, Level::Avx2, Level::Avx512] {
        if level > best {
            continue;
        }
        simd::force(level);
        let got = everything();
        simd::force(best);
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(got.len(), want.len());
        assert_eq!(differ, 0, "{} values differ at {level:?}", differ);
    }
}
