//! The license context passed upstream in one header (`upstream_headers.combined`): a
//! structured-field dictionary (RFC 9651), `account="acme", license="lic-1", plan="pro",
//! feature="search"`.

/// The license context under its names, in the order every channel uses (the four headers,
/// the combined one, dynamic metadata).
pub fn fields<'a>(
    account: &'a str,
    license: &'a str,
    plan: &'a str,
    feature: &'a str,
) -> [(&'static str, &'a str); 4] {
    [
        ("account", account),
        ("license", license),
        ("plan", plan),
        ("feature", feature),
    ]
}

/// The combined header's value for a license's context (name, value pairs in order).
pub fn combined(context: &[(&str, &str)]) -> String {
    let items: Vec<String> = context
        .iter()
        .map(|(key, value)| format!("{key}={}", structured_string(value)))
        .collect();
    items.join(", ")
}

/// `value` as a structured-field String (RFC 9651 section 3.3.3), or as a Display String
/// (section 3.3.8, percent-encoded UTF-8) when it holds characters a String cannot.
fn structured_string(value: &str) -> String {
    let printable = |b: u8| (0x20..=0x7e).contains(&b);
    if value.bytes().all(printable) {
        let mut out = String::with_capacity(value.len() + 2);
        out.push('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        return out;
    }
    let mut out = String::with_capacity(value.len() * 3 + 3);
    out.push_str("%\"");
    for b in value.bytes() {
        if b == b'%' || b == b'"' || !printable(b) {
            out.push_str(&format!("%{b:02x}"));
        } else {
            out.push(char::from(b));
        }
    }
    out.push('"');
    out
}
