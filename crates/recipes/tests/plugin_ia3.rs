//! The example plugin `plugins/ia3`, built the way a third party builds it (`.ci/run` does
//! `cargo build --release --manifest-path plugins/ia3/Cargo.toml` first), loaded into this
//! process: it registers `ia3`, its gradients equal an independent IA3 written here with plain
//! candle ops, a stories260K run trains with it, and the export is PEFT's IA3 format.
//!
//! Without the built library each test prints how to build it and passes, so that a plain
//! `cargo test` works.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use candle_core::{DType, Device, Tensor, Var};
use tune_core::recipe::RunOptions;
use tune_core::registry::{self, Component};
use tune_core::{Adapter, AdapterFactory, AdapterSpec, ComponentKind, FrozenLinear};
use tune_models::builders::model_spec_from_node;
use tune_models::checkpoint::load_model;
use tune_models::convert::permute_tune_to_hf;
use tune_recipes::checkpointer::HfCheckpointer;
use tune_recipes::lora_finetune_single_device::train;
use tune_recipes::selfcheck::max_abs_diff;

/// The built example plugin, or `None` (with a message saying how to build it).
fn ia3_library() -> Option<PathBuf> {
    let path = common::root()
        .join("plugins/ia3/target/release")
        .join(tune_adapters::plugin::library_file_name("tune_ia3"));
    if path.is_file() {
        return Some(path);
    }
    eprintln!(
        "skipping: {} is not built; run `cargo build --release --manifest-path plugins/ia3/Cargo.toml` (CI does)",
        path.display()
    );
    None
}

/// Loads the plugin (once per process; later loads return the first load's result).
fn load_ia3() -> Option<PathBuf> {
    let path = ia3_library()?;
    tune_recipes::link();
    tune_adapters::plugin::load(&path).expect("the example plugin loads");
    Some(path)
}

const IA3_OVERRIDES: [&str; 3] = [
    "model.adapter=ia3",
    "model.lora_attn_modules=[k_proj,v_proj]",
    "model.apply_lora_to_mlp=True",
];

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn the_plugin_registers_ia3_with_its_origin() {
    let Some(path) = load_ia3() else { return };
    let again = tune_adapters::plugin::load(&path).unwrap();
    assert_eq!(again.name, "tune-ia3");
    assert_eq!(again.adapters, ["ia3"]);
    // The same library under another name (a hard link, as cargo's deps/ copy) is the same
    // plugin, not a second one whose adapter name clashes.
    let dir = tempfile::tempdir().unwrap();
    let linked = dir.path().join(path.file_name().unwrap());
    if std::fs::hard_link(&path, &linked).is_ok() {
        let via_link = tune_adapters::plugin::load(&linked).unwrap();
        assert_eq!(via_link.adapters, ["ia3"]);
    }
    let component = registry::lookup("ia3").unwrap();
    assert_eq!(component.kind, ComponentKind::Adapter);
    assert_eq!(
        component.origin,
        format!("plugin {}", path.canonicalize().unwrap().display())
    );
    assert!(tune_adapters::plugin::loaded_plugins()
        .iter()
        .any(|p| p.adapters == ["ia3"]));
}

// ---- An independent IA3: PEFT's formulas in plain candle ops, differentiated by candle ---------

/// `(x W^T) * l` (output site) or `(x * l) W^T` (input site).
struct ReferenceIa3 {
    weight: Tensor,
    l: Var,
    scales_input: bool,
}

impl Adapter for ReferenceIa3 {
    fn forward(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let l = self.l.as_tensor().flatten_all()?;
        let wt = self.weight.t()?;
        if self.scales_input {
            x.broadcast_mul(&l)?.broadcast_matmul(&wt)
        } else {
            x.broadcast_matmul(&wt)?.broadcast_mul(&l)
        }
    }
    fn forward_base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.weight.t()?)
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![("ia3_l".into(), self.l.clone())]
    }
    fn merged_weight(&self) -> candle_core::Result<Tensor> {
        self.weight.broadcast_mul(self.l.as_tensor())
    }
    fn base_weight(&self) -> candle_core::Result<Tensor> {
        Ok(self.weight.clone())
    }
}

