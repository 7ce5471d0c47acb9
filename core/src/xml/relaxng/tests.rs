//! One test per supported RELAX NG feature, each with accepted and rejected documents.

use super::*;

const NS: &str = r#"xmlns="http://relaxng.org/ns/structure/1.0" datatypeLibrary="http://www.w3.org/2001/XMLSchema-datatypes""#;

fn schema(body: &str) -> Schema {
    let text = format!("<grammar {NS}><start>{body}</start></grammar>");
    match Schema::compile(&text) {
        Ok(s) => s,
        Err(e) => panic!("schema does not compile: {e}\n{text}"),
    }
}

fn check(s: &Schema, doc: &str) -> Result<(), Vec<SchemaViolation>> {
    let doc = roxmltree::Document::parse(doc).expect("well-formed test document");
    s.validate(&doc)
}

fn accepts(s: &Schema, doc: &str) {
    if let Err(e) = check(s, doc) {
        panic!("expected `{doc}` to be valid, got {e:?}");
    }
}

fn rejects(s: &Schema, doc: &str) -> SchemaViolation {
    match check(s, doc) {
        Ok(()) => panic!("expected `{doc}` to be invalid"),
        Err(mut v) => v.remove(0),
    }
}

#[test]
fn element_with_name_and_empty_content() {
    let s = schema("<element name='a'><empty/></element>");
    accepts(&s, "<a/>");
    accepts(&s, "<a>  \n </a>");
    let v = rejects(&s, "<b/>");
    assert_eq!(v.message, "unexpected element `b`; expected `a`");
    assert_eq!((v.line, v.column, v.path.as_str()), (1, 1, "/b"));
    let v = rejects(&s, "<a><b/></a>");
    assert_eq!(v.message, "unexpected element `b`");
    assert_eq!((v.column, v.path.as_str()), (4, "/a/b"));
    rejects(&s, "<a>x</a>");
}

#[test]
fn attributes_required_optional_and_unexpected() {
    let s = schema(
        "<element name='disk'><attribute name='name'/>\
         <optional><attribute name='size'><data type='unsignedLong'/></attribute></optional></element>",
    );
    accepts(&s, "<disk name='vda'/>");
    accepts(&s, "<disk size='5' name='vda'/>");
    let v = rejects(&s, "<disk/>");
    assert_eq!(v.message, "missing required attribute `name`");
    let v = rejects(&s, "<disk name='a' bogus='1'/>");
    assert_eq!(v.message, "unexpected attribute `bogus`");
    assert_eq!(v.column, 16);
    let v = rejects(&s, "<disk name='a' size='big'/>");
    assert_eq!(
        v.message,
        "invalid value `big` for attribute `size`; expected unsignedLong"
    );
}

#[test]
fn choice_of_attribute_values() {
    let s = schema(
        "<element name='disk'><choice>\
           <attribute name='checkpoint'><value>no</value></attribute>\
           <group><optional><attribute name='checkpoint'><value>bitmap</value></attribute></optional>\
             <optional><attribute name='bitmap'/></optional></group>\
         </choice></element>",
    );
    accepts(&s, "<disk/>");
    accepts(&s, "<disk checkpoint='no'/>");
    accepts(&s, "<disk checkpoint=' bitmap ' bitmap='c1'/>");
    accepts(&s, "<disk bitmap='c1'/>");
    let v = rejects(&s, "<disk checkpoint='foo'/>");
    assert_eq!(
        v.message,
        "invalid value `foo` for attribute `checkpoint`; expected `bitmap` or `no`"
    );
    let v = rejects(&s, "<disk checkpoint='no' bitmap='c1'/>");
    assert_eq!(v.message, "unexpected attribute `bitmap`");
}

#[test]
fn group_keeps_order_and_interleave_does_not() {
    let g = schema(
        "<element name='r'><element name='a'><empty/></element><element name='b'><empty/></element></element>",
    );
    accepts(&g, "<r><a/><b/></r>");
    let v = rejects(&g, "<r><b/><a/></r>");
    assert_eq!(v.message, "unexpected element `b`; expected `a`");
    let v = rejects(&g, "<r><a/></r>");
    assert_eq!(v.message, "missing required content in `r`; expected `b`");
    let i = schema(
        "<element name='r'><interleave><element name='a'><empty/></element><element name='b'><empty/></element></interleave></element>",
    );
    accepts(&i, "<r><b/><a/></r>");
    accepts(&i, "<r><a/><b/></r>");
    rejects(&i, "<r><a/><b/><a/></r>");
}

