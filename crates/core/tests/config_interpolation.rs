//! `${key}` interpolation (`Config::resolve_interpolations`).

use serde_yaml::Value;
use tune_core::Config;

fn resolve(text: &str) -> anyhow::Result<Config> {
    let mut config = Config::from_yaml_str(text)?;
    config.resolve_interpolations()?;
    Ok(config)
}

fn err(text: &str) -> String {
    match resolve(text) {
        Ok(c) => panic!("should fail, resolved to:\n{}", c.to_yaml_string()),
        Err(e) => format!("{e:#}"),
    }
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap()
}

#[test]
fn whole_and_embedded_references() {
    let c = resolve(
        "output_dir: /tmp/run\ncheckpointer:\n  output_dir: ${output_dir}\nmetric_logger:\n  log_dir: ${output_dir}/logs\n",
    )
    .unwrap();
    assert_eq!(c.get("checkpointer.output_dir"), Some(&yaml("/tmp/run")));
    assert_eq!(c.get("metric_logger.log_dir"), Some(&yaml("/tmp/run/logs")));
}

#[test]
fn the_builtin_config_resolves() {
    let mut c = Config::from_yaml_str(include_str!(
        "../../../configs/llama2/7B_lora_single_device.yaml"
    ))
    .unwrap();
    c.resolve_interpolations().unwrap();
    assert_eq!(
        c.get("checkpointer.output_dir"),
        Some(&yaml("/tmp/torchtune/llama2_7B/lora_single_device"))
    );
    assert!(!c.to_yaml_string().contains("${"));
}

#[test]
fn a_whole_reference_keeps_the_type() {
    let c = resolve("n: 8\nm: ${n}\nf: 3.0e-4\ng: ${f}\nb: True\nc: ${b}\nnode: {x: 1}\ncopy: ${node}\nz: null\nzz: ${z}").unwrap();
    assert_eq!(c.get("m"), Some(&yaml("8")));
    assert_eq!(c.get("g").and_then(Value::as_f64), Some(3e-4));
    assert_eq!(c.get("c"), Some(&Value::Bool(true)));
    assert_eq!(c.get("copy"), Some(&yaml("{x: 1}")));
    assert_eq!(c.get("zz"), Some(&Value::Null));
}

#[test]
fn embedded_scalars_print_like_python() {
    let c = resolve("n: 8\nb: False\nz: null\ns: n=${n} b=${b} z=${z}").unwrap();
    assert_eq!(c.get("s"), Some(&yaml("n=8 b=False z=None")));
}

#[test]
fn chains_and_nested_references() {
    let c = resolve("a: ${b}/x\nb: ${c}/y\nc: base\nwhich: lr\nopt: {lr: 0.1, wd: 0.0}\npicked: ${opt.${which}}").unwrap();
    assert_eq!(c.get("a"), Some(&yaml("base/y/x")));
    assert_eq!(c.get("picked").and_then(Value::as_f64), Some(0.1));
}

#[test]
fn references_into_lists_and_relative_references() {
    let c = resolve("files: [a.bin, b.bin]\nfirst: ${files.0}\nnode:\n  dir: /d\n  log: ${.dir}/log\n  up: ${..first}").unwrap();
    assert_eq!(c.get("first"), Some(&yaml("a.bin")));
    assert_eq!(c.get("node.log"), Some(&yaml("/d/log")));
    assert_eq!(c.get("node.up"), Some(&yaml("a.bin")));
}

#[test]
fn references_inside_lists() {
    let c = resolve("d: /x\nfiles: ['${d}/a', '${d}/b']").unwrap();
    assert_eq!(c.get("files"), Some(&yaml("[/x/a, /x/b]")));
}

#[test]
fn escapes_and_plain_dollars() {
    let c = resolve("a: 1\ns: '\\${a} costs $5 and ${a}'").unwrap();
    assert_eq!(c.get("s"), Some(&yaml("'${a} costs $5 and 1'")));
}

#[test]
fn environment_variables() {
    std::env::set_var("TUNE_RS_TEST_DIR", "/env/dir");
    let c = resolve("a: ${oc.env:TUNE_RS_TEST_DIR}/x\nb: ${oc.env:TUNE_RS_SURELY_UNSET,fallback}")
        .unwrap();
    assert_eq!(c.get("a"), Some(&yaml("/env/dir/x")));
    assert_eq!(c.get("b"), Some(&yaml("fallback")));
    assert!(err("a: ${oc.env:TUNE_RS_SURELY_UNSET}").contains("TUNE_RS_SURELY_UNSET is not set"));
}

#[test]
fn unknown_keys_are_errors_with_a_suggestion() {
    let e = err("output_dir: /o\ncheckpointer:\n  output_dir: ${outptu_dir}\n");
    assert!(e.contains("in `checkpointer.output_dir`"), "{e}");
    assert!(e.contains("did you mean `${output_dir}`?"), "{e}");
    let e = err("model: {rank: 8}\nx: ${model.rnak}");
    assert!(e.contains("did you mean `${model.rank}`?"), "{e}");
    let e = err("x: ${nothing_like_it_at_all}");
    assert!(e.contains("names no key"), "{e}");
}

#[test]
fn cycles_are_errors() {
    let e = err("a: ${b}\nb: ${a}");
    assert!(e.contains("interpolation cycle: a -> b -> a"), "{e}");
    let e = err("a: ${a}/x");
    assert!(e.contains("interpolation cycle: a -> a"), "{e}");
    let e = err("node:\n  child: ${node}");
    assert!(e.contains("interpolation cycle"), "{e}");
}

#[test]
fn malformed_references() {
    assert!(err("a: ${b").contains("unterminated"));
    assert!(err("a: x${}").contains("empty reference"));
    assert!(err("m: {x: 1}\na: dir/${m}")
        .contains("a list or mapping cannot be written inside a string"));
    assert!(err("a: ${oc.decode:x}").contains("resolver `oc.decode` is not supported"));
}

#[test]
fn non_ascii_text_around_references() {
    let c = resolve("run: x\noutput_dir: /home/zoë/实验/${run}/é\n").unwrap();
    assert_eq!(c.get("output_dir"), Some(&yaml("/home/zoë/实验/x/é")));
}

#[test]
fn floats_inside_strings_print_as_python_prints_them() {
    for (lr, text) in [
        ("1e-5", "r_1e-05"),
        ("3e-4", "r_0.0003"),
        ("2.0", "r_2.0"),
        ("1.5e16", "r_1.5e+16"),
        ("0.1", "r_0.1"),
    ] {
        let c = resolve(&format!("lr: {lr}\nname: r_${{lr}}\n")).unwrap();
        assert_eq!(c.get("name"), Some(&yaml(text)), "{lr}");
    }
    // Integers stay integers.
    let c = resolve("n: 8\nname: r_${n}\n").unwrap();
    assert_eq!(c.get("name"), Some(&yaml("r_8")));
}
