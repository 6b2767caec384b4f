//! The export glue, called through the descriptor exactly as the host calls it: panics become
//! `STATUS_PANIC` with their message, bad lengths become `STATUS_ERROR` before adapter code runs.

use tune_plugin_api::*;

/// Multiplies every feature by a per-feature scale.
struct Scale;

impl Adapter for Scale {
    const NAME: &'static str = "scale";
    const ABOUT: &'static str = "test adapter";
    const TARGETS: &'static [Target] = &[Target::output("k_proj"), Target::input("w2")];
    const PARAMS: &'static [Param] = &[Param::new("s", 1)];
    const PEFT: Peft = Peft {
        config: "{}",
        input_modules_key: "",
    };

    fn init(_: Site, _: usize, _: usize, _: u64, out: &mut [f32]) -> Result<(), String> {
        out.fill(1.0);
        Ok(())
    }
    fn forward(layer: &Layer, h: &[f32], z: &mut [f32]) -> Result<(), String> {
        for (i, (z, h)) in z.iter_mut().zip(h).enumerate() {
            *z = h * layer.params[0][i % layer.features];
        }
        Ok(())
    }
    fn backward(
        _: &Layer,
        _: &[f32],
        _: &[f32],
        _: &mut [f32],
        _: &mut [&mut [f32]],
    ) -> Result<(), String> {
        Err("backward is not needed here".into())
    }
    fn merge(_: &Layer, _: &mut [f32], _: usize, _: usize) -> Result<(), String> {
        Ok(())
    }
}

/// Panics in forward.
struct Boom;

impl Adapter for Boom {
    const NAME: &'static str = "boom";
    const ABOUT: &'static str = "panics";
    const TARGETS: &'static [Target] = &[Target::output("q_proj")];
    const PARAMS: &'static [Param] = &[Param::new("x", 1)];
    const PEFT: Peft = Peft {
        config: "{}",
        input_modules_key: "",
    };

    fn init(_: Site, _: usize, _: usize, _: u64, _: &mut [f32]) -> Result<(), String> {
        Ok(())
    }
    fn forward(_: &Layer, _: &[f32], _: &mut [f32]) -> Result<(), String> {
        panic!("boom at feature {}", 3)
    }
    fn backward(
        _: &Layer,
        _: &[f32],
        _: &[f32],
        _: &mut [f32],
        _: &mut [&mut [f32]],
    ) -> Result<(), String> {
        Ok(())
    }
    fn merge(_: &Layer, _: &mut [f32], _: usize, _: usize) -> Result<(), String> {
        Ok(())
    }
}

export_plugin!(name: "test-plugin", version: "0.0.1", adapters: [Scale, Boom]);

fn adapters() -> &'static [AdapterDescriptor] {
    let plugin = unsafe { &*tune_plugin_descriptor() };
    unsafe { std::slice::from_raw_parts(plugin.adapters, plugin.num_adapters) }
}

/// Calls `forward` of `adapter` on one layer; returns the status, the message and `z`.
fn call_forward(
    adapter: &AdapterDescriptor,
    features: usize,
    param: &[f32],
    h: &[f32],
    z_len: usize,
) -> (i32, String, Vec<f32>) {
    let views = [F32s::from_slice(param)];
    let layer = LayerAbi {
        site: SITE_OUTPUT,
        features,
        rows: h.len() / features,
        params: views.as_ptr(),
        num_params: 1,
    };
    let mut z = vec![0f32; z_len];
    let mut message = vec![0u8; 256];
    let mut err = ErrorBuf {
        ptr: message.as_mut_ptr(),
        cap: message.len(),
        len: 0,
    };
    let forward = adapter.forward.expect("forward");
    let status = unsafe {
        forward(
            &layer,
            F32s::from_slice(h),
            F32sMut::from_slice(&mut z),
            &mut err,
        )
    };
    let text = String::from_utf8(message[..err.len].to_vec()).unwrap();
    (status, text, z)
}

#[test]
fn fingerprint_and_descriptor_describe_this_build() {
    let fp = tune_plugin_fingerprint();
    assert_eq!(
        fp,
        Fingerprint::of_this_build(true),
        "tests build with panic = unwind"
    );
    assert_eq!(fp.magic, MAGIC);
    let plugin = unsafe { &*tune_plugin_descriptor() };
    assert_eq!(unsafe { plugin.name.to_str() }.unwrap(), "test-plugin");
    let names: Vec<&str> = adapters()
        .iter()
        .map(|a| unsafe { a.name.to_str() }.unwrap())
        .collect();
    assert_eq!(names, ["scale", "boom"]);
    let targets =
        unsafe { std::slice::from_raw_parts(adapters()[0].targets, adapters()[0].num_targets) };
    assert_eq!(targets[1].site, SITE_INPUT);
    assert_eq!(unsafe { targets[1].module.to_str() }.unwrap(), "w2");
}

#[test]
fn forward_runs_through_the_glue() {
    let (status, message, z) =
        call_forward(&adapters()[0], 2, &[2.0, 3.0], &[1.0, 1.0, 2.0, 2.0], 4);
    assert_eq!((status, message.as_str()), (STATUS_OK, ""));
    assert_eq!(z, [2.0, 3.0, 4.0, 6.0]);
}

#[test]
fn a_panic_becomes_an_error_code_and_message() {
    let (status, message, _) = call_forward(&adapters()[1], 1, &[1.0], &[1.0], 1);
    assert_eq!(status, STATUS_PANIC);
    assert_eq!(message, "boom at feature 3");
}

#[test]
fn wrong_lengths_are_refused_before_adapter_code_runs() {
    let (status, message, _) =
        call_forward(&adapters()[0], 2, &[2.0, 3.0], &[1.0, 1.0, 2.0, 2.0], 3);
    assert_eq!(status, STATUS_ERROR);
    assert_eq!(message, "z has 3 values, expected 4");
    let (status, message, _) = call_forward(&adapters()[0], 2, &[2.0], &[1.0, 1.0], 2);
    assert_eq!(status, STATUS_ERROR);
    assert_eq!(message, "parameter `s` has 1 values, expected 2");
}

#[test]
fn an_adapter_error_is_passed_on() {
    let adapter = &adapters()[0];
    let views = [F32s::from_slice(&[1.0])];
    let layer = LayerAbi {
        site: SITE_OUTPUT,
        features: 1,
        rows: 1,
        params: views.as_ptr(),
        num_params: 1,
    };
    let (mut dh, mut dp) = (vec![0f32; 1], vec![0f32; 1]);
    let grads = [F32sMut::from_slice(&mut dp)];
    let mut message = vec![0u8; 64];
    let mut err = ErrorBuf {
        ptr: message.as_mut_ptr(),
        cap: message.len(),
        len: 0,
    };
    let backward = adapter.backward.unwrap();
    let status = unsafe {
        backward(
            &layer,
            F32s::from_slice(&[1.0]),
            F32s::from_slice(&[1.0]),
            F32sMut::from_slice(&mut dh),
            grads.as_ptr(),
            &mut err,
        )
    };
    assert_eq!(status, STATUS_ERROR);
    assert_eq!(&message[..err.len], b"backward is not needed here");
}

#[test]
fn error_messages_are_cut_at_a_character_boundary() {
    let mut bytes = [0u8; 4];
    let mut err = ErrorBuf {
        ptr: bytes.as_mut_ptr(),
        cap: 4,
        len: 0,
    };
    unsafe { err.write("abcé") }; // 'é' is two bytes: only "abc" fits
    assert_eq!(&bytes[..err.len], b"abc");
}
