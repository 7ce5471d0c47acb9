//! Datatypes of `<data>` and `<value>`: RELAX NG's built-in `string` and `token`, and the subset
//! of XML Schema datatypes our grammars use, with the facets `pattern`, `minInclusive`,
//! `maxInclusive`, `minLength`, `maxLength` and `length`.
//!
//! Lexical rules follow libxml2, the reference validator: unsigned types take no sign at all,
//! signed types take `+` or `-`, and every type except `string` collapses whitespace first.

use regex::Regex;

/// Namespace URI of the XML Schema datatype library.
pub(crate) const XSD_LIBRARY: &str = "http://www.w3.org/2001/XMLSchema-datatypes";

/// An integer in the value space; values beyond `i128` keep only their sign, which is all the
/// bounds of our types need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Integer {
    HugeNegative,
    Small(i128),
    HugePositive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Whitespace preserved.
    String,
    /// Whitespace collapsed.
    Token,
    Integer {
        min: Option<i128>,
        max: Option<i128>,
        signed: bool,
    },
    Boolean,
    AnyUri,
    NcName,
}

/// A datatype with its facets.
#[derive(Debug, Clone)]
pub(crate) struct Datatype {
    kind: Kind,
    name: String,
    patterns: Vec<Regex>,
    pattern_sources: Vec<String>,
    min_inclusive: Option<Integer>,
    max_inclusive: Option<Integer>,
    min_length: Option<usize>,
    max_length: Option<usize>,
}

impl Datatype {
    /// Looks a datatype up by library URI and local name.
    pub(crate) fn new(library: &str, name: &str) -> Result<Self, String> {
        let kind = match (library, name) {
            ("", "string") => Kind::String,
            ("", "token") => Kind::Token,
            (XSD_LIBRARY, _) => xsd_kind(name).ok_or_else(|| {
                format!("datatype `{name}` of the XML Schema library is not supported")
            })?,
            ("", _) => return Err(format!("unknown built-in datatype `{name}`")),
            _ => return Err(format!("unsupported datatype library `{library}`")),
        };
        Ok(Datatype {
            kind,
            name: name.to_owned(),
            patterns: Vec::new(),
            pattern_sources: Vec::new(),
            min_inclusive: None,
            max_inclusive: None,
            min_length: None,
            max_length: None,
        })
    }