/// PEFT's default IA3 targets for Llama: k_proj and v_proj outputs, down_proj (w2) input.
struct ReferenceIa3Factory;

impl AdapterFactory for ReferenceIa3Factory {
    fn param_shapes(&self, _: &AdapterSpec, _: usize, _: usize) -> Vec<(String, Vec<usize>)> {
        Vec::new()
    }
    fn build(&self, _: &AdapterSpec, w: Tensor, _: u64) -> candle_core::Result<Box<dyn Adapter>> {
        Ok(Box::new(FrozenLinear { weight: w }))
    }
    fn build_for(
        &self,
        slot: &str,
        _: &AdapterSpec,
        weight: Tensor,
        _: u64,
    ) -> candle_core::Result<Box<dyn Adapter>> {
        let (out_dim, in_dim) = weight.dims2()?;
        let (scales_input, shape) = if slot.ends_with("mlp.w2") {
            (true, (1, in_dim))
        } else if slot.ends_with("attn.k_proj") || slot.ends_with("attn.v_proj") {
            (false, (out_dim, 1))
        } else {
            return Ok(Box::new(FrozenLinear { weight }));
        };
        let l = Var::from_tensor(&Tensor::ones(shape, weight.dtype(), weight.device())?)?;
        Ok(Box::new(ReferenceIa3 {
            weight,
            l,
            scales_input,
        }))
    }
}

fn register_reference() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        registry::register_dynamic(Component {
            path: "ia3_reference_for_tests",
            aliases: &[],
            kind: ComponentKind::Adapter,
            args: &[],
            extra_args: false,
            about: "IA3 in plain candle ops (test reference)",
            origin: "test",
            build: |_| {
                Ok(Box::new(
                    Arc::new(ReferenceIa3Factory) as Arc<dyn AdapterFactory>
                ))
            },
        })
        .unwrap();
    });
}

/// stories260K with `adapter`, every IA3 vector set from `values`, and its loss on fixed tokens
/// with the gradient of every IA3 vector.
fn loss_and_grads(
    adapter: &str,
    values: &HashMap<String, Tensor>,
) -> (f32, HashMap<String, Tensor>) {
    let work = tempfile::tempdir().unwrap();
    let mut overrides = IA3_OVERRIDES.to_vec();
    let chosen = format!("model.adapter={adapter}");
    overrides[0] = &chosen;
    let config = common::stories_config(work.path(), &overrides);
    let spec = model_spec_from_node(config.get("model").unwrap()).unwrap();
    let assets = common::root().join("assets/stories260K");
    let (model, _) = load_model(
        &spec,
        &assets,
        &["model.safetensors".to_string()],
        DType::F32,
        &Device::Cpu,
        0,
    )
    .unwrap();
    let params = model.adapter_params();
    assert_eq!(
        params.len(),
        values.len(),
        "{adapter}: {:?}",
        params.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    for (name, var) in &params {
        var.set(&values[name]).unwrap();
    }
    let tokens: Vec<u32> = (0..2 * 24).map(|i| (i * 37 + 11) % 512).collect();
    let tokens = Tensor::from_vec(tokens, (2, 24), &Device::Cpu).unwrap();
    let logits = model.forward(&tokens, true).unwrap();
    let inputs = logits.narrow(1, 0, 23).unwrap().reshape((46, 512)).unwrap();
    let labels = tokens
        .narrow(1, 1, 23)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap();
    let (loss, _) = tune_core::autograd::cross_entropy_sum(&inputs, &labels, -100).unwrap();
    let store = loss.backward().unwrap();
    let grads = params
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                store.get(v.as_tensor()).expect("a gradient").clone(),
            )
        })
        .collect();
    (loss.to_scalar().unwrap(), grads)
}

