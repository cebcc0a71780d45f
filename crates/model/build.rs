//! With the `cuda` feature, compiles the fused ops' kernels (src/fused/kernels.cu) to PTX
//! with nvcc, for src/fused/cuda.rs to embed. nvcc is taken from $CUDA_HOME/bin, else from
//! PATH (scripts/cuda/build.sh sets both); CUDA_COMPUTE_CAP picks the architecture, as for
//! candle's own kernels (default 80: PTX for Ampere runs on every later GPU by JIT).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/fused/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("fused_kernels.ptx");
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let result = Command::new(&nvcc)
        .args(["--ptx", "-O3", "--std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("src/fused/kernels.cu")
        .arg("-o")
        .arg(&out)
        .output();
    match result {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "nvcc could not compile src/fused/kernels.cu:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "the `cuda` feature needs nvcc to compile src/fused/kernels.cu, and {} could not \
             be run ({e}); set CUDA_HOME, or build with scripts/cuda/build.sh",
            nvcc.display()
        ),
    }
}