    /// Adds one `<param>` facet.
    pub(crate) fn add_param(&mut self, param: &str, value: &str) -> Result<(), String> {
        let is_integer = matches!(self.kind, Kind::Integer { .. });
        match param {
            "pattern" => {
                let translated = translate_xsd_regex(value)?;
                let regex = Regex::new(&translated)
                    .map_err(|e| format!("invalid pattern `{value}`: {e}"))?;
                self.patterns.push(regex);
                self.pattern_sources.push(value.to_owned());
            }
            "minInclusive" | "maxInclusive" if is_integer => {
                let bound = parse_integer(collapse(value).as_ref(), true)
                    .ok_or_else(|| format!("`{param}` needs an integer, not `{value}`"))?;
                if param == "minInclusive" {
                    self.min_inclusive = Some(bound);
                } else {
                    self.max_inclusive = Some(bound);
                }
            }
            "minLength" | "maxLength" | "length" if !is_integer && self.kind != Kind::Boolean => {
                let n: usize = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{param}` needs a length, not `{value}`"))?;
                if param != "maxLength" {
                    self.min_length = Some(n);
                }
                if param != "minLength" {
                    self.max_length = Some(n);
                }
            }
            _ => {
                return Err(format!(
                    "parameter `{param}` is not supported for datatype `{}`",
                    self.name
                ));
            }
        }
        Ok(())
    }

    /// Whether `text` is in the lexical space and satisfies every facet.
    pub(crate) fn allows(&self, text: &str) -> bool {
        let normalized = match self.kind {
            Kind::String => std::borrow::Cow::Borrowed(text),
            _ => collapse(text),
        };
        let value = normalized.as_ref();
        let lexical_ok = match self.kind {
            Kind::String | Kind::Token => true,
            Kind::Integer { min, max, signed } => match parse_integer(value, signed) {
                Some(n) => {
                    min.is_none_or(|m| n >= Integer::Small(m))
                        && max.is_none_or(|m| n <= Integer::Small(m))
                        && self.min_inclusive.is_none_or(|m| n >= m)
                        && self.max_inclusive.is_none_or(|m| n <= m)
                }
                None => false,
            },
            Kind::Boolean => matches!(value, "true" | "false" | "1" | "0"),
            Kind::AnyUri => valid_uri_escapes(value),
            Kind::NcName => is_ncname(value),
        };
        if !lexical_ok {
            return false;
        }
        if self.min_length.is_some() || self.max_length.is_some() {
            let len = value.chars().count();
            if self.min_length.is_some_and(|m| len < m) || self.max_length.is_some_and(|m| len > m)
            {
                return false;
            }
        }
        self.patterns.iter().all(|re| re.is_match(value))
    }

    /// Whether `text` denotes the same value as the schema's `<value>` literal. Both must be in
    /// the lexical space; the caller checks `text`, the compiler checks the literal.
    pub(crate) fn equal(&self, text: &str, literal: &str) -> bool {
        match self.kind {
            Kind::String => text == literal,
            Kind::Integer { signed, .. } => {
                match (
                    parse_integer(collapse(text).as_ref(), signed),
                    parse_integer(collapse(literal).as_ref(), signed),
                ) {
                    (Some(a), Some(b)) => a == b && a != Integer::HugePositive,
                    _ => false,
                }
            }
            Kind::Boolean => {
                let truth = |s: &str| matches!(s, "true" | "1");
                truth(collapse(text).as_ref()) == truth(collapse(literal).as_ref())
            }
            Kind::Token | Kind::AnyUri | Kind::NcName => collapse(text) == collapse(literal),
        }
    }

    /// A short human description for error messages, e.g. `unsignedLong`.
    pub(crate) fn describe(&self) -> String {
        match self.pattern_sources.first() {
            Some(p) if self.pattern_sources.len() == 1 => {
                format!("{} matching `{p}`", self.name)
            }
            _ => self.name.clone(),
        }
    }
}

fn xsd_kind(name: &str) -> Option<Kind> {
    let int =
        |min: Option<i128>, max: Option<i128>, signed: bool| Kind::Integer { min, max, signed };
    Some(match name {
        "string" => Kind::String,
        "token" | "normalizedString" => Kind::Token,
        "integer" => int(None, None, true),
        "long" => int(Some(i64::MIN.into()), Some(i64::MAX.into()), true),
        "int" => int(Some(i32::MIN.into()), Some(i32::MAX.into()), true),
        "short" => int(Some(i16::MIN.into()), Some(i16::MAX.into()), true),
        "byte" => int(Some(i8::MIN.into()), Some(i8::MAX.into()), true),
        "nonNegativeInteger" => int(Some(0), None, false),
        "positiveInteger" => int(Some(1), None, false),
        "unsignedLong" => int(Some(0), Some(u64::MAX.into()), false),
        "unsignedInt" => int(Some(0), Some(u32::MAX.into()), false),
        "unsignedShort" => int(Some(0), Some(u16::MAX.into()), false),
        "unsignedByte" => int(Some(0), Some(u8::MAX.into()), false),
        "boolean" => Kind::Boolean,
        "anyURI" => Kind::AnyUri,
        "NCName" => Kind::NcName,
        _ => return None,
    })
}

/// XML whitespace: space, tab, line feed, carriage return.
pub(crate) fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Whether the text is empty or XML whitespace only.
pub(crate) fn is_whitespace(text: &str) -> bool {
    text.bytes()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// XML Schema's `collapse`: trim, and turn every run of whitespace into one space.
pub(crate) fn collapse(text: &str) -> std::borrow::Cow<'_, str> {
    let trimmed = text.trim_matches(is_xml_space);
    let needs_work = trimmed.contains(['\t', '\n', '\r']) || trimmed.contains("  ");
    if !needs_work {
        return std::borrow::Cow::Borrowed(trimmed);
    }
    let mut out = String::with_capacity(trimmed.len());
    let mut in_space = false;
    for c in trimmed.chars() {
        if is_xml_space(c) {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.push(c);
            in_space = false;
        }
    }
    std::borrow::Cow::Owned(out)
}

fn parse_integer(text: &str, signed: bool) -> Option<Integer> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' if signed => (true, &text[1..]),
        b'+' if signed => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let significant = digits.trim_start_matches('0');
    if significant.len() > 38 {
        return Some(if negative {
            Integer::HugeNegative
        } else {
            Integer::HugePositive
        });
    }
    let magnitude: i128 = if significant.is_empty() {
        0
    } else {
        significant.parse().ok()?
    };
    Some(Integer::Small(if negative {
        -magnitude
    } else {
        magnitude
    }))
}

fn valid_uri_escapes(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let ok = bytes.len() > i + 2
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit();
            if !ok {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

fn is_ncname(text: &str) -> bool {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) if c == '_' || c.is_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '\u{b7}'))
}

/// Translates an XML Schema regular expression into the `regex` crate's syntax, anchored at
/// both ends (XML Schema patterns always match the whole value).
pub(crate) fn translate_xsd_regex(pattern: &str) -> Result<String, String> {
    let mut out = String::with_capacity(pattern.len() + 16);
    out.push_str(r"\A(?:");
    let mut chars = pattern.chars().peekable();
    let mut class_depth = 0usize;
    while let Some(c) = chars.next() {
        if class_depth == 0 {
            match c {
                '.' => out.push_str(r"[^\n\r]"),
                '^' => out.push_str(r"\^"),
                '$' => out.push_str(r"\$"),
                '(' => out.push_str("(?:"),
                '[' => {
                    class_depth = 1;
                    out.push('[');
                    if chars.peek() == Some(&'^') {
                        chars.next();
                        out.push('^');
                    }
                }
                '\\' => {
                    let e = chars
                        .next()
                        .ok_or_else(|| format!("pattern `{pattern}` ends with a backslash"))?;
                    out.push_str(&translate_escape(e, false, pattern)?);
                    if e == 'p' || e == 'P' {
                        copy_property(&mut chars, &mut out, pattern)?;
                    }
                }
                _ => out.push(c),
            }
        } else {
            match c {
                ']' => {
                    class_depth = 0;
                    out.push(']');
                }
                '[' => {
                    return Err(format!(
                        "character class subtraction in pattern `{pattern}` is not supported"
                    ));
                }
                '-' if chars.peek() == Some(&'[') => {
                    return Err(format!(
                        "character class subtraction in pattern `{pattern}` is not supported"
                    ));
                }
                '&' | '~' => {
                    out.push('\\');
                    out.push(c);
                }
                '\\' => {
                    let e = chars
                        .next()
                        .ok_or_else(|| format!("pattern `{pattern}` ends with a backslash"))?;
                    out.push_str(&translate_escape(e, true, pattern)?);
                    if e == 'p' || e == 'P' {
                        copy_property(&mut chars, &mut out, pattern)?;
                    }
                }
                _ => out.push(c),
            }
        }
    }
    if class_depth != 0 {
        return Err(format!(
            "unterminated character class in pattern `{pattern}`"
        ));
    }
    out.push_str(r")\z");
    Ok(out)
}

fn copy_property(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    out: &mut String,
    pattern: &str,
) -> Result<(), String> {
    if chars.next() != Some('{') {
        return Err(format!("malformed `\\p` in pattern `{pattern}`"));
    }
    out.push('{');
    for c in chars.by_ref() {
        out.push(c);
        if c == '}' {
            return Ok(());
        }
    }
    Err(format!("malformed `\\p` in pattern `{pattern}`"))
}

fn translate_escape(e: char, in_class: bool, pattern: &str) -> Result<String, String> {
    let (outside, inside) = match e {
        'n' | 'r' | 't' | '\\' | '|' | '.' | '-' | '^' | '?' | '*' | '+' | '{' | '}' | '('
        | ')' | '[' | ']' => {
            let s = format!("\\{e}");
            (s.clone(), s)
        }
        'd' => (r"\p{Nd}".to_owned(), r"\p{Nd}".to_owned()),
        'D' => (r"\P{Nd}".to_owned(), String::new()),
        's' => (r"[ \t\n\r]".to_owned(), r" \t\n\r".to_owned()),
        'S' => (r"[^ \t\n\r]".to_owned(), String::new()),
        'i' => (r"[\p{L}_:]".to_owned(), r"\p{L}_:".to_owned()),
        'I' => (r"[^\p{L}_:]".to_owned(), String::new()),
        'c' => (
            r"[\p{L}\p{Nd}\p{Mn}._:\-]".to_owned(),
            r"\p{L}\p{Nd}\p{Mn}._:\-".to_owned(),
        ),
        'C' => (r"[^\p{L}\p{Nd}\p{Mn}._:\-]".to_owned(), String::new()),
        'w' => (r"[^\p{P}\p{Z}\p{C}]".to_owned(), String::new()),
        'W' => (r"[\p{P}\p{Z}\p{C}]".to_owned(), String::new()),
        'p' => (r"\p".to_owned(), r"\p".to_owned()),
        'P' => (r"\P".to_owned(), r"\P".to_owned()),
        _ => return Err(format!("unknown escape `\\{e}` in pattern `{pattern}`")),
    };
    if in_class {
        if inside.is_empty() {
            return Err(format!(
                "escape `\\{e}` inside a character class in pattern `{pattern}` is not supported"
            ));
        }
        Ok(inside)
    } else {
        Ok(outside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xsd(name: &str) -> Datatype {
        Datatype::new(XSD_LIBRARY, name).expect("known type")
    }

    #[test]
    fn unsigned_types_reject_any_sign_and_overflow() {
        let t = xsd("unsignedInt");
        assert!(t.allows("5") && t.allows(" 5 ") && t.allows("0005") && t.allows("4294967295"));
        assert!(!t.allows("+5") && !t.allows("-0") && !t.allows("4294967296") && !t.allows(""));
        let t = xsd("unsignedLong");
        assert!(t.allows("18446744073709551615") && !t.allows("18446744073709551616"));
        assert!(!t.allows("1e3") && !t.allows("abc") && !t.allows("5 6"));
    }

    #[test]
    fn signed_types_take_a_sign_and_respect_their_range() {
        let t = xsd("int");
        assert!(t.allows("-2147483648") && t.allows("+5") && t.allows("-0"));
        assert!(!t.allows("2147483648") && !t.allows("-"));
        let t = xsd("long");
        assert!(t.allows("9223372036854775807") && !t.allows("9223372036854775808"));
        let t = xsd("integer");
        assert!(t.allows("123456789012345678901234567890123456789012345"));
    }

    #[test]
    fn inclusive_bounds_and_lengths_are_checked() {
        let mut t = xsd("unsignedInt");
        t.add_param("minInclusive", "10").unwrap();
        t.add_param("maxInclusive", "20").unwrap();
        assert!(t.allows("10") && t.allows("20") && !t.allows("9") && !t.allows("21"));
        let mut t = xsd("string");
        t.add_param("minLength", "2").unwrap();
        t.add_param("maxLength", "3").unwrap();
        assert!(!t.allows("a") && t.allows("ab") && t.allows("abc") && !t.allows("abcd"));
        assert!(xsd("string").add_param("minInclusive", "1").is_err());
        assert!(xsd("int").add_param("minLength", "1").is_err());
        assert!(xsd("int").add_param("frobnicate", "1").is_err());
    }

    #[test]
    fn boolean_ncname_and_uri_lexical_spaces() {
        let b = xsd("boolean");
        assert!(b.allows("true") && b.allows(" 0 ") && !b.allows("TRUE") && !b.allows("yes"));
        assert!(b.equal("1", "true") && !b.equal("0", "true"));
        let n = xsd("NCName");
        assert!(n.allows("_a") && n.allows("TRUE") && !n.allows("a:b") && !n.allows("1a"));
        let u = xsd("anyURI");
        assert!(u.allows("http://x/%20") && !u.allows("%zz") && u.allows(""));
    }

    #[test]
    fn patterns_are_anchored_and_follow_xsd_syntax() {
        let mut t = xsd("string");
        t.add_param("pattern", "[a-zA-Z0-9_\\-][a-zA-Z0-9_.\\-]*")
            .unwrap();
        assert!(t.allows("c1") && t.allows("a.b-c") && !t.allows(".hidden") && !t.allows("a/b"));
        assert!(!t.allows("a\nb") && !t.allows(" c1"));
        let mut t = xsd("string");
        t.add_param("pattern", "/.*").unwrap();
        assert!(t.allows("/x y") && !t.allows("/a\nb") && !t.allows("x/"));
        let mut t = xsd("string");
        t.add_param("pattern", "a$b^").unwrap();
        assert!(t.allows("a$b^"));
        let mut t = xsd("string");
        t.add_param("pattern", "\\d+\\s\\i\\c*").unwrap();
        assert!(t.allows("12 x.y") && !t.allows("12 .y"));
        assert!(xsd("string").add_param("pattern", "[a-z-[aeiou]]").is_err());
        assert!(xsd("string").add_param("pattern", "(").is_err());
    }

    #[test]
    fn token_values_compare_after_collapsing_whitespace() {
        let t = Datatype::new("", "token").unwrap();
        assert!(t.equal("  push\n", "push") && !t.equal("pu sh", "push"));
        let s = Datatype::new("", "string").unwrap();
        assert!(s.equal("push", "push") && !s.equal(" push", "push"));
        let i = xsd("unsignedInt");
        assert!(i.equal("007", "7"));
        assert!(Datatype::new("", "double").is_err());
        assert!(Datatype::new("urn:other", "x").is_err());
    }
}
