//! NCCL on this machine's GPUs: the data-parallel sums of `relora_parallel::nccl`, with one
//! thread per GPU standing in for one process per rank (the code path a rank runs is the
//! same; only the id travels by memory instead of MPI).
//!
//!   cargo run --release --features cuda --example nccl_check
//!
//! For world size 1, and again for every GPU when there are several:
//! - gradients of f32, bf16 and f64, with rank r contributing (r + 1) × a pattern, must sum to
//!   world·(world + 1)/2 × the pattern exactly (small integers), non-contiguous ones included;
//! - host buffers (the loss sums) likewise;
//! - the real gradients of a tiny LLaMA, the same batch on every rank, must sum to world × the
//!   gradient (within 1e-6 relative: the ring adds in its own order);
//! - with several GPUs, the bus bandwidth of a 256 MiB all-reduce (nccl-tests' definition).
//!
//! Prints one line per check and `NCCL <checks> checks, <failed> failed`; exits non-zero on
//! a failure.

use anyhow::Result;
use candle_core::cuda::cudarc::driver::CudaContext;
use candle_core::{DType, Device, Tensor};
use relora_model::parallel::Collective;
use relora_model::train::batch_tensors;
use relora_model::{Llama, Rng};
use relora_parallel::nccl::{new_id, NcclGroup};
use std::time::Instant;

mod common;
use common::{random_batch, trainable_grads, TINY};

/// `(what, ok, detail)` for each check one rank ran.
type Checks = Vec<(String, bool, String)>;

fn pattern(n: usize, scale: f64, dtype: DType, dev: &Device) -> Result<Tensor> {
    // Integers below 256 so that bf16 holds every partial sum exactly.
    let v: Vec<f64> = (0..n).map(|i| scale * ((i % 7) as f64 - 3.0)).collect();
    Ok(Tensor::from_vec(v, n, dev)?.to_dtype(dtype)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    Ok(d.max_all()?.to_scalar::<f64>()?)
}

fn grads(model: &Llama, dev: &Device) -> Result<Vec<Tensor>> {
    let (ids, targets, weights) = batch_tensors(&random_batch(3, 2, 32), dev)?;
    let store = model.loss(&ids, &targets, &weights, None)?.backward()?;
    trainable_grads(model, &store)
}

fn rank_checks(rank: usize, world: usize, id: [u8; 128]) -> Result<Checks> {
    let dev = Device::new_cuda(rank)?;
    let group = NcclGroup::join(rank, world, id, &dev, None)?;
    let mut out = Checks::new();
    let tri = (world * (world + 1) / 2) as f64;
    let me = (rank + 1) as f64;

    // Tensors as the trainer passes them, one of them a transposed view.
    let mut ts = vec![
        pattern(1000, me, DType::F32, &dev)?,
        pattern(257, me, DType::BF16, &dev)?,
        pattern(3, me, DType::F64, &dev)?,
        pattern(12, me, DType::F32, &dev)?.reshape((3, 4))?.t()?,
    ];
    let want = [
        pattern(1000, tri, DType::F32, &dev)?,
        pattern(257, tri, DType::BF16, &dev)?,
        pattern(3, tri, DType::F64, &dev)?,
        pattern(12, tri, DType::F32, &dev)?.reshape((3, 4))?.t()?,
    ];
    group.all_reduce_sum(&mut ts)?;
    for (k, (got, want)) in ts.iter().zip(&want).enumerate() {
        let d = max_abs_diff(got, want)?;
        out.push((
            format!("tensor {k} ({:?}, {:?})", got.dtype(), got.dims()),
            d == 0.0 && got.dims() == want.dims(),
            format!("max |error| {d:.1e}"),
        ));
    }
    let mut h32 = vec![me as f32; 5];
    let mut h64 = vec![me; 2];
    group.all_reduce_sum_f32(&mut h32)?;
    group.all_reduce_sum_f64(&mut h64)?;
    out.push((
        "host sums".into(),
        h32.iter().all(|&v| v as f64 == tri) && h64.iter().all(|&v| v == tri),
        format!("{h32:?} {h64:?}"),
    ));

    // Real gradients: the same on every rank, so the sum is world × each.
    let model = Llama::random(TINY, &mut Rng::new(7), &dev)?;
    let local = grads(&model, &dev)?;
    let mut summed = local.clone();
    group.all_reduce_sum(&mut summed)?;
    let mut worst = 0f64;
    for (s, g) in summed.iter().zip(&local) {
        let scaled = (g * world as f64)?;
        let norm = scaled
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        let diff = (s - &scaled)?
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        worst = worst.max((diff / norm.max(1e-30)).sqrt());
    }
    out.push((
        format!("{} LLaMA gradients", local.len()),
        worst <= 1e-6,
        format!("worst relative error {worst:.1e}"),
    ));

    if world > 1 {
        let n = 64 << 20;
        let mut big = vec![Tensor::ones(n, DType::F32, &dev)?];
        group.all_reduce_sum(&mut big)?; // warm-up
        let reps = 10;
        let start = Instant::now();
        for _ in 0..reps {
            group.all_reduce_sum(&mut big)?;
        }
        dev.synchronize()?;
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        let algbw = (4 * n) as f64 / secs / 1e9;
        let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
        out.push((
            "256 MiB all-reduce".into(),
            true,
            format!(
                "{:.2} ms, bus bandwidth {busbw:.1} GB/s (includes one copy)",
                secs * 1e3
            ),
        ));
    }
    Ok(out)
}

fn main() -> Result<()> {
    let gpus = CudaContext::device_count()? as usize;
    println!("{gpus} GPU(s) visible");
    let mut worlds = vec![1];
    if gpus > 1 {
        worlds.push(gpus);
    }
    let (mut checks, mut failed) = (0, 0);
    for world in worlds {
        let id = new_id()?;
        let ranks: Vec<_> = (0..world)
            .map(|rank| std::thread::spawn(move || rank_checks(rank, world, id)))
            .collect();
        for (rank, handle) in ranks.into_iter().enumerate() {
            let result = handle
                .join()
                .map_err(|_| anyhow::anyhow!("rank {rank} panicked"))?;
            match result {
                Ok(list) => {
                    for (what, ok, detail) in list {
                        checks += 1;
                        failed += usize::from(!ok);
                        let verdict = if ok { "ok" } else { "FAIL" };
                        println!("world {world} rank {rank}: {what}: {detail}: {verdict}");
                    }
                }
                Err(e) => {
                    checks += 1;
                    failed += 1;
                    println!("world {world} rank {rank}: FAIL {e:#}");
                }
            }
        }
    }
    println!("NCCL {checks} checks, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
