//! The adapter-plugin API of `tune`.
//!
//! A plugin is a shared library (`crate-type = ["cdylib"]`) that depends on this crate, implements
//! [`Adapter`] for each adapter it provides and invokes [`export_plugin!`] once. `tune` loads it
//! (`tune run --plugin PATH`, a `plugins: [PATH]` config key, or the directories in
//! `TUNE_PLUGIN_PATH`) and registers its adapters next to the built-in ones, so a config selects
//! one with `model.adapter: <name>`. `docs/writing-an-adapter-plugin.md` walks through a whole
//! plugin; `plugins/ia3` is the worked example.
//!
//! # What a plugin adapter computes
//!
//! Every projection of the model is a frozen linear layer `y = x W^T`. A plugin adapter
//! transforms the features on one side of it, row by row; that side is its [`Site`]:
//!
//! - [`Site::Output`]: `y = g(x W^T)`, `g` sees `out_features` values per row;
//! - [`Site::Input`]: `y = g(x) W^T`, `g` sees `in_features` values per row.
//!
//! `tune` owns the frozen weight, the trainable parameters, the optimizer and the matmul (on the
//! GPU when there is one); the plugin computes `g` ([`Adapter::forward`]), its gradients
//! ([`Adapter::backward`]), the parameters' initial values ([`Adapter::init`]) and the merged
//! weight for export ([`Adapter::merge`]). This covers adapters that scale, shift or otherwise
//! re-map features (IA3, bias tuning, ...); low-rank side paths like LoRA are built in.
//!
//! # Why plain `f32` buffers and not tensors
//!
//! candle numbers every tensor from a process-global counter, and its gradient store is keyed by
//! that number. A plugin that linked its own copy of candle would have its own counter; a tensor
//! it created could carry the id of an unrelated host tensor, and gradients would be mixed up
//! without any error. So this crate has no dependencies at all, and the boundary is a C ABI over
//! `f32` slices: the host copies activations and parameters into buffers it owns, calls the
//! plugin, and records the result in its own autograd graph as one custom op whose backward is
//! the plugin's `backward`. No Rust type, allocation or tensor ever crosses it, so the plugin may
//! be built with a different compiler version than `tune`.
//!
//! # What the boundary guarantees
//!
//! - Before reading anything else, the host compares the plugin's [`Fingerprint`] (API version,
//!   pointer width, endianness, panic strategy, the size of every boundary struct) with its own
//!   and refuses a mismatch with a message naming both values.
//! - [`export_plugin!`] wraps every call in `catch_unwind`: a panic in the plugin becomes an error
//!   code and message, never an unwind across the FFI boundary.
//! - The glue checks every buffer length against the layer's shape before your code runs, so
//!   your functions may index freely.

mod abi;
#[doc(hidden)]
pub mod export;

pub use abi::*;

/// The side of the frozen linear layer an adapter transforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// `y = g(x) W^T`.
    Input,
    /// `y = g(x W^T)`.
    Output,
}

impl Site {
    pub fn to_raw(self) -> u32 {
        match self {
            Site::Input => SITE_INPUT,
            Site::Output => SITE_OUTPUT,
        }
    }

    pub fn from_raw(raw: u32) -> Option<Site> {
        match raw {
            SITE_INPUT => Some(Site::Input),
            SITE_OUTPUT => Some(Site::Output),
            _ => None,
        }
    }
}

/// How the adapter is written in Hugging Face PEFT's format (`adapter/adapter_config.json`).
#[derive(Debug, Clone, Copy)]
pub struct Peft {
    /// A JSON object with the config's fixed fields, e.g. `{"peft_type": "IA3", ...}`. `tune`
    /// adds `target_modules` (HF names of the adapted projections) and `base_model_name_or_path`.
    pub config: &'static str,
    /// If not empty, `tune` also lists the adapted projections whose *input* is transformed under
    /// this key (IA3: `feedforward_modules`).
    pub input_modules_key: &'static str,
}

