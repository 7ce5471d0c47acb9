//! Validation never panics, whatever well-formed document it is given, and always explains a
//! rejection with a positioned violation.

use proptest::prelude::*;
use vbackup_core::unstable::schema::{Grammar, validate};

const NAMES: &[&str] = &[
    "domaincheckpoint",
    "domainbackup",
    "name",
    "disks",
    "disk",
    "domain",
    "server",
    "target",
    "scratch",
    "driver",
    "encryption",
    "secret",
    "cipher",
    "ivgen",
    "seclabel",
    "label",
    "incremental",
    "parent",
    "creationTime",
    "description",
    "x",
];

/// A random element tree over our vocabulary, with random attributes and texts.
fn tree(depth: u32) -> BoxedStrategy<String> {
    let attrs = proptest::collection::vec(
        (
            prop::sample::select(
                &[
                    "name", "type", "mode", "file", "dev", "backup", "size", "q:x",
                ][..],
            ),
            "[ a-z0-9/._-]{0,12}",
        ),
        0..4,
    );
    let leaf = (
        prop::sample::select(NAMES),
        attrs.clone(),
        "[ a-z0-9<>&]{0,8}",
    )
        .prop_map(|(name, attrs, text)| {
            let text = text.replace('<', "&lt;").replace('&', "&amp;");
            format!("<{name}{}>{text}</{name}>", render(&attrs))
        });
    leaf.prop_recursive(depth, 64, 6, move |inner| {
        (
            prop::sample::select(NAMES),
            attrs.clone(),
            proptest::collection::vec(inner, 0..6),
        )
            .prop_map(|(name, attrs, children)| {
                format!("<{name}{}>{}</{name}>", render(&attrs), children.join("\n"))
            })
    })
    .boxed()
}

fn render(attrs: &[(&str, String)]) -> String {
    let mut seen = Vec::new();
    let mut out = String::new();
    for (name, value) in attrs {
        if seen.contains(name) {
            continue;
        }
        seen.push(*name);
        out.push_str(&format!(" {name}='{value}'"));
    }
    if seen.contains(&"q:x") {
        out.push_str(" xmlns:q='urn:q'");
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn validation_never_panics_and_explains_rejections(body in tree(5)) {
        let doc = roxmltree::Document::parse(&body).expect("generated documents are well-formed");
        for grammar in [Grammar::Checkpoint, Grammar::Backup] {
            if let Err(violations) = validate(&doc, grammar) {
                prop_assert!(!violations.is_empty());
                for v in &violations {
                    prop_assert!(v.line >= 1 && v.column >= 1, "{v}");
                    prop_assert!(v.path.starts_with('/'), "{v}");
                    prop_assert!(!v.message.is_empty());
                }
            }
        }
    }
}
