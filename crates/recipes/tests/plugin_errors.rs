//! Bad plugins are clear errors, never crashes. The test builds a handful of deliberately broken
//! cdylibs against `crates/plugin-api` (a throw-away cargo workspace under target/tmp; the API
//! has no dependencies, so this needs no network) and loads each one:
//!
//! - `bad_skew`: a fingerprint from a future API version; its descriptor entry point aborts the
//!   process if called, so passing proves the fingerprint is checked before anything else;
//! - `bad_noentry`: a shared library without the plugin entry points;
//! - `bad_dup`: an adapter named `lora`, which is built in;
//! - `bad_target`: an adapter targeting `down_proj` (an HF name; tune speaks torchtune's `w2`);
//! - `bad_boom`: an adapter whose forward panics: the panic stays inside the plugin and the
//!   forward returns an error carrying its message.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use tune_core::AdapterSpec;

const SKEW: &str = r#"
use tune_plugin_api::{Fingerprint, API_VERSION};

/// What a plugin built against the next API version would say.
#[no_mangle]
pub extern "C" fn tune_plugin_fingerprint() -> Fingerprint {
    Fingerprint { api_version: API_VERSION + 1, ..Fingerprint::of_this_build(true) }
}

/// The host must never get here: it stops at the fingerprint.
#[no_mangle]
pub extern "C" fn tune_plugin_descriptor() -> *const u8 {
    std::process::abort()
}
"#;

const NOENTRY: &str = r#"
#[no_mangle]
pub extern "C" fn something_else() -> i32 {
    7
}
"#;

/// A complete adapter with the given name, target and forward body.
fn adapter_source(name: &str, target: &str, forward_body: &str) -> String {
    format!(
        r#"
use tune_plugin_api::*;

pub struct Bad;

impl Adapter for Bad {{
    const NAME: &'static str = "{name}";
    const ABOUT: &'static str = "deliberately broken (test)";
    const TARGETS: &'static [Target] = &[Target::output("{target}")];
    const PARAMS: &'static [Param] = &[Param::new("scale", 1)];
    const PEFT: Peft = Peft {{ config: "{{}}", input_modules_key: "" }};
    fn init(_: Site, _: usize, _: usize, _: u64, out: &mut [f32]) -> Result<(), String> {{
        out.fill(1.0);
        Ok(())
    }}
    fn forward(_: &Layer, h: &[f32], z: &mut [f32]) -> Result<(), String> {{
        {forward_body}
    }}
    fn backward(_: &Layer, _: &[f32], _: &[f32], _: &mut [f32], _: &mut [&mut [f32]]) -> Result<(), String> {{
        Ok(())
    }}
    fn merge(_: &Layer, _: &mut [f32], _: usize, _: usize) -> Result<(), String> {{
        Ok(())
    }}
}}

export_plugin!(name: "{name}-plugin", version: "0.0.0", adapters: [Bad]);
"#
    )
}

/// Builds the bad plugins once per test process; returns the directory holding the libraries.
fn bad_plugins() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bad-plugins");
        let api = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api").canonicalize().unwrap();
        let copy = "z.copy_from_slice(h);\n        Ok(())";
        let crates = [
            ("bad_skew", SKEW.to_string()),
            ("bad_noentry", NOENTRY.to_string()),
            ("bad_dup", adapter_source("lora", "q_proj", copy)),
            ("bad_target", adapter_source("bad_target", "down_proj", copy)),
            ("bad_boom", adapter_source("boom_test", "q_proj", "let _ = (h, z);\n        panic!(\"the plugin's forward panicked on purpose\")")),
        ];
        let members: Vec<String> = crates.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        write(&root.join("Cargo.toml"), &format!("[workspace]\nresolver = \"2\"\nmembers = [{}]\n", members.join(", ")));
        for (name, source) in &crates {
            let manifest = format!(
                "[package]\nname = \"{name}\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
                 [lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\ntune-plugin-api = {{ path = {:?} }}\n",
                api.display().to_string()
            );
            write(&root.join(name).join("Cargo.toml"), &manifest);
            write(&root.join(name).join("src/lib.rs"), source);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--offline", "--quiet", "--manifest-path"])
            .arg(root.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(root.join("target"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the bad plugins failed");
        root.join("target/debug")
    })
}

/// Writes `text` to `path` unless it already holds it (keeps cargo's incremental build valid).
fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).unwrap();
    }
}

fn library(stem: &str) -> PathBuf {
    bad_plugins().join(tune_adapters::plugin::library_file_name(stem))
}

fn load_error(stem: &str) -> String {
    tune_recipes::link();
    let err = tune_adapters::plugin::load(&library(stem)).expect_err("a bad plugin must not load");
    format!("{err:#}")
}

#[test]
fn a_fingerprint_mismatch_names_both_sides_and_nothing_else_is_called() {
    let why = load_error("bad_skew");
    let (plugin, host) = (
        tune_adapters::plugin::api::API_VERSION + 1,
        tune_adapters::plugin::api::API_VERSION,
    );
    assert!(
        why.contains(&format!("api_version: plugin {plugin}, tune {host}")),
        "{why}"
    );
    assert!(
        why.contains("rebuild it against the tune-plugin-api of this tune"),
        "{why}"
    );
    assert!(
        why.contains("libbad_skew"),
        "the message names the library: {why}"
    );
}

#[test]
fn a_library_without_the_entry_point_is_refused() {
    let why = load_error("bad_noentry");
    assert!(
        why.contains("is not a tune adapter plugin") && why.contains("tune_plugin_fingerprint"),
        "{why}"
    );
}

#[test]
fn a_missing_file_is_refused() {
    let why = load_error("bad_never_built");
    assert!(why.ends_with("not found"), "{why}");
}

#[test]
fn an_adapter_name_that_is_taken_is_refused_and_registers_nothing() {
    let why = load_error("bad_dup");
    assert!(
        why.contains("registers adapter `lora`, but that name is already registered (by built-in)"),
        "{why}"
    );
    assert_eq!(
        tune_core::registry::lookup("lora").unwrap().origin,
        "built-in"
    );
}

#[test]
fn an_unknown_target_module_is_refused() {
    let why = load_error("bad_target");
    assert!(
        why.contains("unknown target module `down_proj`") && why.contains("\"w2\""),
        "{why}"
    );
    assert!(
        tune_core::registry::lookup("bad_target").is_err(),
        "nothing was registered"
    );
}

#[test]
fn a_panic_in_the_plugin_becomes_an_error() {
    tune_recipes::link();
    tune_adapters::plugin::load(&library("bad_boom")).unwrap();
    let factory = tune_adapters::factory("boom_test").unwrap();
    let spec = AdapterSpec {
        kind: "boom_test".into(),
        rank: 1,
        alpha: 1.0,
        dropout: 0.0,
    };
    let weight = Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap();
    let layer = factory
        .build_for("layers.0.attn.q_proj", &spec, weight, 0)
        .unwrap();
    let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
    for _ in 0..2 {
        // Twice: the plugin is still usable (and the process alive) after a caught panic.
        let why = layer
            .forward(&x, true)
            .expect_err("the plugin panicked")
            .to_string();
        assert!(why.contains("plugin adapter `boom_test`"), "{why}");
        assert!(
            why.contains("panicked in forward: the plugin's forward panicked on purpose"),
            "{why}"
        );
    }
    // Projections the adapter does not target stay plain frozen layers.
    let frozen = factory
        .build_for(
            "layers.0.mlp.w1",
            &spec,
            Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap(),
            0,
        )
        .unwrap();
    assert!(frozen.trainable().is_empty());
}
