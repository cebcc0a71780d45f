//! The `device` parameter of `train` and `eval`: what it means to the executor (which GPU
//! slot the stage holds) and to the stage (which device it opens).

use candle_core::Device;
use relora_spec::Resources;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Where a stage computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceParam {
    #[default]
    Cpu,
    /// Any free GPU the executor assigns.
    Cuda,
    /// This GPU (an id as the machine numbers them, before CUDA_VISIBLE_DEVICES).
    CudaId(u32),
    /// A GPU when this binary has CUDA and one is visible, else the CPU.
    Auto,
}

impl DeviceParam {
    /// Parse `cpu`, `cuda`, `cuda:N` or `auto`.
    pub fn parse(s: &str) -> Result<DeviceParam, String> {
        match s {
            "cpu" => Ok(DeviceParam::Cpu),
            "cuda" => Ok(DeviceParam::Cuda),
            "auto" => Ok(DeviceParam::Auto),
            _ => match s.strip_prefix("cuda:").map(str::parse::<u32>) {
                Some(Ok(n)) => Ok(DeviceParam::CudaId(n)),
                _ => Err(format!(
                    "unknown device `{s}`: use cpu, cuda, cuda:N (N a GPU id) or auto"
                )),
            },
        }
    }

    /// The GPU slot the executor must reserve, so that parallel stages never share a GPU.
    pub fn resources(self) -> Resources {
        match self {
            DeviceParam::Cpu => Resources::default(),
            DeviceParam::Cuda => Resources {
                gpus: 1,
                gpu_ids: vec![],
                ranks: 0,
            },
            DeviceParam::CudaId(n) => Resources {
                gpus: 1,
                gpu_ids: vec![n],
                ranks: 0,
            },
            DeviceParam::Auto => Resources {
                gpus: u32::from(
                    candle_core::utils::cuda_is_available()
                        && !relora_exec::visible_gpus().is_empty(),
                ),
                gpu_ids: vec![],
                ranks: 0,
            },
        }
    }

    /// Open the device inside the stage's process. The executor sets CUDA_VISIBLE_DEVICES
    /// to the GPUs it assigned (`gpus`), so the first of them is always CUDA ordinal 0,
    /// whatever id the pipeline named.
    pub fn open(self, gpus: &[u32]) -> anyhow::Result<Device> {
        match (self, gpus.is_empty()) {
            (DeviceParam::Cpu, _) | (DeviceParam::Auto, true) => Ok(Device::Cpu),
            (_, false) => relora_model::device("cuda:0"),
            (_, true) => relora_model::device(&self.to_string()),
        }
    }
}

impl fmt::Display for DeviceParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceParam::Cpu => f.write_str("cpu"),
            DeviceParam::Cuda => f.write_str("cuda"),
            DeviceParam::CudaId(n) => write!(f, "cuda:{n}"),
            DeviceParam::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for DeviceParam {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceParam {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceParam::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The resources of a stage whose params may carry a `device` (absent or unreadable: CPU;
/// `validate` reports a bad value).
pub fn resources_of(params: &serde_json::Value) -> Resources {
    params
        .get("device")
        .and_then(serde_json::Value::as_str)
        .and_then(|s| DeviceParam::parse(s).ok())
        .unwrap_or_default()
        .resources()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_claim_gpu_slots() {
        assert_eq!(DeviceParam::parse("cuda:3"), Ok(DeviceParam::CudaId(3)));
        assert_eq!(DeviceParam::parse("cuda").unwrap().resources().gpus, 1);
        assert_eq!(DeviceParam::CudaId(1).resources().gpu_ids, vec![1]);
        assert_eq!(DeviceParam::Cpu.resources().gpus, 0);
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            assert!(DeviceParam::parse(bad).is_err(), "{bad}");
        }
        // Without CUDA in this binary, auto stays on the CPU and holds no GPU.
        if !candle_core::utils::cuda_is_available() {
            assert_eq!(DeviceParam::Auto.resources().gpus, 0);
            assert!(matches!(DeviceParam::Auto.open(&[]), Ok(Device::Cpu)));
        }
        assert_eq!(DeviceParam::CudaId(7).to_string(), "cuda:7");
    }
}