#[test]
fn ia3_gradients_equal_an_independent_implementation() {
    if load_ia3().is_none() {
        return;
    }
    register_reference();
    // Vectors away from their initial ones, so that every path of the backward matters.
    let mut values = HashMap::new();
    for i in 0..5 {
        for (name, shape) in [
            ("attn.k_proj", (32, 1)),
            ("attn.v_proj", (32, 1)),
            ("mlp.w2", (1, 172)),
        ] {
            let n = shape.0 * shape.1;
            let v: Vec<f32> = (0..n)
                .map(|j| 1.0 + 0.5 * ((i * 131 + j * 17) as f32 * 0.73).sin())
                .collect();
            values.insert(
                format!("layers.{i}.{name}.ia3_l"),
                Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
            );
        }
    }
    let (loss, grads) = loss_and_grads("ia3", &values);
    let (ref_loss, ref_grads) = loss_and_grads("ia3_reference_for_tests", &values);
    assert!(
        (loss - ref_loss).abs() < 1e-4 * ref_loss.abs(),
        "loss {loss} vs reference {ref_loss}"
    );
    assert_eq!(grads.len(), 15, "k, v and w2 of 5 layers");
    for (name, want) in &ref_grads {
        let got = &grads[name];
        assert_eq!(got.dims(), want.dims(), "{name}");
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(
            scale > 1e-4,
            "{name}: the reference gradient is ~0, the comparison would be empty"
        );
        let diff = max_abs_diff(got, want).unwrap();
        assert!(
            diff <= 1e-4 * scale,
            "{name}: gradient differs by {diff} (scale {scale})"
        );
    }
}

#[test]
fn stories260k_ia3_trains_and_exports_peft_ia3() {
    if load_ia3().is_none() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut overrides = IA3_OVERRIDES.to_vec();
    overrides.extend([
        "max_steps_per_epoch=20",
        "tokenizer.max_seq_len=128",
        "optimizer.lr=3e-2",
    ]);
    let config = common::stories_config(work.path(), &overrides);
    let spec = model_spec_from_node(config.get("model").unwrap()).unwrap();
    assert_eq!(
        spec.counts().unwrap().trainable,
        5 * (32 + 32 + 172),
        "IA3 trains k, v and w2 vectors only"
    );

    let summary = train(config, &RunOptions::default()).unwrap();
    let losses: Vec<f64> = summary.steps.iter().map(|s| s.loss).collect();
    eprintln!("IA3 losses: {losses:?}");
    assert_eq!(losses.len(), 20);
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!(
        mean(&losses[15..]) < mean(&losses[..5]) - 0.5,
        "IA3 loss did not decrease: {losses:?}"
    );

    let epoch = work.path().join("output/epoch_0");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(epoch.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "IA3");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["k_proj", "v_proj", "down_proj"])
    );
    assert_eq!(
        config["feedforward_modules"],
        serde_json::json!(["down_proj"])
    );
    assert!(config.get("r").is_none(), "no LoRA fields in an IA3 config");

    let peft = load(&epoch.join("adapter/adapter_model.safetensors"));
    assert_eq!(peft.len(), 15);
    let tune = load(&epoch.join("recipe_state/adapter_torchtune.safetensors"));
    let base = load(&common::root().join("assets/stories260K/model.safetensors"));
    let merged = load(&epoch.join("model-00001-of-00001.safetensors"));
    for i in 0..5 {
        let key = |m: &str| format!("base_model.model.model.layers.{i}.{m}.ia3_l");
        let (k, v, down) = (
            &peft[&key("self_attn.k_proj")],
            &peft[&key("self_attn.v_proj")],
            &peft[&key("mlp.down_proj")],
        );
        assert_eq!(
            (k.dims(), v.dims(), down.dims()),
            (&[32, 1][..], &[32, 1][..], &[1, 172][..])
        );
        // k's rows are output features in RoPE layout: saved in HF's order (4 kv heads).
        let k_tune = &tune[&format!("layers.{i}.attn.k_proj.ia3_l")];
        assert_eq!(
            max_abs_diff(k, &permute_tune_to_hf(k_tune, 4).unwrap()).unwrap(),
            0.0
        );
        assert!(
            max_abs_diff(
                k_tune,
                &Tensor::ones((32, 1), DType::F32, &Device::Cpu).unwrap()
            )
            .unwrap()
                > 1e-3,
            "k did not train"
        );
        // PEFT's merge on HF's weights (weight * ia3_l, broadcast) gives our merged checkpoint.
        for (module, l) in [
            ("self_attn.k_proj", k),
            ("self_attn.v_proj", v),
            ("mlp.down_proj", down),
        ] {
            let name = format!("model.layers.{i}.{module}.weight");
            let peft_merged = base[&name].broadcast_mul(l).unwrap();
            let d = max_abs_diff(&merged[&name], &peft_merged).unwrap();
            assert!(
                d < 1e-6,
                "{name}: merged weight differs from PEFT's merge by {d}"
            );
        }
        // w1/w3 stay frozen (not IA3 targets), so they are written unchanged.
        let up = format!("model.layers.{i}.mlp.up_proj.weight");
        assert_eq!(max_abs_diff(&merged[&up], &base[&up]).unwrap(), 0.0);
    }

    // Reading the PEFT export back (a warm start) undoes the permutation exactly.
    let spec = model_spec_from_node(
        common::stories_config(work.path(), &IA3_OVERRIDES)
            .get("model")
            .unwrap(),
    )
    .unwrap();
    let back =
        HfCheckpointer::read_adapter(&epoch.join("adapter/adapter_model.safetensors"), &spec)
            .unwrap();
    assert_eq!(back.len(), tune.len());
    for (name, t) in &tune {
        assert_eq!(max_abs_diff(&back[name], t).unwrap(), 0.0, "{name}");
    }
}