#[test]
fn repetition_one_or_more_zero_or_more_optional() {
    let s = schema(
        "<element name='r'><optional><element name='o'><empty/></element></optional>\
         <oneOrMore><element name='a'><empty/></element><element name='b'><empty/></element></oneOrMore>\
         <zeroOrMore><element name='z'><empty/></element></zeroOrMore></element>",
    );
    accepts(&s, "<r><a/><b/></r>");
    accepts(&s, "<r><o/><a/><b/><a/><b/><z/><z/></r>");
    rejects(&s, "<r><o/></r>");
    rejects(&s, "<r><a/><b/><a/></r>");
    rejects(&s, "<r><o/><o/><a/><b/></r>");
}

#[test]
fn mixed_text_and_elements() {
    let s = schema(
        "<element name='p'><mixed><zeroOrMore><element name='b'><text/></element></zeroOrMore></mixed></element>",
    );
    accepts(&s, "<p>hello <b>x</b> world<!-- c --> more</p>");
    accepts(&s, "<p/>");
    let strict = schema(
        "<element name='p'><zeroOrMore><element name='b'><text/></element></zeroOrMore></element>",
    );
    let v = rejects(&strict, "<p>hello <b>x</b></p>");
    assert_eq!(v.message, "unexpected text `hello` in `p`");
    accepts(&strict, "<p>\n  <b>x</b>\n</p>");
}

#[test]
fn data_with_pattern_and_text_content() {
    let s = schema(
        "<element name='name'><data type='string'><param name='pattern'>[a-zA-Z0-9_\\-][a-zA-Z0-9_.\\-]*</param></data></element>",
    );
    accepts(&s, "<name>c1</name>");
    accepts(&s, "<name>c<!-- split -->1</name>");
    let v = rejects(&s, "<name>.hidden</name>");
    assert!(
        v.message.starts_with("invalid value `.hidden` in `name`"),
        "{}",
        v.message
    );
    rejects(&s, "<name>a/b</name>");
    let v = rejects(&s, "<name/>");
    assert!(
        v.message
            .starts_with("missing value in `name`; expected string"),
        "{}",
        v.message
    );
    rejects(&s, "<name> c1</name>");
}

#[test]
fn numeric_types_and_range_facets() {
    let s = schema(
        "<element name='n'><data type='int'><param name='minInclusive'>-5</param><param name='maxInclusive'>5</param></data></element>",
    );
    accepts(&s, "<n>-5</n>");
    accepts(&s, "<n> +5 </n>");
    rejects(&s, "<n>6</n>");
    rejects(&s, "<n>x</n>");
    let l = schema("<element name='n'><data type='long'/></element>");
    accepts(&l, "<n>-9223372036854775808</n>");
    rejects(&l, "<n>9223372036854775808</n>");
    let b = schema(
        "<element name='n'><attribute name='v'><data type='boolean'/></attribute></element>",
    );
    accepts(&b, "<n v='true'/>");
    rejects(&b, "<n v='yes'/>");
}

#[test]
fn length_facets_token_ncname_and_uri() {
    let s = schema(
        "<element name='t'><data type='token'><param name='minLength'>2</param><param name='maxLength'>4</param></data></element>",
    );
    accepts(&s, "<t>  ab  </t>");
    rejects(&s, "<t>a</t>");
    rejects(&s, "<t>abcde</t>");
    let n = schema("<element name='t'><data type='NCName'/></element>");
    accepts(&n, "<t>_x.y</t>");
    rejects(&n, "<t>a:b</t>");
    let u = schema("<element name='t'><data type='anyURI'/></element>");
    accepts(&u, "<t>http://example.org/a%20b</t>");
    rejects(&u, "<t>%zz</t>");
}

#[test]
fn builtin_value_types_string_and_token() {
    let s = schema(
        "<element name='m'><attribute name='mode'><choice><value>push</value><value type='string'>pull</value></choice></attribute></element>",
    );
    accepts(&s, "<m mode=' push '/>");
    accepts(&s, "<m mode='pull'/>");
    rejects(&s, "<m mode=' pull'/>");
}

