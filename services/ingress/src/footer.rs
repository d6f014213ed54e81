//! The account footer: appended to every text/plain and text/html body part of a message.
//! mail-parser finds the parts and decodes them (transfer encoding and charset); mail-builder
//! writes each changed part anew (UTF-8, its own transfer encoding). Everything else, the
//! multipart structure, attachments and nested messages included, is kept byte for byte.

use herald_core::account::Footer;
use mail_builder::{
    headers::{content_type::ContentType, raw::Raw},
    mime::MimePart,
};
use mail_parser::{MessageParser, MessagePart, PartKind};

/// Headers of a part that the rewritten part replaces with its own.
fn is_replaced(name: &str) -> bool {
    name.eq_ignore_ascii_case("Content-Type")
        || name.eq_ignore_ascii_case("Content-Transfer-Encoding")
        || name.eq_ignore_ascii_case("MIME-Version")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The new text of a body part, or `None` when the part is not a body text.
fn with_footer(part: &MessagePart<'_>, footer: &Footer) -> Option<(String, &'static str)> {
    if part.is_attachment() {
        return None;
    }
    let text = part.text()?;
    match part.kind() {
        PartKind::Text
            if part.is_content_type("text", "plain") || part.content_type().is_none() =>
        {
            let add = footer.text.as_deref()?;
            let sep = if text.ends_with('\n') { "" } else { "\r\n" };
            Some((format!("{text}{sep}{add}\r\n"), "text/plain"))
        }
        PartKind::Html => {
            let add = match (&footer.html, &footer.text) {
                (Some(h), _) => h.clone(),
                (None, Some(t)) => format!("<p>{}</p>", html_escape(t).replace('\n', "<br>")),
                (None, None) => return None,
            };
            let lower = text.to_ascii_lowercase();
            let new = match lower.rfind("</body>") {
                Some(i) => format!("{}{add}{}", &text[..i], &text[i..]),
                None => format!("{text}{add}"),
            };
            Some((new, "text/html"))
        }
        _ => None,
    }
}

/// The part written anew by mail-builder: headers of its own, then the original part's
/// other headers (Content-Disposition, Content-ID, ...) as they were.
fn rebuilt(part: &MessagePart<'_>, text: String, ctype: &'static str) -> Vec<u8> {
    let mut mime = MimePart::new(ContentType::new(ctype).attribute("charset", "utf-8"), text);
    for h in part.headers().iter() {
        let name = h.raw_name();
        if is_replaced(name) {
            continue;
        }
        let value = String::from_utf8_lossy(h.raw_value()).trim().to_string();
        mime = mime.header(name.to_string(), Raw::new(value));
    }
    let mut out = Vec::new();
    mime.write_part(&mut out);
    out
}

/// The leaf parts of the message itself (not of attached messages), in document order.
fn leaves<'m>(part: MessagePart<'m>, out: &mut Vec<MessagePart<'m>>) {
    if part.is_multipart() {
        for child in part.children() {
            leaves(child, out);
        }
    } else {
        out.push(part);
    }
}

/// `raw` with the footer in every body text part; `None` when there is nothing to change
/// (no body text, or a message mail-parser cannot read).
pub fn append_footer(raw: &[u8], footer: &Footer) -> Option<Vec<u8>> {
    let message = MessageParser::new().parse(raw)?;
    let root = message.root_part();
    if !root.is_multipart() {
        let (text, ctype) = with_footer(&root, footer)?;
        // A single-part message: the message headers stay, but those describing the body.
        let mut out = Vec::with_capacity(raw.len() + 256);
        for h in root.headers().iter() {
            if !is_replaced(h.raw_name()) {
                out.extend_from_slice(&raw[h.offset_field() as usize..h.offset_end() as usize]);
            }
        }
        out.extend_from_slice(b"MIME-Version: 1.0\r\n");
        out.extend_from_slice(&rebuilt_body_only(text, ctype));
        return Some(out);
    }
    let mut parts = Vec::new();
    leaves(root, &mut parts);
    let mut edits: Vec<(usize, usize, Vec<u8>)> = parts
        .iter()
        .filter_map(|p| {
            let (text, ctype) = with_footer(p, footer)?;
            Some((
                p.offset_header() as usize,
                p.offset_end() as usize,
                rebuilt(p, text, ctype),
            ))
        })
        .collect();
    if edits.is_empty() {
        return None;
    }
    edits.sort_by_key(|(start, _, _)| *start);
    let mut out = Vec::with_capacity(raw.len() + 512);
    let mut at = 0;
    for (start, end, bytes) in edits {
        out.extend_from_slice(&raw[at..start]);
        out.extend_from_slice(&bytes);
        // mail-builder ends a part with CRLF; the original's CRLF before the boundary
        // belongs to the delimiter and stays.
        if out.ends_with(b"\r\n") && raw[end..].starts_with(b"\r\n") {
            out.truncate(out.len() - 2);
        }
        at = end;
    }
    out.extend_from_slice(&raw[at..]);
    Some(out)
}

/// A single-part message's body part: only the headers mail-builder writes for it.
fn rebuilt_body_only(text: String, ctype: &'static str) -> Vec<u8> {
    let mime = MimePart::new(ContentType::new(ctype).attribute("charset", "utf-8"), text);
    let mut out = Vec::new();
    mime.write_part(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer() -> Footer {
        Footer {
            text: Some("-- \nSent by Example".into()),
            html: Some("<p>Sent by <b>Example</b></p>".into()),
        }
    }

    fn reparse(raw: &[u8]) -> Vec<(String, String)> {
        let m = MessageParser::new().parse(raw).expect("parses");
        let mut parts = Vec::new();
        leaves(m.root_part(), &mut parts);
        parts
            .iter()
            .map(|p| {
                (
                    p.content_type()
                        .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")))
                        .unwrap_or_default(),
                    p.text().map(|t| t.to_string()).unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn single_part_text_gets_the_footer_and_keeps_its_headers() {
        let raw = b"From: a@example.test\r\nSubject: hi\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nOl=E1\r\n";
        let out = append_footer(raw, &footer()).expect("changed");
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("From: a@example.test\r\nSubject: hi\r\n"),
            "{text}"
        );
        let parts = reparse(&out);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].0, "text/plain");
        assert!(parts[0].1.starts_with("Olá"), "{:?}", parts[0].1);
        assert!(parts[0].1.contains("Sent by Example"));
    }

    #[test]
    fn alternative_parts_both_get_it_and_attachments_stay_byte_for_byte() {
        let attachment = "Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n";
        let raw = format!(
            "From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n\
             --outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n\
             --inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n\
             --inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>Hello</p></body></html>\r\n\
             --inner--\r\n\r\n--outer\r\n{attachment}--outer--\r\n"
        );
        let out = append_footer(raw.as_bytes(), &footer()).expect("changed");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains(attachment), "attachment untouched:\n{text}");
        let parts = reparse(&out);
        assert_eq!(parts.len(), 3, "{text}");
        assert_eq!(parts[0].0, "text/plain");
        assert!(parts[0].1.contains("Hello") && parts[0].1.contains("Sent by Example"));
        assert_eq!(parts[1].0, "text/html");
        assert!(
            parts[1]
                .1
                .contains("<p>Hello</p><p>Sent by <b>Example</b></p></body>"),
            "{}",
            parts[1].1
        );
        assert_eq!(parts[2].0, "application/pdf");
    }

    #[test]
    fn messages_without_body_text_are_left_alone() {
        let raw = b"From: a@example.test\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n";
        assert!(append_footer(raw, &footer()).is_none());
    }
}
