//! GPU memory: the pool candle allocates from, and the peaks torchtune logs.
//!
//! candle's CUDA tensors come from the device's stream-ordered memory pool (`cuMemAllocAsync`).
//! By default that pool hands freed memory back to the driver at every synchronisation, so each
//! training step would map its activations afresh; [`keep_freed_memory`] makes it keep them,
//! as PyTorch's caching allocator does. The pool's own high-water marks then give the numbers
//! torchtune logs as `peak_memory_alloc` (in use by tensors) and `peak_memory_reserved` (held by
//! the pool). On the CPU every function here answers `None` or does nothing.

use candle_core::Device;

/// Device memory figures in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceMemory {
    /// Most memory held by tensors at once since the last [`reset_peaks`].
    pub peak_in_use: u64,
    /// Most memory the pool held at once (tensors plus cached free blocks) since the last reset.
    pub peak_reserved: u64,
    /// The driver's count of memory in use on the device now: every process's, with the CUDA
    /// context and cuBLAS workspaces included.
    pub driver_used: u64,
}

#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::Device;

    /// The default memory pool of `device`'s GPU, which candle's allocations come from.
    pub fn of(device: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(cuda) = device else {
            return None;
        };
        let context = cuda.cuda_stream().context().clone();
        // Without pool support cudarc allocates with cuMemAlloc, and the pool's counts stay 0.
        if !context.has_async_alloc() {
            return None;
        }
        let cu_device = context.cu_device();
        // SAFETY: `cu_device` comes from a live context of this process.
        unsafe { result::device::get_default_mem_pool(cu_device) }.ok()
    }

    pub fn get(pool: sys::CUmemoryPool, attribute: sys::CUmemPool_attribute) -> Option<u64> {
        let mut value: u64 = 0;
        // SAFETY: these attributes are all `cuuint64_t`, written into `value`.
        unsafe {
            result::mem_pool::get_attribute(pool, attribute, (&mut value as *mut u64).cast())
        }
        .ok()?;
        Some(value)
    }

    pub fn set(
        pool: sys::CUmemoryPool,
        attribute: sys::CUmemPool_attribute,
        mut value: u64,
    ) -> Option<()> {
        // SAFETY: as in `get`; the driver reads one `cuuint64_t`.
        unsafe { result::mem_pool::set_attribute(pool, attribute, (&mut value as *mut u64).cast()) }
            .ok()
    }
}

/// Makes `device`'s memory pool keep freed memory for reuse instead of returning it to the driver
/// at each synchronisation (a no-op on the CPU). Failure only costs speed, so it is logged.
pub fn keep_freed_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Some(p) = pool::of(device) {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        if pool::set(p, A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX).is_none() {
            tracing::debug!("could not raise the CUDA memory pool's release threshold");
        }
    }
    let _ = device;
}

/// Free memory in bytes: the GPU's as the driver reports it; on the CPU what Linux says it can
/// still hand out (`MemAvailable`, page cache included, plus free swap). `None` where unknown.
pub fn free_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
        return mem_get_info().ok().map(|(free, _total)| free as u64);
    }
    match device {
        Device::Cpu => host_available_bytes(),
        _ => None,
    }
}

fn host_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |field: &str| -> Option<u64> {
        let line = meminfo.lines().find_map(|l| l.strip_prefix(field))?;
        line.trim().trim_end_matches("kB").trim().parse().ok()
    };
    Some((kib("MemAvailable:")? + kib("SwapFree:").unwrap_or(0)) * 1024)
}

/// The pool's peaks and the driver's current count (`None` on the CPU).
pub fn read(device: &Device) -> Option<DeviceMemory> {
    #[cfg(feature = "cuda")]
    if let Some(p) = pool::of(device) {
        use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        // A mark reset to zero only rises at the next allocation: the current level bounds it.
        let peak_in_use = pool::get(p, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?
            .max(pool::get(p, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?);
        let peak_reserved = pool::get(p, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?
            .max(pool::get(p, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?);
        let driver_used = mem_get_info()
            .ok()
            .map(|(free, total)| (total - free) as u64)?;
        return Some(DeviceMemory {
            peak_in_use,
            peak_reserved,
            driver_used,
        });
    }
    let _ = device;
    None
}

/// Starts new peaks from the current levels, as torchtune does after logging them.
pub fn reset_peaks(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Some(p) = pool::of(device) {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        // The driver only accepts zero for a high-water mark.
        let _ = pool::set(p, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0);
        let _ = pool::set(p, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0);
    }
    let _ = device;
}

/// Bytes as GiB, the unit torchtune logs memory in.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_device_pool_figures_but_free_memory() {
        keep_freed_memory(&Device::Cpu);
        reset_peaks(&Device::Cpu);
        assert_eq!(read(&Device::Cpu), None);
        #[cfg(target_os = "linux")]
        assert!(free_bytes(&Device::Cpu).is_some_and(|b| b > 0));
        assert_eq!(gib(3 << 30), 3.0);
    }
}