#[test]
fn any_name_ns_name_and_except() {
    let s = schema(
        "<element><anyName><except><name>bad</name></except></anyName>\
           <zeroOrMore><attribute><nsName ns='urn:x'/></attribute></zeroOrMore><empty/></element>",
    );
    accepts(&s, "<whatever/>");
    accepts(&s, "<whatever xmlns:x='urn:x' x:a='1' x:b='2'/>");
    rejects(&s, "<bad/>");
    let v = rejects(&s, "<whatever plain='1' xml:lang='en'/>");
    assert_eq!(v.message, "unexpected attribute `plain`");
    let v = rejects(&s, "<whatever xml:lang='en'/>");
    assert_eq!(
        v.message,
        "unexpected attribute `lang` in namespace `http://www.w3.org/XML/1998/namespace`"
    );
    let q = schema("<element name='q:e' xmlns:q='urn:q'><empty/></element>");
    accepts(&q, "<e xmlns='urn:q'/>");
    rejects(&q, "<e/>");
}

#[test]
fn recursive_any_element_accepts_arbitrary_trees() {
    let text = format!(
        "<grammar {NS}><start><element name='domain'><ref name='any'/></element></start>\
         <define name='any'><zeroOrMore><choice><attribute><anyName/></attribute><text/>\
         <element><anyName/><ref name='any'/></element></choice></zeroOrMore></define></grammar>"
    );
    let s = Schema::compile(&text).unwrap();
    accepts(
        &s,
        "<domain type='kvm'><name>x</name><devices><disk a='1'><x>t<y/>u</x></disk></devices>text</domain>",
    );
    rejects(&s, "<other/>");
}

#[test]
fn defines_combine_by_choice_and_interleave() {
    let text = format!(
        "<grammar {NS}><start><element name='r'><ref name='c'/><ref name='i'/></element></start>\
         <define name='c'><element name='a'><empty/></element></define>\
         <define name='c' combine='choice'><element name='b'><empty/></element></define>\
         <define name='i' combine='interleave'><element name='x'><empty/></element></define>\
         <div><define name='i' combine='interleave'><element name='y'><empty/></element></define></div></grammar>"
    );
    let s = Schema::compile(&text).unwrap();
    accepts(&s, "<r><a/><x/><y/></r>");
    accepts(&s, "<r><b/><y/><x/></r>");
    rejects(&s, "<r><a/><b/><x/><y/></r>");
    rejects(&s, "<r><a/><x/></r>");
}

#[test]
fn nested_grammar_with_parent_ref() {
    let text = format!(
        "<grammar {NS}><start><element name='r'><grammar><start><ref name='inner'/></start>\
         <define name='inner'><element name='i'><parentRef name='leaf'/></element></define></grammar></element></start>\
         <define name='leaf'><element name='leaf'><empty/></element></define></grammar>"
    );
    let s = Schema::compile(&text).unwrap();
    accepts(&s, "<r><i><leaf/></i></r>");
    rejects(&s, "<r><i/></r>");
}

#[test]
fn not_allowed_and_data_except() {
    let s = schema(
        "<element name='r'><choice><notAllowed/><data type='token'><except><value>x</value></except></data></choice></element>",
    );
    accepts(&s, "<r>y</r>");
    rejects(&s, "<r>x</r>");
}

#[test]
fn bad_grammars_are_positioned_errors() {
    let e = Schema::compile(&format!(
        "<grammar {NS}><start><ref name='missing'/></start></grammar>"
    ))
    .unwrap_err();
    assert!(e.message.contains("undefined `missing`"), "{e}");
    let e = Schema::compile(&format!(
        "<grammar {NS}><start><ref name='a'/></start><define name='a'><choice><empty/><ref name='a'/></choice></define></grammar>"
    ))
    .unwrap_err();
    assert!(e.message.contains("recursive"), "{e}");
    let e = Schema::compile(&format!(
        "<grammar {NS}><start><list><text/></list></start></grammar>"
    ))
    .unwrap_err();
    assert!(e.message.contains("not supported"), "{e}");
    let e = Schema::compile(&format!(
        "<grammar {NS}>\n<start><data type='double'/></start></grammar>"
    ))
    .unwrap_err();
    assert_eq!(e.line, 2);
    assert!(Schema::compile("<grammar").is_err());
    assert!(Schema::compile("<grammar/>").is_err());
    let e = Schema::compile(&format!("<grammar {NS}><start><data type='string'><param name='pattern'>(</param></data></start></grammar>")).unwrap_err();
    assert!(e.message.contains("pattern"), "{e}");
}

