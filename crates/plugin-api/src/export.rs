//! What [`export_plugin!`](crate::export_plugin) expands to: an [`AdapterDescriptor`] whose
//! entry points wrap an [`Adapter`]'s functions. Each entry point
//!
//! 1. catches panics, so none unwinds into the host (which would be undefined behaviour, and
//!    since Rust 1.81 an abort): a panic becomes [`STATUS_PANIC`] plus its message;
//! 2. checks every buffer length against the layer's shape before the adapter's code runs;
//! 3. turns an `Err(message)` into [`STATUS_ERROR`] plus the message.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::{
    Adapter, AdapterDescriptor, ErrorBuf, F32s, F32sMut, Layer, LayerAbi, Site, Str, STATUS_ERROR,
    STATUS_OK, STATUS_PANIC,
};

/// The descriptor of adapter `A`.
pub const fn descriptor<A: Adapter>() -> AdapterDescriptor {
    AdapterDescriptor {
        name: Str::new(A::NAME),
        about: Str::new(A::ABOUT),
        targets: A::TARGETS.as_ptr(),
        num_targets: A::TARGETS.len(),
        params: A::PARAMS.as_ptr(),
        num_params: A::PARAMS.len(),
        peft_config: Str::new(A::PEFT.config),
        peft_input_modules_key: Str::new(A::PEFT.input_modules_key),
        init: Some(init::<A>),
        forward: Some(forward::<A>),
        backward: Some(backward::<A>),
        merge: Some(merge::<A>),
    }
}

/// Runs `call`; a panic or an `Err` becomes a status code with its message in `err`.
fn guarded(err: *mut ErrorBuf, call: impl FnOnce() -> Result<(), String>) -> i32 {
    let (status, message) = match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(())) => return STATUS_OK,
        Ok(Err(message)) => (STATUS_ERROR, message),
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            // A payload whose destructor panics must not escape either.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            (STATUS_PANIC, message)
        }
    };
    // SAFETY: the host passes a buffer of `cap` writable bytes (or null, and gets no message).
    if let Some(err) = unsafe { err.as_mut() } {
        unsafe { err.write(&message) };
    }
    status
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

fn site(raw: u32) -> Result<Site, String> {
    Site::from_raw(raw).ok_or_else(|| format!("unknown site {raw}"))
}

fn check_len(what: &str, got: usize, want: usize) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what} has {got} values, expected {want}"))
    }
}

fn param_name<A: Adapter>(i: usize) -> &'static str {
    // SAFETY: PARAMS are built from `&'static str`s by `Param::new`.
    unsafe { A::PARAMS[i].name.to_str() }.unwrap_or("?")
}

/// The layer behind `raw`, with every parameter's length checked.
///
/// # Safety
/// `raw` and the buffers it points to must be valid for `'a` (the host guarantees it).
unsafe fn layer<'a, A: Adapter>(raw: *const LayerAbi) -> Result<Layer<'a>, String> {
    let raw = unsafe { raw.as_ref() }.ok_or("null layer")?;
    let site = site(raw.site)?;
    check_len("the parameter list", raw.num_params, A::PARAMS.len())?;
    let views: &[F32s] = if raw.num_params == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(raw.params, raw.num_params) }
    };
    let mut params = Vec::with_capacity(views.len());
    for (i, (view, p)) in views.iter().zip(A::PARAMS).enumerate() {
        check_len(
            &format!("parameter `{}`", param_name::<A>(i)),
            view.len,
            raw.features * p.width,
        )?;
        params.push(unsafe { view.as_slice() });
    }
    Ok(Layer {
        site,
        features: raw.features,
        rows: raw.rows,
        params,
    })
}

/// # Safety
/// Called by the host with buffers of the lengths it states.
pub unsafe extern "C" fn init<A: Adapter>(
    site_raw: u32,
    features: usize,
    param: usize,
    seed: u64,
    out: F32sMut,
    err: *mut ErrorBuf,
) -> i32 {
    guarded(err, || {
        let site = site(site_raw)?;
        let p = A::PARAMS
            .get(param)
            .ok_or_else(|| format!("no parameter number {param}"))?;
        check_len(
            &format!("the buffer for `{}`", param_name::<A>(param)),
            out.len,
            features * p.width,
        )?;
        A::init(site, features, param, seed, unsafe { out.as_mut_slice() })
    })
}

/// # Safety
/// Called by the host with buffers of the lengths it states.
pub unsafe extern "C" fn forward<A: Adapter>(
    raw: *const LayerAbi,
    h: F32s,
    z: F32sMut,
    err: *mut ErrorBuf,
) -> i32 {
    guarded(err, || {
        let layer = unsafe { layer::<A>(raw) }?;
        let n = layer.rows * layer.features;
        check_len("h", h.len, n)?;
        check_len("z", z.len, n)?;
        A::forward(&layer, unsafe { h.as_slice() }, unsafe { z.as_mut_slice() })
    })
}

/// # Safety
/// Called by the host with buffers of the lengths it states.
pub unsafe extern "C" fn backward<A: Adapter>(
    raw: *const LayerAbi,
    h: F32s,
    dz: F32s,
    dh: F32sMut,
    dparams: *const F32sMut,
    err: *mut ErrorBuf,
) -> i32 {
    guarded(err, || {
        let layer = unsafe { layer::<A>(raw) }?;
        let n = layer.rows * layer.features;
        check_len("h", h.len, n)?;
        check_len("dz", dz.len, n)?;
        check_len("dh", dh.len, n)?;
        let views: &[F32sMut] = if A::PARAMS.is_empty() {
            &[]
        } else {
            unsafe { std::slice::from_raw_parts(dparams, A::PARAMS.len()) }
        };
        let mut grads = Vec::with_capacity(views.len());
        for (i, (view, p)) in views.iter().zip(A::PARAMS).enumerate() {
            check_len(
                &format!("the gradient of `{}`", param_name::<A>(i)),
                view.len,
                layer.features * p.width,
            )?;
            grads.push(unsafe { view.as_mut_slice() });
        }
        A::backward(
            &layer,
            unsafe { h.as_slice() },
            unsafe { dz.as_slice() },
            unsafe { dh.as_mut_slice() },
            &mut grads,
        )
    })
}

/// # Safety
/// Called by the host with buffers of the lengths it states.
pub unsafe extern "C" fn merge<A: Adapter>(
    raw: *const LayerAbi,
    weight: F32sMut,
    out_features: usize,
    in_features: usize,
    err: *mut ErrorBuf,
) -> i32 {
    guarded(err, || {
        let layer = unsafe { layer::<A>(raw) }?;
        let features = match layer.site {
            Site::Input => in_features,
            Site::Output => out_features,
        };
        check_len("the layer's features", layer.features, features)?;
        check_len("weight", weight.len, out_features * in_features)?;
        A::merge(
            &layer,
            unsafe { weight.as_mut_slice() },
            out_features,
            in_features,
        )
    })
}
