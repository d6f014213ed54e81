//! Just enough RFC 5322 header parsing for assertions on stored messages.

use std::collections::BTreeMap;

/// The values of every header field named `name` (case-insensitive), unfolded, in order.
pub fn header_values(message: &[u8], name: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(message);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break; // end of the header section
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push_str(line);
            }
            continue;
        }
        if let Some((n, v)) = line.split_once(':') {
            fields.push((n.trim().to_string(), v.trim_start().to_string()));
        }
    }
    fields
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .collect()
}

/// A DKIM-Signature value's tags (`d`, `s`, `a`, ...), whitespace removed from values.
pub fn dkim_tags(value: &str) -> BTreeMap<String, String> {
    value
        .split(';')
        .filter_map(|part| {
            let (k, v) = part.split_once('=')?;
            let v: String = v.chars().filter(|c| !c.is_whitespace()).collect();
            Some((k.trim().to_string(), v))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// The tags of every DKIM-Signature of `message`, topmost first.
pub fn dkim_signatures(message: &[u8]) -> Vec<BTreeMap<String, String>> {
    header_values(message, "DKIM-Signature")
        .iter()
        .map(|v| dkim_tags(v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_dkim_signature_is_parsed() {
        let msg = b"Received: from x\r\n\tby y\r\nDKIM-Signature: v=1; a=rsa-sha256; d=example.test;\r\n s=herald; h=from:to; bh=abc\r\n def=; b=xyz\r\nSubject: hi\r\n\r\nDKIM-Signature: not a header\r\n";
        let sigs = dkim_signatures(msg);
        assert_eq!(sigs.len(), 1);
        assert_eq!(sigs[0]["d"], "example.test");
        assert_eq!(sigs[0]["s"], "herald");
        assert_eq!(sigs[0]["a"], "rsa-sha256");
        assert_eq!(sigs[0]["bh"], "abcdef=");
        assert_eq!(header_values(msg, "received"), vec!["from x\tby y"]);
    }
}
