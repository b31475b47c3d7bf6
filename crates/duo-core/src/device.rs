//! Backend and device selection at run time (`--device`, `--dtype`). Every network is generic over
//! `B: Backend`; the cargo features decide which backends are compiled in, and a command runs its
//! work through [`dispatch`], which picks the backend type for the chosen device.

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

use crate::error::{DuoError, Result};

/// A device named on the command line: `cpu`, `ndarray`, `wgpu[:N]`, `vulkan[:N]`, `cuda[:N]`,
/// `torch-cpu`, `torch-cuda[:N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// Burn's Flex CPU backend (feature `flex`).
    Cpu,
    /// Burn's NdArray CPU backend (feature `ndarray`), kept for comparison.
    NdArray,
    Wgpu(usize),
    Vulkan(usize),
    Cuda(usize),
    /// LibTorch's CPU kernels through Burn's tch backend (feature `tch`): PyTorch's speed on the CPU.
    TorchCpu,
    /// LibTorch on CUDA device N (feature `tch`).
    TorchCuda(usize),
}

impl DeviceChoice {
    /// The best device compiled in: CUDA, then Vulkan, then wgpu, then the CPU.
    pub fn best_available() -> Self {
        if cfg!(feature = "cuda") {
            Self::Cuda(0)
        } else if cfg!(feature = "vulkan") {
            Self::Vulkan(0)
        } else if cfg!(feature = "wgpu") {
            Self::Wgpu(0)
        } else if cfg!(feature = "flex") {
            Self::Cpu
        } else {
            Self::NdArray
        }
    }

    /// The names this binary accepts.
    pub fn compiled_in() -> Vec<&'static str> {
        let mut names = Vec::new();
        for (on, name) in [
            (cfg!(feature = "flex"), "cpu"),
            (cfg!(feature = "ndarray"), "ndarray"),
            (cfg!(feature = "wgpu"), "wgpu"),
            (cfg!(feature = "vulkan"), "vulkan"),
            (cfg!(feature = "cuda"), "cuda"),
            (cfg!(feature = "tch"), "torch-cpu"),
            (cfg!(feature = "tch"), "torch-cuda"),
        ] {
            if on {
                names.push(name);
            }
        }
        names
    }
}

impl FromStr for DeviceChoice {
    type Err = DuoError;
    fn from_str(s: &str) -> Result<Self> {
        let (name, index) = match s.split_once(':') {
            Some((n, i)) => {
                let index = i.parse().map_err(|_| DuoError::Invalid(format!("bad device index in {s:?}")))?;
                if matches!(n, "cpu" | "flex" | "ndarray" | "torch-cpu") {
                    return Err(DuoError::Invalid(format!(
                        "device {s:?}: the {n} backend has one device and takes no index (use `{n}`)"
                    )));
                }
                (n, index)
            }
            None => (s, 0),
        };
        let choice = match name {
            "cpu" | "flex" => Self::Cpu,
            "ndarray" => Self::NdArray,
            "wgpu" => Self::Wgpu(index),
            "vulkan" => Self::Vulkan(index),
            "cuda" => Self::Cuda(index),
            "torch-cpu" => Self::TorchCpu,
            "torch-cuda" => Self::TorchCuda(index),
            other => {
                return Err(DuoError::Invalid(format!(
                    "unknown device {other:?}; this build has: {}",
                    Self::compiled_in().join(", ")
                )));
            }
        };
        let compiled = match choice {
            Self::Cpu => cfg!(feature = "flex"),
            Self::NdArray => cfg!(feature = "ndarray"),
            Self::Wgpu(_) => cfg!(feature = "wgpu"),
            Self::Vulkan(_) => cfg!(feature = "vulkan"),
            Self::Cuda(_) => cfg!(feature = "cuda"),
            Self::TorchCpu | Self::TorchCuda(_) => cfg!(feature = "tch"),
        };
        if !compiled {
            return Err(DuoError::Invalid(format!(
                "device {name:?} is not compiled into this binary (rebuild with `--features {}`); this build has: {}",
                match name {
                    "cpu" => "flex",
                    "torch-cpu" | "torch-cuda" => "tch",
                    other => other,
                },
                Self::compiled_in().join(", ")
            )));
        }
        Ok(choice)
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::NdArray => write!(f, "ndarray"),
            Self::Wgpu(i) => write!(f, "wgpu:{i}"),
            Self::Vulkan(i) => write!(f, "vulkan:{i}"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::TorchCpu => write!(f, "torch-cpu"),
            Self::TorchCuda(i) => write!(f, "torch-cuda:{i}"),
        }
    }
}

