//! `docs/writing-an-adapter-plugin.md` shows the example plugin's whole source; it must stay the
//! source that CI builds and tests (`plugins/ia3/src/lib.rs`), word for word.

mod common;

#[test]
fn the_guide_shows_the_example_plugin_verbatim() {
    let root = common::root();
    let guide = std::fs::read_to_string(root.join("docs/writing-an-adapter-plugin.md")).unwrap();
    let source = std::fs::read_to_string(root.join("plugins/ia3/src/lib.rs")).unwrap();
    let start = guide.find("```rust\n").expect("the guide has a rust block") + "```rust\n".len();
    let len = guide[start..].find("```\n").expect("the rust block ends");
    assert!(
        guide[start..start + len] == source,
        "the rust block of docs/writing-an-adapter-plugin.md differs from plugins/ia3/src/lib.rs; copy the file into the guide"
    );
}
