//! Parameter counts from shapes alone (no weights allocated), as torchtune prints them.

use tune_models::builders::model_spec_from_node;

fn counts(yaml: &str) -> (usize, usize, String) {
    let node: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let spec = model_spec_from_node(&node).unwrap();
    let c = spec.counts().unwrap();
    (c.total, c.trainable, c.summary())
}

#[test]
fn lora_llama2_7b_qv_rank8_matches_torchtune() {
    let (total, trainable, line) =
        counts("{_component_: torchtune.models.llama2.lora_llama2_7b, lora_attn_modules: [q_proj, v_proj]}");
    assert_eq!(total, 6_742_609_920);
    assert_eq!(trainable, 4_194_304);
    assert_eq!(
        line,
        "6742609920 total params, 4194304 trainable params, 0.06% of all params are trainable."
    );
}

#[test]
fn stories260k_matches_the_lora_step_fixture() {
    // tests/fixtures/lora_step/meta.json: total_params 297280, trainable_params 4480 (torchtune
    // counts the untied output layer separately).
    let (total, trainable, _) = counts(
        "{_component_: torchtune.models.llama2.lora_llama2, lora_attn_modules: [q_proj, v_proj], vocab_size: 512,
          num_layers: 5, num_heads: 8, num_kv_heads: 4, embed_dim: 64, max_seq_len: 512, intermediate_dim: 172,
          lora_rank: 4, lora_alpha: 8}",
    );
    assert_eq!((total, trainable), (297_280, 4_480));
}

#[test]
fn other_layer_choices_and_sizes() {
    // Base Llama2-7B/13B/70B sizes (HF counts with untied lm_head).
    let base = |name: &str| counts(&format!("{{_component_: torchtune.models.llama2.{name}}}")).0;
    assert_eq!(base("llama2_7b"), 6_738_415_616);
    assert_eq!(base("llama2_13b"), 13_015_864_320);
    assert_eq!(base("llama2_70b"), 68_976_648_192);
    // All attention projections + MLP + output, rank 8: every adapted [out, in] adds 8 * (in + out).
    let (_, trainable, _) = counts(
        "{_component_: lora_llama2_7b, lora_attn_modules: [q_proj, k_proj, v_proj, output_proj],
          apply_lora_to_mlp: true, apply_lora_to_output: true}",
    );
    let per_layer = 4 * 8 * (4096 + 4096) + 3 * 8 * (4096 + 11008);
    assert_eq!(trainable, 32 * per_layer + 8 * (4096 + 32000));
    // 70B's grouped-query k/v projections are [1024, 8192].
    let (_, trainable, _) =
        counts("{_component_: lora_llama2_70b, lora_attn_modules: [k_proj], lora_rank: 16}");
    assert_eq!(trainable, 80 * 16 * (8192 + 1024));
}

#[test]
fn empty_or_unknown_lora_modules_are_errors() {
    for bad in ["[]", "[q_proj, vproj]"] {
        let node: serde_yaml::Value = serde_yaml::from_str(&format!(
            "{{_component_: lora_llama2_7b, lora_attn_modules: {bad}}}"
        ))
        .unwrap();
        let err = model_spec_from_node(&node).unwrap_err().to_string();
        assert!(err.contains("lora_attn_modules"), "{err}");
    }
}

#[test]
fn builder_arguments_resolve_as_torchtunes() {
    let spec = |yaml: &str| model_spec_from_node(&serde_yaml::from_str(yaml).unwrap());
    // qlora_* builders quantize by default; an explicit False wins (torchtune's partial).
    let quantized = |yaml: &str| spec(yaml).unwrap().lora.unwrap().quantize_base;
    let qlora =
        "{_component_: torchtune.models.llama2.qlora_llama2_7b, lora_attn_modules: [q_proj]";
    assert!(quantized(&format!("{qlora}}}")));
    assert!(!quantized(&format!("{qlora}, quantize_base: False}}")));
    // null or 0 kv heads: one per head.
    for kv in ["null", "0"] {
        let s = spec(&format!(
            "{{_component_: torchtune.models.llama2.llama2, vocab_size: 512, num_layers: 2, num_heads: 8, \
             num_kv_heads: {kv}, embed_dim: 64, max_seq_len: 128}}"
        ))
        .unwrap();
        assert_eq!(s.transformer.num_kv_heads, 8);
    }
    // Two adapters asked for at once is an error, not a silent pick.
    let err = spec(
        "{_component_: torchtune.models.llama2.lora_llama2_7b, lora_attn_modules: [q_proj], use_dora: True, adapter: lora}",
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("use_dora=True"), "{err:#}");
}

/// As torchtune's `lora_llama2`, the explicit-dimension builder needs its rank and alpha (the
/// sized builders default them to 8 and 16); `llama2` takes torchtune's `rope_base`.
#[test]
fn lora_llama2_needs_rank_and_alpha() {
    let dims = "vocab_size: 512, num_layers: 1, num_heads: 8, num_kv_heads: 4, embed_dim: 64, max_seq_len: 64";
    let node = |yaml: String| serde_yaml::from_str::<serde_yaml::Value>(&yaml).unwrap();
    let err = model_spec_from_node(&node(format!(
        "{{_component_: lora_llama2, lora_attn_modules: [q_proj], {dims}}}"
    )))
    .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("lora_rank") && err.contains("lora_alpha"),
        "{err}"
    );
    model_spec_from_node(&node(format!(
        "{{_component_: lora_llama2, lora_attn_modules: [q_proj], {dims}, lora_rank: 4, lora_alpha: 8}}"
    )))
    .unwrap();
    let spec = model_spec_from_node(&node(format!(
        "{{_component_: llama2, {dims}, rope_base: 500000.0}}"
    )))
    .unwrap();
    assert_eq!(spec.transformer.rope_base, 500000.0);
}

/// `adapter: qlora` alone would quantise only the adapted projections: QLoRA is
/// `quantize_base: True` with the plain adapter.
#[test]
fn a_quantized_adapter_named_alone_is_refused() {
    let node: serde_yaml::Value = serde_yaml::from_str(
        "{_component_: lora_llama2_7b, lora_attn_modules: [q_proj, v_proj], adapter: qlora}",
    )
    .unwrap();
    let err = format!("{:#}", model_spec_from_node(&node).unwrap_err());
    assert!(
        err.contains("set model.quantize_base=True and adapter=\"lora\""),
        "{err}"
    );
    let node: serde_yaml::Value = serde_yaml::from_str(
        "{_component_: lora_llama2_7b, lora_attn_modules: [q_proj], quantize_base: True}",
    )
    .unwrap();
    assert!(
        model_spec_from_node(&node)
            .unwrap()
            .lora
            .unwrap()
            .quantize_base
    );
}