/// `--dtype`: the float type of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    Bf16,
}

impl FromStr for FloatType {
    type Err = DuoError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "f16" | "fp16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(DuoError::Invalid(format!("unknown dtype {other:?} (f32, f16, bf16)"))),
        }
    }
}

impl FloatType {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// The float dtype of a tensor cast to a run's `dtype` (anything not 16-bit runs in f32).
pub fn float_dtype(dtype: DType) -> FloatDType {
    match dtype {
        DType::F16 => FloatDType::F16,
        DType::BF16 => FloatDType::BF16,
        _ => FloatDType::F32,
    }
}

/// Work that runs on any backend: `dispatch` calls `run` with the backend the device needs.
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<Self::Output>;
}

/// Runs `task` on `choice` with float type `float`, refusing dtypes the device cannot compute in.
pub fn dispatch<T: BackendTask>(choice: DeviceChoice, float: FloatType, task: T) -> Result<T::Output> {
    match choice {
        #[cfg(feature = "flex")]
        DeviceChoice::Cpu => run_checked::<burn::backend::Flex, T>(Default::default(), choice, float, task),
        #[cfg(feature = "ndarray")]
        DeviceChoice::NdArray => {
            run_checked::<burn::backend::NdArray, T>(Default::default(), choice, float, task)
        }
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu(i) => run_checked::<burn::backend::Wgpu, T>(
            burn::backend::wgpu::WgpuDevice::DiscreteGpu(i),
            choice,
            float,
            task,
        ),
        #[cfg(feature = "vulkan")]
        DeviceChoice::Vulkan(i) => run_checked::<burn::backend::Vulkan, T>(
            burn::backend::wgpu::WgpuDevice::DiscreteGpu(i),
            choice,
            float,
            task,
        ),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(i) => run_checked::<burn::backend::Cuda, T>(
            burn::backend::cuda::CudaDevice::new(i),
            choice,
            float,
            task,
        ),
        #[cfg(feature = "tch")]
        DeviceChoice::TorchCpu => run_checked::<burn::backend::LibTorch, T>(
            burn::backend::libtorch::LibTorchDevice::Cpu,
            choice,
            float,
            task,
        ),
        #[cfg(feature = "tch")]
        DeviceChoice::TorchCuda(i) => run_checked::<burn::backend::LibTorch, T>(
            burn::backend::libtorch::LibTorchDevice::Cuda(i),
            choice,
            float,
            task,
        ),
        #[allow(unreachable_patterns)]
        other => Err(DuoError::Invalid(format!("device {other} is not compiled into this binary"))),
    }
}

fn run_checked<B: Backend, T: BackendTask>(
    device: B::Device,
    choice: DeviceChoice,
    float: FloatType,
    task: T,
) -> Result<T::Output> {
    let dtype = float.dtype();
    if !B::supports_dtype(&device, dtype) {
        return Err(DuoError::Invalid(format!(
            "device {choice} cannot compute in {float:?}; use --dtype f32"
        )));
    }
    task.run::<B>(device, dtype)
}

/// Keeps memory the networks free inside the process rather than handing it back to the system.
/// Each step frees and allocates the same large buffers again, and glibc returns big blocks to the
/// system at once, so every new one costs a page fault and a zeroing per page: a third of the time
/// of SD 1.4's forward and backward on LibTorch (`perf record`). With blocks up to 32 MiB kept in
/// the heap and 2 GiB of free heap kept, that forward and backward ran 1.6× faster. Called first
/// thing by the commands; only glibc has these settings.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}

/// Hands the free memory that [`keep_freed_memory`] keeps back to the system, for when another
/// process is about to need it (`duo-bench perf --compare` starts PyTorch after our measurement).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's arenas to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