#[test]
fn resumed_ia3_run_equals_uninterrupted() {
    if load_ia3().is_none() {
        return;
    }
    // Constant lr so that a 1-epoch run extended to 2 epochs sees the same schedule.
    let overrides = |epochs: usize| -> Vec<String> {
        let mut v: Vec<String> = IA3_OVERRIDES.iter().map(|s| s.to_string()).collect();
        v.extend([
            "~lr_scheduler".into(),
            format!("epochs={epochs}"),
            "max_steps_per_epoch=3".into(),
            "batch_size=2".into(),
        ]);
        v.extend([
            "seed=7".into(),
            "save_adapter_weights_only=True".into(),
            "tokenizer.max_seq_len=64".into(),
            "optimizer.lr=3e-2".into(),
        ]);
        v
    };
    let run = |dir: &Path, overrides: Vec<String>| {
        let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
        train(common::stories_config(dir, &refs), &RunOptions::default()).unwrap()
    };
    let straight = tempfile::tempdir().unwrap();
    run(straight.path(), overrides(2));
    let split = tempfile::tempdir().unwrap();
    run(split.path(), overrides(1));
    let mut resume = overrides(2);
    resume.push("resume_from_checkpoint=True".into());
    assert_eq!(
        run(split.path(), resume).steps.len(),
        3,
        "the resumed run trains the second epoch only"
    );

    let state = "output/epoch_1/recipe_state/adapter_torchtune.safetensors";
    let (want, got) = (
        load(&straight.path().join(state)),
        load(&split.path().join(state)),
    );
    assert_eq!(want.len(), 15);
    for (name, t) in &want {
        let d = max_abs_diff(t, &got[name]).unwrap();
        assert!(d <= 1e-6, "{name} differs by {d} after resuming");
    }
}
