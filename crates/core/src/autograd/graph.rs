//! Hand-written backwards attached to candle's graph, and the gradients custom ops hand over
//! beside it.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

type BackwardFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// The custom op behind [`with_backward`]: its forward hands back a precomputed output, its
/// backward calls a closure with the output gradient.
struct GradFn {
    name: &'static str,
    output: Mutex<Option<Tensor>>,
    backward: BackwardFn,
}

/// Hands over a custom op's precomputed output (exactly once: candle runs the forward once).
fn take_output(name: &str, slot: &Mutex<Option<Tensor>>) -> Result<Tensor> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg(format!("{name}: poisoned output slot")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: forward ran twice")))
}

impl CustomOp1 for GradFn {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _input: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_copy(self.name, take_output(self.name, &self.output)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _input: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(self.name, take_output(self.name, &self.output)?)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(grad_res).map(Some)
    }
}

/// The precomputed output as a fresh CPU storage (custom ops must return owned storage).
fn cpu_copy(name: &str, out: Tensor) -> Result<(CpuStorage, Shape)> {
    let shape = out.shape().clone();
    let flat = out.flatten_all()?;
    let storage = match out.dtype() {
        DType::F32 => CpuStorage::F32(flat.to_vec1::<f32>()?),
        DType::F64 => CpuStorage::F64(flat.to_vec1::<f64>()?),
        DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
        DType::F16 => CpuStorage::F16(flat.to_vec1()?),
        dtype => candle_core::bail!("{name}: unsupported dtype {dtype:?}"),
    };
    Ok((storage, shape))
}

/// The precomputed output as a fresh CUDA storage.
#[cfg(feature = "cuda")]
fn cuda_copy(name: &str, out: Tensor) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    // A contiguous buffer starting at offset 0, cloned out of the lock (the clone copies the
    // whole backing buffer; a view elsewhere in its buffer is first made its own, exactly).
    let in_place = out.is_contiguous() && out.layout().start_offset() == 0;
    let out = if in_place {
        out
    } else {
        out.force_contiguous()?
    };
    let shape = out.shape().clone();
    let (storage, layout) = out.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, shape)),
        _ => candle_core::bail!("{name}: output is not on the CUDA device"),
    }
}

/// Returns `output` (computed from `input.detach()`) recorded in the graph as a function of `input`
/// whose input gradient is `backward(output_grad)`. When `input` is not tracked, `output` is
/// returned as it is and no graph node is made.
pub fn with_backward(
    name: &'static str,
    input: &Tensor,
    output: Tensor,
    backward: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(output);
    }
    let op = GradFn {
        name,
        output: Mutex::new(Some(output)),
        backward: Box::new(backward),
    };
    input.apply_op1_arc(Arc::new(Box::new(op)))
}

type Backward3Fn =
    Box<dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> + Send + Sync>;

/// [`GradFn`] for ops of three inputs.
struct GradFn3 {
    name: &'static str,
    output: Mutex<Option<Tensor>>,
    backward: Backward3Fn,
}

impl CustomOp3 for GradFn3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_copy(self.name, take_output(self.name, &self.output)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(self.name, take_output(self.name, &self.output)?)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.backward)(grad)
    }
}

/// [`with_backward`] for three inputs; `backward` returns the three input gradients.
pub fn with_backward3(
    name: &'static str,
    inputs: (&Tensor, &Tensor, &Tensor),
    output: Tensor,
    backward: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    let (a, b, c) = inputs;
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(output);
    }
    let op = GradFn3 {
        name,
        output: Mutex::new(Some(output)),
        backward: Box::new(backward),
    };
    a.apply_op3_arc(b, c, Arc::new(Box::new(op)))
}

/// [`with_backward`] for two inputs: a three-input op whose third input is the second again
/// (and never gets a gradient of its own).
pub fn with_backward2(
    name: &'static str,
    inputs: (&Tensor, &Tensor),
    output: Tensor,
    backward: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync + 'static,
) -> Result<Tensor> {
    let (a, b) = inputs;
    with_backward3(name, (a, b, b), output, move |grad| {
        let (da, db) = backward(grad)?;
        Ok((da, db, None))
    })
}

/// Gradients of trainable tensors produced inside a custom op's backward (activation
/// checkpointing reruns a layer there), keyed by the variable's id until the training loop
/// collects them with [`param_grad`].
fn side_grads() -> &'static Mutex<std::collections::HashMap<candle_core::TensorId, Tensor>> {
    static SIDE: std::sync::OnceLock<
        Mutex<std::collections::HashMap<candle_core::TensorId, Tensor>>,
    > = std::sync::OnceLock::new();
    SIDE.get_or_init(|| Mutex::new(std::collections::HashMap::new()))
}

/// Adds `grad` to the side gradient of `var` (see [`param_grad`]).
pub fn accumulate_side_grad(var: &candle_core::Var, grad: &Tensor) -> Result<()> {
    let mut side = side_grads()
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned side gradients".into()))?;
    let id = var.as_tensor().id();
    let sum = match side.remove(&id) {
        Some(prev) => (prev + grad)?,
        None => grad.clone(),
    };
    side.insert(id, sum);
    Ok(())
}

/// The full gradient of a trainable tensor after `loss.backward()`: what the graph delivered plus
/// what custom ops handed over on the side. Taking it clears the side entry.
pub fn param_grad(
    store: &candle_core::backprop::GradStore,
    var: &candle_core::Var,
) -> Result<Option<Tensor>> {
    let side = side_grads()
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned side gradients".into()))?
        .remove(&var.as_tensor().id());
    Ok(match (store.get(var.as_tensor()), side) {
        (Some(g), Some(s)) => Some((g + s)?),
        (Some(g), None) => Some(g.clone()),
        (None, s) => s,
    })
}