#[test]
fn deep_documents_are_rejected_without_overflowing_the_stack() {
    let text = format!(
        "<grammar {NS}><start><ref name='any'/></start>\
         <define name='any'><element><anyName/><zeroOrMore><ref name='any'/></zeroOrMore></element></define></grammar>"
    );
    let s = Schema::compile(&text).unwrap();
    let ok = "<a>".repeat(100) + &"</a>".repeat(100);
    accepts(&s, &ok);
    let deep = "<a>".repeat(MAX_DOCUMENT_DEPTH + 5) + &"</a>".repeat(MAX_DOCUMENT_DEPTH + 5);
    let opts = roxmltree::ParsingOptions::default();
    let doc = roxmltree::Document::parse_with_options(&deep, opts).unwrap();
    let v = s.validate(&doc).unwrap_err();
    assert!(v[0].message.contains("nested deeper"), "{}", v[0].message);
}

#[test]
fn several_independent_violations_are_reported() {
    let s = schema(
        "<element name='r'><zeroOrMore><element name='d'><attribute name='n'><data type='unsignedInt'/></attribute></element></zeroOrMore></element>",
    );
    let v = check(&s, "<r>\n<d n='x'/>\n<d/>\n<e/>\n<d n='1'/></r>").unwrap_err();
    let lines: Vec<u32> = v.iter().map(|x| x.line).collect();
    assert_eq!(lines, vec![2, 3, 4], "{v:?}");
}

#[test]
fn a_reused_validator_gives_the_same_verdicts() {
    let s = schema(
        "<element name='r'><zeroOrMore><element name='d'><attribute name='n'><data type='unsignedInt'/></attribute></element></zeroOrMore></element>",
    );
    let mut v = s.validator();
    for _ in 0..3 {
        for (doc, ok) in [
            ("<r><d n='1'/><d n='2'/></r>", true),
            ("<r><d n='-1'/></r>", false),
            ("<r/>", true),
        ] {
            let d = roxmltree::Document::parse(doc).unwrap();
            assert_eq!(v.validate(&d).is_ok(), ok, "{doc}");
        }
    }
}

#[test]
fn dropping_the_caches_between_documents_keeps_verdicts() {
    let s = schema(
        "<element name='r'><zeroOrMore><element name='d'><attribute name='n'><data type='unsignedInt'/></attribute></element></zeroOrMore></element>",
    );
    let mut tiny = Validator::with_cache_limit(&s, 4);
    for _ in 0..3 {
        for (doc, ok) in [
            ("<r><d n='1'/><d n='2'/></r>", true),
            ("<r><d n='x'/></r>", false),
        ] {
            let d = roxmltree::Document::parse(doc).unwrap();
            assert_eq!(tiny.validate(&d).is_ok(), ok, "{doc}");
        }
    }
}

#[test]
fn huge_choices_and_sequences_stay_within_bounds() {
    let values: String = (0..20_000)
        .map(|i| format!("<value>v{i}</value>"))
        .collect();
    let s = schema(&format!(
        "<element name='r'><attribute name='a'><choice>{values}</choice></attribute></element>"
    ));
    accepts(&s, "<r a='v19999'/>");
    let v = rejects(&s, "<r a='w'/>");
    assert!(
        v.message.starts_with("invalid value `w` for attribute `a`"),
        "{}",
        v.message
    );
    let elements: String = (0..1_000)
        .map(|i| format!("<element name='e{i}'><empty/></element>"))
        .collect();
    let many = schema(&format!(
        "<element name='r'><choice>{elements}</choice></element>"
    ));
    accepts(&many, "<r><e999/></r>");
    rejects(&many, "<r><x/></r>");
    let sequence: String = (0..2_000)
        .map(|_| "<optional><element name='x'><empty/></element></optional>")
        .collect();
    let e = Schema::compile(&format!(
        "<grammar {NS}><start><element name='r'><group>{sequence}</group></element></start></grammar>"
    ))
    .unwrap_err();
    assert!(e.message.contains("too deeply"), "{e}");
}