/// One adapted projection, as your functions see it.
#[derive(Debug)]
pub struct Layer<'a> {
    pub site: Site,
    /// Values per row of the transformed side: `in_features` at an input site, `out_features` at
    /// an output site.
    pub features: usize,
    /// Rows of activations in this call (every leading dimension flattened; 0 in `merge`).
    pub rows: usize,
    /// The parameters in the order of [`Adapter::PARAMS`], each row-major and of the declared
    /// shape (`features * width` values).
    pub params: Vec<&'a [f32]>,
}

/// An adapter a plugin provides. Everything is an associated item (no `self`): the plugin holds
/// no state, `tune` passes everything in, so calls may come from any thread.
///
/// Buffer lengths are checked before these functions run: `h`, `z`, `dz`, `dh` hold
/// `layer.rows * layer.features` values; `weight` holds `out_features * in_features`.
/// Returning `Err` (or panicking) fails the run with your message.
pub trait Adapter {
    /// Registry name: what `model.adapter` says. Must not clash with another adapter.
    const NAME: &'static str;
    /// One line for `tune ls --adapters`.
    const ABOUT: &'static str;
    /// The projections this adapter can adapt, by torchtune's names (`q_proj`, `k_proj`,
    /// `v_proj`, `output_proj`, `w1` (gate), `w2` (down), `w3` (up), `output`), each with its
    /// site. The config chooses among them (`lora_attn_modules`, `apply_lora_to_mlp`,
    /// `apply_lora_to_output`); a chosen projection that is not listed stays frozen.
    const TARGETS: &'static [Target];
    /// The trainable tensors of each adapted projection.
    const PARAMS: &'static [Param];
    const PEFT: Peft;

    /// Fills `out` with the initial value of `PARAMS[param]` for a projection with `features`
    /// values per row at `site`. `seed` differs per projection (for random initialisation).
    fn init(
        site: Site,
        features: usize,
        param: usize,
        seed: u64,
        out: &mut [f32],
    ) -> Result<(), String>;

    /// `z = g(h)`, row by row.
    fn forward(layer: &Layer, h: &[f32], z: &mut [f32]) -> Result<(), String>;

    /// Given `dz = dL/dz`, writes `dh = dL/dh` and `dparams[i] = dL/dPARAMS[i]` (summed over
    /// rows). All outputs are zeroed on entry.
    fn backward(
        layer: &Layer,
        h: &[f32],
        dz: &[f32],
        dh: &mut [f32],
        dparams: &mut [&mut [f32]],
    ) -> Result<(), String>;

    /// Folds the adapter into the base `weight` `[out_features, in_features]` (row-major), in
    /// place, so that `x weight'^T` equals the adapted layer. Used for merged checkpoints;
    /// return `Err` if `g` is not linear.
    fn merge(
        layer: &Layer,
        weight: &mut [f32],
        out_features: usize,
        in_features: usize,
    ) -> Result<(), String>;
}

/// Exports the C entry points for a plugin's adapters. Invoke it once, at the crate root:
///
/// ```ignore
/// tune_plugin_api::export_plugin!(name: "ia3", version: env!("CARGO_PKG_VERSION"), adapters: [Ia3]);
/// ```
///
/// It defines `tune_plugin_fingerprint` and `tune_plugin_descriptor`; every adapter function is
/// reached through glue that catches panics and checks buffer lengths.
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, version: $version:expr, adapters: [$($adapter:ty),+ $(,)?] $(,)?) => {
        /// This library's ABI fingerprint; `tune` checks it before calling anything else.
        #[no_mangle]
        pub extern "C" fn tune_plugin_fingerprint() -> $crate::Fingerprint {
            // Evaluated here, in the plugin's crate: its panic strategy is what matters.
            $crate::Fingerprint::of_this_build(cfg!(panic = "unwind"))
        }

        /// The plugin's name, version and adapters.
        #[no_mangle]
        pub extern "C" fn tune_plugin_descriptor() -> *const $crate::PluginDescriptor {
            static ADAPTERS: &[$crate::AdapterDescriptor] =
                &[$($crate::export::descriptor::<$adapter>()),+];
            static PLUGIN: $crate::PluginDescriptor = $crate::PluginDescriptor::new($name, $version, ADAPTERS);
            &PLUGIN
        }
    };
}
