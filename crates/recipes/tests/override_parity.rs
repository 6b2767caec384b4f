//! Command-line overrides resolve to the config torchtune resolves: for each case of
//! `tests/fixtures/overrides/torchtune_overrides.json` (made with torchtune 0.6.1's own parser
//! and merge), the stories260K config with the same overrides, `${...}` resolved, is the same
//! tree of the same values.

mod common;

#[test]
fn overrides_resolve_as_in_torchtune() {
    tune_recipes::link();
    let path = common::root().join("tests/fixtures/overrides/torchtune_overrides.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let text =
        std::fs::read_to_string(common::root().join("configs/stories260K/lora_single_device.yaml"))
            .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 18);
    for case in cases {
        let overrides: Vec<String> = case["overrides"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_string())
            .collect();
        let mut config = tune_core::Config::from_yaml_str(&text).unwrap();
        config.apply_overrides(&overrides).unwrap();
        config.resolve_interpolations().unwrap();
        let ours: serde_json::Value = serde_json::to_value(&config.root).unwrap();
        assert_eq!(ours, case["config"], "{overrides:?}");
    }
}
