//! 8-bit to 7-bit MIME conversion, for servers that do not advertise 8BITMIME.
//!
//! RFC 6152 §3 forbids sending 8-bit data to such a server; like Postfix and Sendmail we
//! re-encode the MIME leaf parts that carry 8-bit bodies instead of bouncing the message.
//!
//! The message is spliced, never rebuilt: mail-parser only tells where each part's header
//! fields and body lie, and every byte outside the re-encoded bodies and their
//! Content-Transfer-Encoding fields is copied as it was. Rebuilding with a builder would
//! refold and reorder header fields, which the DKIM signature made after this step (and any
//! signature made before it on the untouched headers) depends on.
//!
//! 8-bit header fields cannot be downgraded without SMTPUTF8 (RFC 6532), so they are an
//! error rather than something to guess at.

use std::borrow::Cow;

use base64::Engine;
use mail_parser::{HeaderName, MessageId, MessageParser, MessagePart, PartFlags, Source};

/// Why a message could not be converted to 7-bit MIME.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DowngradeError {
    /// The bytes are not an RFC 5322 message (no header and no blank line).
    #[error("8-bit data that is not an RFC 5322 message")]
    Unparsable,
    /// A header field holds 8-bit bytes, which only SMTPUTF8 can carry.
    #[error("8-bit bytes in header field {name:?}: sending it needs SMTPUTF8")]
    EightBitHeader {
        /// The field name as written, or the start of the line that is not a field.
        name: String,
    },
    /// A `message/global` part holds 8-bit content.
    #[error("8-bit content in a message/global part: sending it needs SMTPUTF8")]
    MessageGlobal,
    /// An 8-bit body declares a Content-Transfer-Encoding this module does not know, so its
    /// content cannot be recovered to be re-encoded.
    #[error("8-bit content in a part with Content-Transfer-Encoding {encoding:?}")]
    UnknownTransferEncoding {
        /// The declared encoding.
        encoding: String,
    },
    /// An 8-bit `multipart/*` or `message/*` part the parser kept as an opaque leaf (damaged
    /// or nested too deep); RFC 2045 §6.4 forbids transfer-encoding such parts.
    #[error("8-bit content in a {content_type} part that could not be parsed into its parts")]
    UnparsedContainer {
        /// The declared `type/subtype`.
        content_type: String,
    },
    /// The parser stopped at its part or depth limit, so the offsets of the rest of the
    /// message are unknown.
    #[error("the message has too many MIME parts or too deep a nesting to be converted")]
    TooComplex,
    /// 8-bit bytes in a multipart preamble or epilogue, or in a damaged structure, where no
    /// transfer encoding applies.
    #[error("8-bit bytes at offset {offset} outside any MIME part body")]
    EightBitOutsidePart {
        /// Offset in the input.
        offset: usize,
    },
}

/// Whether the message holds any byte of 0x80 or above, i.e. whether sending it as is
/// needs `BODY=8BITMIME`.
pub fn is_eight_bit(message: &[u8]) -> bool {
    !message.is_ascii()
}

/// Returns `message` as 7-bit MIME.
///
/// Every leaf part whose body holds 8-bit bytes, or that is declared
/// `Content-Transfer-Encoding: binary`, is re-encoded: `text/*` parts (and parts without a
/// Content-Type) as quoted-printable, other parts as base64, with their
/// Content-Transfer-Encoding field replaced or added. A `multipart/*` or `message/rfc822`
/// part around re-encoded content that was declared `8bit` or `binary` is relabelled `7bit`,
/// and `MIME-Version: 1.0` is added to a message whose header gets a new encoding but has
/// no MIME-Version (without it the encoding field means nothing, RFC 2045 §4). Everything
/// else is copied byte for byte; a message without 8-bit or binary parts comes back equal.
pub fn to_seven_bit(message: &[u8]) -> Result<Vec<u8>, DowngradeError> {
    let parser = MessageParser::new()
        // Transfer-encoded message/rfc822 parts stay opaque leaves: they are 7-bit on the
        // wire already, and every offset then refers to the input, which is what is spliced.
        .max_encoded_nesting(0);
    let Some(parsed) = parser.parse(message) else {
        return if is_eight_bit(message) {
            Err(DowngradeError::Unparsable)
        } else {
            Ok(message.to_vec())
        };
    };
    if parsed
        .messages()
        .any(|nested| !matches!(nested.source(), Source::Raw))
    {
        return Err(DowngradeError::TooComplex);
    }

    // message/global first: its nested header fields are usually UTF-8 as well, and naming
    // the part says more than naming one of those fields.
    for part in parsed.parts() {
        if part.is_message()
            && part.is_content_type("message", "global")
            && !body_of(message, &part).is_ascii()
        {
            return Err(DowngradeError::MessageGlobal);
        }
    }
    for part in parsed.parts() {
        check_headers(message, &part)?;
    }

    // A part cut by a limit runs to the end of its source, swallowing the delimiters that
    // follow; re-encoding it would bury the rest of the structure in its body. A 7-bit
    // message like that is still returned as it is.
    let limited = parsed
        .parts()
        .any(|part| part.flags().contains(PartFlags::LIMIT_REACHED));
    if limited && is_eight_bit(message) {
        return Err(DowngradeError::TooComplex);
    }

    let mut plan = Plan::default();
    for part in parsed.parts() {
        if !(part.is_multipart() || part.is_message()) {
            plan.leaf(message, &part)?;
        }
    }
    if limited && !plan.edits.is_empty() {
        return Err(DowngradeError::TooComplex);
    }
    plan.bodies.sort_unstable();
    for part in parsed.parts() {
        if part.is_multipart() || part.is_message() {
            plan.container(&part);
        }
    }
    for nested in parsed.messages() {
        if plan.relabelled.contains(&nested.id())
            && !nested.headers().contains(HeaderName::MimeVersion)
        {
            let at = header_end(&nested.root_part());
            plan.insert(at, Rank::MimeVersion, b"MIME-Version: 1.0\r\n".to_vec());
        }
    }

    if let Some(offset) = uncovered_eight_bit(message, &plan.bodies) {
        return Err(DowngradeError::EightBitOutsidePart { offset });
    }
    if plan.edits.is_empty() {
        return Ok(message.to_vec());
    }
    Ok(plan.apply(message))
}

/// Content-Transfer-Encoding of a part, from its first token (RFC 2045 §6.1 allows comments
/// after it).
#[derive(Debug, PartialEq, Eq)]
enum Cte {
    Identity,
    Binary,
    Base64,
    QuotedPrintable,
    Unknown(String),
}

impl Cte {
    fn of(part: &MessagePart<'_>) -> Self {
        let Some(value) = part.content_transfer_encoding() else {
            return Cte::Identity;
        };
        let token = value
            .split(|c: char| c == '(' || c.is_ascii_whitespace())
            .next()
            .unwrap_or_default();
        match token.to_ascii_lowercase().as_str() {
            "" | "7bit" | "8bit" => Cte::Identity,
            "binary" => Cte::Binary,
            "base64" => Cte::Base64,
            "quoted-printable" => Cte::QuotedPrintable,
            _ => Cte::Unknown(value.to_owned()),
        }
    }
}

/// Tie-break for edits at one offset: MIME-Version goes before the field it gives a
/// meaning to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    Replace,
    MimeVersion,
    TransferEncoding,
}

#[derive(Debug)]
struct Edit {
    start: usize,
    end: usize,
    rank: Rank,
    bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Plan {
    edits: Vec<Edit>,
    /// Body ranges that are re-encoded; the only places 8-bit bytes may remain in the input.
    bodies: Vec<(usize, usize)>,
    /// Messages one of whose header blocks got a new Content-Transfer-Encoding.
    relabelled: Vec<MessageId>,
}

impl Plan {
    fn insert(&mut self, at: usize, rank: Rank, bytes: Vec<u8>) {
        self.edits.push(Edit {
            start: at,
            end: at,
            rank,
            bytes,
        });
    }

    fn leaf(&mut self, message: &[u8], part: &MessagePart<'_>) -> Result<(), DowngradeError> {
        let (start, end) = (part.offset_body() as usize, part.offset_end() as usize);
        let body = body_of(message, part);
        let cte = Cte::of(part);
        if body.is_empty() || (body.is_ascii() && cte != Cte::Binary) {
            return Ok(());
        }
        let content_type = part.content_type();
        if let Some(ct) = &content_type {
            let ctype = ct.ctype();
            if ctype.eq_ignore_ascii_case("multipart") || ctype.eq_ignore_ascii_case("message") {
                return Err(DowngradeError::UnparsedContainer {
                    content_type: format!("{ctype}/{}", ct.subtype().unwrap_or_default()),
                });
            }
        }
        let content: Cow<'_, [u8]> = match &cte {
            // Stray 8-bit bytes in an already encoded body: re-encode what a reader decodes.
            Cte::Base64 | Cte::QuotedPrintable => part.decoded(),
            Cte::Unknown(encoding) => {
                return Err(DowngradeError::UnknownTransferEncoding {
                    encoding: encoding.clone(),
                });
            }
            Cte::Identity | Cte::Binary => Cow::Borrowed(body),
        };
        // No Content-Type (or one that does not parse) means text/plain, RFC 2045 §5.2.
        let is_text = content_type
            .as_ref()
            .is_none_or(|ct| ct.ctype().eq_ignore_ascii_case("text"));
        // A binary text body may hold bare CRs and LFs that are content, not line breaks;
        // only base64 keeps them exactly.
        let (encoded, label) = if is_text && cte != Cte::Binary {
            (quoted_printable(&content), "quoted-printable")
        } else {
            (base64_lines(&content, body.ends_with(b"\n")), "base64")
        };
        self.edits.push(Edit {
            start,
            end,
            rank: Rank::Replace,
            bytes: encoded,
        });
        self.bodies.push((start, end));
        self.relabel(part, label, |_| true);
        Ok(())
    }

    /// Relabels a multipart or message/rfc822 part declared 8bit or binary whose content was
    /// re-encoded: RFC 2045 §6.4 says the label of a composite part covers its whole content.
    fn container(&mut self, part: &MessagePart<'_>) {
        let (start, end) = (part.offset_body() as usize, part.offset_end() as usize);
        // `bodies` is sorted and disjoint: the first one starting inside the container is
        // inside it if any is.
        let first = self
            .bodies
            .partition_point(|&(body_start, _)| body_start < start);
        if self
            .bodies
            .get(first)
            .is_some_and(|&(_, body_end)| body_end <= end)
        {
            self.relabel(part, "7bit", |value| {
                let value = value.trim_ascii();
                value.eq_ignore_ascii_case(b"8bit") || value.eq_ignore_ascii_case(b"binary")
            });
        }
    }

    /// Points every Content-Transfer-Encoding field of `part` whose value passes `replace`
    /// at `label`, or adds the field when the part has none.
    fn relabel(&mut self, part: &MessagePart<'_>, label: &str, replace: impl Fn(&[u8]) -> bool) {
        let mut found = false;
        let mut changed = false;
        for header in part.headers() {
            if header.name() != HeaderName::ContentTransferEncoding {
                continue;
            }
            found = true;
            let value = header.raw_value();
            if replace(value) {
                let mut bytes = Vec::with_capacity(label.len() + 3);
                bytes.push(b' ');
                bytes.extend_from_slice(label.as_bytes());
                bytes.extend_from_slice(line_break_of(value));
                self.edits.push(Edit {
                    start: header.offset_start() as usize,
                    end: header.offset_end() as usize,
                    rank: Rank::Replace,
                    bytes,
                });
                changed = true;
            }
        }
        // A composite part without the field is 7bit already (RFC 2045 §6.1 default).
        if !found && label != "7bit" {
            let field = format!("Content-Transfer-Encoding: {label}\r\n");
            self.insert(header_end(part), Rank::TransferEncoding, field.into_bytes());
            changed = true;
        }
        if changed && !self.relabelled.contains(&part.message().id()) {
            self.relabelled.push(part.message().id());
        }
    }

    fn apply(mut self, message: &[u8]) -> Vec<u8> {
        self.edits.sort_by_key(|edit| (edit.start, edit.rank));
        let grown: usize = self.edits.iter().map(|edit| edit.bytes.len()).sum();
        let mut out = Vec::with_capacity(message.len() + grown);
        let mut copied = 0;
        for edit in &self.edits {
            // Edits never overlap: bodies, header values and header-block ends are disjoint
            // ranges. Clamping keeps a broken offset from duplicating bytes.
            let start = edit.start.clamp(copied, message.len());
            out.extend_from_slice(message.get(copied..start).unwrap_or_default());
            out.extend_from_slice(&edit.bytes);
            copied = edit.end.clamp(start, message.len());
        }
        out.extend_from_slice(message.get(copied..).unwrap_or_default());
        out
    }
}

fn body_of<'m>(message: &'m [u8], part: &MessagePart<'_>) -> &'m [u8] {
    message
        .get(part.offset_body() as usize..part.offset_end() as usize)
        .unwrap_or_default()
}

/// Where a new header field goes: after the last field, before the blank line.
fn header_end(part: &MessagePart<'_>) -> usize {
    let body = part.offset_body() as usize;
    part.headers()
        .iter()
        .map(|header| header.offset_end() as usize)
        .max()
        .map_or(part.offset_header() as usize, |end| end.min(body))
}

/// The line break a replaced field value ends with, so a LF-only header block stays one.
fn line_break_of(value: &[u8]) -> &'static [u8] {
    if value.ends_with(b"\r\n") {
        b"\r\n"
    } else if value.ends_with(b"\n") {
        b"\n"
    } else {
        b""
    }
}

fn check_headers(message: &[u8], part: &MessagePart<'_>) -> Result<(), DowngradeError> {
    let block = part.raw_headers();
    if block.is_ascii() {
        return Ok(());
    }
    for header in part.headers() {
        let field = message
            .get(header.offset_field() as usize..header.offset_end() as usize)
            .unwrap_or_default();
        if !field.is_ascii() {
            return Err(DowngradeError::EightBitHeader {
                name: header.raw_name().to_owned(),
            });
        }
    }
    // A line the parser did not take as a field: name it by what precedes its colon.
    let at = block.iter().position(|&b| b >= 0x80).unwrap_or_default();
    let line_start = block[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = &block[line_start..];
    let name_end = line
        .iter()
        .position(|&b| b == b':' || b == b'\r' || b == b'\n')
        .unwrap_or(line.len());
    Err(DowngradeError::EightBitHeader {
        name: String::from_utf8_lossy(&line[..name_end]).into_owned(),
    })
}

/// The first 8-bit byte outside the re-encoded bodies (`bodies` sorted).
fn uncovered_eight_bit(message: &[u8], bodies: &[(usize, usize)]) -> Option<usize> {
    let mut from = 0;
    for &(start, end) in bodies {
        if let Some(offset) = first_eight_bit(message, from, start) {
            return Some(offset);
        }
        from = from.max(end);
    }
    first_eight_bit(message, from, message.len())
}

fn first_eight_bit(message: &[u8], from: usize, to: usize) -> Option<usize> {
    message
        .get(from..to)?
        .iter()
        .position(|&b| b >= 0x80)
        .map(|i| from + i)
}

/// RFC 2045 §6.7 rule 5: at most 76 characters per encoded line, soft break included.
const QP_LINE_MAX: usize = 76;
/// RFC 2045 §6.8: base64 lines of at most 76 characters.
const BASE64_LINE_MAX: usize = 76;

/// Quoted-printable for text: CRLF and bare LF are line breaks and come out as CRLF
/// (rules 4 and 5); a bare CR is data and comes out as `=0D`.
///
/// mail-builder has a quoted-printable encoder, but it is private to that crate, and
/// encodify (which it uses) is not a dependency of ours.
fn quoted_printable(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 2 + 8);
    let mut rest = data;
    while !rest.is_empty() {
        let (line, has_break, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(lf) => (&rest[..lf], true, &rest[lf + 1..]),
            None => (rest, false, &rest[rest.len()..]),
        };
        let line = if has_break {
            line.strip_suffix(b"\r").unwrap_or(line)
        } else {
            line
        };
        quoted_printable_line(line, &mut out);
        if has_break {
            out.extend_from_slice(b"\r\n");
        }
        rest = next;
    }
    out
}

fn quoted_printable_line(line: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut column = 0;
    for (i, &byte) in line.iter().enumerate() {
        let last = i + 1 == line.len();
        // Whitespace ending a line would be stripped in transit (rule 3), and the end of
        // the data is the end of a line too: a delimiter line or the end of the message
        // follows.
        let literal = match byte {
            b' ' | b'\t' => !last,
            b'=' => false,
            b'!'..=b'~' => true,
            _ => false,
        };
        let width = if literal { 1 } else { 3 };
        // Only the last token of a line may use the column a soft break's `=` needs.
        let room = if last { QP_LINE_MAX } else { QP_LINE_MAX - 1 };
        if column + width > room {
            out.extend_from_slice(b"=\r\n");
            column = 0;
        }
        if literal {
            out.push(byte);
        } else {
            out.extend_from_slice(&[
                b'=',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0x0F)],
            ]);
        }
        column += width;
    }
}

/// Base64 in CRLF-separated lines. `trailing_break` keeps a body that ended with a line
/// break (the end of a single-part message) ending with one.
fn base64_lines(data: &[u8], trailing_break: bool) -> Vec<u8> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = Vec::with_capacity(encoded.len() + encoded.len() / BASE64_LINE_MAX * 2 + 2);
    for (i, line) in encoded.as_bytes().chunks(BASE64_LINE_MAX).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(line);
    }
    if trailing_break {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::{Message, MessageParser};

    fn parse(raw: &[u8]) -> Message<'_> {
        MessageParser::new().parse(raw).expect("output parses")
    }

    /// The properties every output must have: 7-bit, lines within RFC 5322's 998.
    fn assert_wire_safe(out: &[u8]) {
        assert!(
            out.is_ascii(),
            "8-bit byte in {}",
            String::from_utf8_lossy(out)
        );
        for line in out.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(line.len() <= 998, "line of {} characters", line.len());
        }
    }

    fn convert(raw: &[u8]) -> Vec<u8> {
        let out = to_seven_bit(raw).expect("converts");
        assert_wire_safe(&out);
        out
    }

    fn qp_decode(encoded: &[u8]) -> Vec<u8> {
        let mut raw = b"Content-Transfer-Encoding: quoted-printable\r\n\r\n".to_vec();
        raw.extend_from_slice(encoded);
        parse(&raw).root_part().decoded().into_owned()
    }

    fn crlf(text: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        for (i, &b) in text.iter().enumerate() {
            if b == b'\n' && (i == 0 || text[i - 1] != b'\r') {
                out.push(b'\r');
            }
            out.push(b);
        }
        out
    }

    #[test]
    fn is_eight_bit_finds_any_high_byte() {
        assert!(!is_eight_bit(b"Subject: a\r\n\r\nplain\r\n"));
        assert!(is_eight_bit(b"Subject: a\r\n\r\npl\x80in\r\n"));
        assert!(is_eight_bit(b"\xff"));
        assert!(!is_eight_bit(b""));
    }

    #[test]
    fn single_part_text_becomes_quoted_printable() {
        let raw = "From: a@example.com\r\n\
                   Subject: test\r\n\
                   MIME-Version: 1.0\r\n\
                   Content-Type: text/plain; charset=utf-8\r\n\
                   Content-Transfer-Encoding: 8bit\r\n\
                   X-After: kept\r\n\
                   \r\n\
                   Grüße aus Köln = 100 €\r\n\
                   zweite Zeile\r\n";
        let out = convert(raw.as_bytes());
        let expected = "From: a@example.com\r\n\
                        Subject: test\r\n\
                        MIME-Version: 1.0\r\n\
                        Content-Type: text/plain; charset=utf-8\r\n\
                        Content-Transfer-Encoding: quoted-printable\r\n\
                        X-After: kept\r\n\
                        \r\n\
                        Gr=C3=BC=C3=9Fe aus K=C3=B6ln =3D 100 =E2=82=AC\r\n\
                        zweite Zeile\r\n";
        assert_eq!(String::from_utf8_lossy(&out), expected);
        assert_eq!(
            parse(&out).body_text(0).as_deref(),
            Some("Grüße aus Köln = 100 €\r\nzweite Zeile\r\n")
        );
    }

    #[test]
    fn seven_bit_message_is_returned_unchanged() {
        let raw = b"From: a@example.com\r\n\
                    Content-Type: multipart/mixed; boundary=\"b\"\r\n\
                    Content-Transfer-Encoding: 8bit\r\n\
                    \r\n\
                    preamble\r\n\
                    --b\r\n\
                    Content-Transfer-Encoding: 8bit\r\n\
                    \r\n\
                    plain\r\n\
                    --b--\r\n";
        assert_eq!(convert(raw), raw);
        assert_eq!(
            to_seven_bit(b"no header at all").as_deref(),
            Ok(&b"no header at all"[..])
        );
    }

    #[test]
    fn multipart_mixed_converts_only_eight_bit_parts() {
        let seven_bit_part = "--b\r\n\
                              Content-Type: text/plain; charset=us-ascii\r\n\
                              \r\n\
                              Just ASCII, left alone.\r\n";
        let html = "<p>Café — naïve</p>\r\n<p>second</p>";
        let binary: Vec<u8> = (0..=255u8).chain([0xFF, 0x00, b'\r', b'\n']).collect();
        let mut raw = Vec::new();
        raw.extend_from_slice(
            b"From: a@example.com\r\n\
              MIME-Version: 1.0\r\n\
              Content-Type: multipart/mixed;\r\n \
              boundary=\"b\"\r\n\
              \r\n\
              This is a preamble.\r\n",
        );
        raw.extend_from_slice(seven_bit_part.as_bytes());
        raw.extend_from_slice(
            b"--b\r\n\
              Content-Type: text/html; charset=utf-8\r\n\
              Content-Transfer-Encoding: 8bit\r\n\
              \r\n",
        );
        raw.extend_from_slice(html.as_bytes());
        raw.extend_from_slice(
            b"\r\n--b\r\n\
              Content-Type: application/octet-stream\r\n\
              Content-Disposition: attachment; filename=blob.bin\r\n\
              \r\n",
        );
        raw.extend_from_slice(&binary);
        raw.extend_from_slice(b"\r\n--b--\r\nepilogue\r\n");

        let out = convert(&raw);
        let text = String::from_utf8_lossy(&out);
        // Header block (folding included), preamble and the 7-bit part are untouched.
        assert!(out.starts_with(&raw[..raw.windows(3).position(|w| w == b"--b").unwrap_or(0)]));
        assert!(text.contains(seven_bit_part));
        assert!(text.ends_with("\r\n--b--\r\nepilogue\r\n"));
        assert!(text.contains(
            "Content-Type: text/html; charset=utf-8\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        ));
        assert!(text.contains(
            "Content-Disposition: attachment; filename=blob.bin\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n"
        ));

        let message = parse(&out);
        let leaves: Vec<_> = message.parts().filter(|p| !p.is_multipart()).collect();
        assert_eq!(leaves.len(), 3);
        assert_eq!(leaves[0].text().as_deref(), Some("Just ASCII, left alone."));
        assert_eq!(leaves[1].text().as_deref(), Some(html));
        assert_eq!(leaves[2].decoded().as_ref(), binary.as_slice());
    }

    #[test]
    fn nested_alternative_inside_mixed() {
        let raw = "MIME-Version: 1.0\r\n\
                   Content-Type: multipart/mixed; boundary=outer\r\n\
                   Content-Transfer-Encoding: 8bit\r\n\
                   \r\n\
                   --outer\r\n\
                   Content-Type: multipart/alternative; boundary=inner\r\n\
                   \r\n\
                   --inner\r\n\
                   Content-Type: text/plain; charset=utf-8\r\n\
                   \r\n\
                   Ünïcödé plain\r\n\
                   --inner\r\n\
                   Content-Type: text/html; charset=utf-8\r\n\
                   \r\n\
                   <b>Ünïcödé</b>\r\n\
                   --inner--\r\n\
                   --outer\r\n\
                   Content-Type: text/plain\r\n\
                   \r\n\
                   ascii tail\r\n\
                   --outer--\r\n";
        let out = convert(raw.as_bytes());
        let text = String::from_utf8_lossy(&out);
        // The outer 8bit label no longer holds.
        assert!(text.contains("boundary=outer\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"));
        assert!(text.contains("--outer\r\nContent-Type: text/plain\r\n\r\nascii tail\r\n"));
        let message = parse(&out);
        assert_eq!(message.body_text(0).as_deref(), Some("Ünïcödé plain"));
        assert_eq!(message.body_html(0).as_deref(), Some("<b>Ünïcödé</b>"));
        let leaves: Vec<_> = message.parts().filter(|p| !p.is_multipart()).collect();
        assert_eq!(leaves.len(), 3);
        assert_eq!(leaves[2].text().as_deref(), Some("ascii tail"));
    }

    #[test]
    fn message_rfc822_is_converted_inside() {
        let raw = "MIME-Version: 1.0\r\n\
                   Content-Type: multipart/mixed; boundary=b\r\n\
                   \r\n\
                   --b\r\n\
                   Content-Type: text/plain\r\n\
                   \r\n\
                   Forwarded below.\r\n\
                   --b\r\n\
                   Content-Type: message/rfc822\r\n\
                   Content-Transfer-Encoding: 8bit\r\n\
                   \r\n\
                   From: b@example.com\r\n\
                   Subject: inner\r\n\
                   \r\n\
                   Inneres Ä\r\n\
                   --b--\r\n";
        let out = convert(raw.as_bytes());
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains(
                "Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            )
        );
        // The embedded message had no MIME header: it gets one for its new encoding.
        assert!(text.contains(
            "Subject: inner\r\n\
             MIME-Version: 1.0\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\
             \r\n\
             Inneres =C3=84\r\n--b--"
        ));
        let message = parse(&out);
        let nested = message
            .parts()
            .find_map(|part| part.nested())
            .expect("nested message");
        assert_eq!(nested.subject(), Some("inner"));
        assert_eq!(nested.body_text(0).as_deref(), Some("Inneres Ä"));
    }

    #[test]
    fn message_global_is_refused() {
        let raw = "MIME-Version: 1.0\r\n\
                   Content-Type: message/global\r\n\
                   \r\n\
                   Subject: Grüße\r\n\
                   \r\n\
                   Körper\r\n";
        assert_eq!(
            to_seven_bit(raw.as_bytes()),
            Err(DowngradeError::MessageGlobal)
        );
    }

    #[test]
    fn no_content_type_means_text_plain() {
        let raw = "From: a@example.com\r\nSubject: legacy\r\n\r\nnaïve café\r\n";
        let out = convert(raw.as_bytes());
        assert_eq!(
            String::from_utf8_lossy(&out),
            "From: a@example.com\r\n\
             Subject: legacy\r\n\
             MIME-Version: 1.0\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\
             \r\n\
             na=C3=AFve caf=C3=A9\r\n"
        );
        assert_eq!(parse(&out).body_text(0).as_deref(), Some("naïve café\r\n"));
    }

    #[test]
    fn eight_bit_headers_are_refused() {
        let top = "From: a@example.com\r\nSubject: Grüße\r\n\r\nbody\r\n";
        assert_eq!(
            to_seven_bit(top.as_bytes()),
            Err(DowngradeError::EightBitHeader {
                name: "Subject".into()
            })
        );
        let in_part = "MIME-Version: 1.0\r\n\
                       Content-Type: multipart/mixed; boundary=b\r\n\
                       \r\n\
                       --b\r\n\
                       Content-Type: application/pdf; name=\"Rechnung-März.pdf\"\r\n\
                       Content-Transfer-Encoding: base64\r\n\
                       \r\n\
                       JVBERi0xLjQK\r\n\
                       --b--\r\n";
        assert_eq!(
            to_seven_bit(in_part.as_bytes()),
            Err(DowngradeError::EightBitHeader {
                name: "Content-Type".into()
            })
        );
    }

    #[test]
    fn binary_transfer_encoding_becomes_base64() {
        // 7-bit bytes, but bare CR and LF and a long line: binary is not SMTP-safe either.
        let body = format!("a\rb\nc{}\r\n", "x".repeat(1200));
        let raw = format!(
            "MIME-Version: 1.0\r\n\
             Content-Type: text/plain\r\n\
             Content-Transfer-Encoding: binary\r\n\
             \r\n{body}"
        );
        let out = convert(raw.as_bytes());
        assert!(
            String::from_utf8_lossy(&out).contains("Content-Transfer-Encoding: base64\r\n\r\n")
        );
        assert!(out.ends_with(b"\r\n"));
        assert_eq!(parse(&out).root_part().decoded().as_ref(), body.as_bytes());
    }

    #[test]
    fn long_lines_get_soft_breaks() {
        let line: String = "é".repeat(500) + &"a".repeat(2000);
        let raw = format!(
            "Content-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\n\
             \r\n{line}\r\nshort\r\n"
        );
        let out = convert(raw.as_bytes());
        let body_start = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let body = &out[body_start..];
        let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
        assert!(lines.len() > 3000 / 76);
        for line in &lines {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(
                line.len() <= QP_LINE_MAX,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            parse(&out).body_text(0).as_deref(),
            Some(format!("{line}\r\nshort\r\n").as_str())
        );
    }

    #[test]
    fn eight_bit_preamble_is_refused() {
        let raw = "MIME-Version: 1.0\r\n\
                   Content-Type: multipart/mixed; boundary=b\r\n\
                   \r\n\
                   Präambel\r\n\
                   --b\r\n\
                   \r\n\
                   ok\r\n\
                   --b--\r\n";
        assert!(matches!(
            to_seven_bit(raw.as_bytes()),
            Err(DowngradeError::EightBitOutsidePart { .. })
        ));
    }

    #[test]
    fn unknown_transfer_encoding_is_refused() {
        let raw = b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin \xe9\r\n";
        assert_eq!(
            to_seven_bit(raw),
            Err(DowngradeError::UnknownTransferEncoding {
                encoding: "x-uuencode".into()
            })
        );
    }

    #[test]
    fn stray_eight_bit_in_encoded_parts_is_re_encoded() {
        let raw = b"MIME-Version: 1.0\r\n\
                    Content-Type: multipart/mixed; boundary=b\r\n\
                    \r\n\
                    --b\r\n\
                    Content-Type: text/plain; charset=utf-8\r\n\
                    Content-Transfer-Encoding: quoted-printable\r\n\
                    \r\n\
                    caf\xc3\xa9 =C3=A9t=C3=A9\r\n\
                    --b\r\n\
                    Content-Type: image/png\r\n\
                    Content-Transfer-Encoding: base64\r\n\
                    \r\n\
                    iVBO\xffRw0K\r\n\
                    --b--\r\n";
        let out = convert(raw);
        let message = parse(&out);
        let leaves: Vec<_> = message.parts().filter(|p| !p.is_multipart()).collect();
        assert_eq!(leaves[0].text().as_deref(), Some("café été"));
        // What a reader decodes from the damaged base64: the stray byte skipped.
        assert_eq!(leaves[1].decoded().as_ref(), b"\x89PNG\r\n");
    }

    #[test]
    fn parser_limits_are_refused() {
        let mut raw = b"MIME-Version: 1.0\r\n".to_vec();
        for depth in 0..70 {
            raw.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=b{depth}\r\n\r\n--b{depth}\r\n")
                    .as_bytes(),
            );
        }
        raw.extend_from_slice(b"Content-Type: text/plain\r\n\r\n");
        let seven_bit = [raw.as_slice(), b"deep\r\n"].concat();
        assert_eq!(to_seven_bit(&seven_bit), Ok(seven_bit.clone()));
        let eight_bit = [raw.as_slice(), b"tief \xc3\xa4\r\n"].concat();
        assert_eq!(to_seven_bit(&eight_bit), Err(DowngradeError::TooComplex));
    }

    #[test]
    fn part_without_header_fields_gets_one() {
        let raw = b"MIME-Version: 1.0\r\n\
                    Content-Type: multipart/mixed; boundary=b\r\n\
                    \r\n\
                    --b\r\n\
                    \r\n\
                    caf\xc3\xa9\r\n\
                    --b--\r\n";
        let out = convert(raw);
        assert!(String::from_utf8_lossy(&out).contains(
            "--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n--b--"
        ));
    }

    #[test]
    fn quoted_printable_encodes_trailing_whitespace_and_specials() {
        assert_eq!(quoted_printable(b""), b"");
        assert_eq!(quoted_printable(b"a b \r\nc\t\r\n"), b"a b=20\r\nc=09\r\n");
        // End of data is the end of a line as well.
        assert_eq!(quoted_printable(b"end "), b"end=20");
        assert_eq!(quoted_printable(b"x=y\r\n"), b"x=3Dy\r\n");
        assert_eq!(quoted_printable(b"\x00\x7f\xff"), b"=00=7F=FF");
        // Bare LF is a line break, bare CR is data.
        assert_eq!(quoted_printable(b"a\nb\rc\r\r\n"), b"a\r\nb=0Dc=0D\r\n");
        assert_eq!(quoted_printable(b"\r\n\r\n"), b"\r\n\r\n");
    }

    #[test]
    fn quoted_printable_soft_breaks_at_the_limit() {
        // 76 characters fit on a line without a soft break.
        let exact = vec![b'a'; 76];
        assert_eq!(quoted_printable(&exact), exact);
        // 77 need one; the first line then holds 75 plus the `=`.
        let over = vec![b'a'; 77];
        assert_eq!(
            quoted_printable(&over),
            [&[b'a'; 75][..], b"=\r\n", b"aa"].concat()
        );
        // An escape is never split, and an escape may end a 76-character line.
        let mut escaped = vec![b'a'; 73];
        escaped.push(0xE9);
        assert_eq!(
            quoted_printable(&escaped),
            [&escaped[..73], b"=E9"].concat()
        );
        escaped.push(b'b');
        assert_eq!(
            quoted_printable(&escaped),
            [&escaped[..73], b"=\r\n=E9b"].concat()
        );
    }

    #[test]
    fn quoted_printable_round_trips() {
        // Deterministic pseudo-random text: every byte value, many line breaks and spaces.
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        for len in [1usize, 2, 75, 76, 77, 152, 1000, 5000] {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    match state % 8 {
                        0 => b' ',
                        1 => b'\n',
                        2 => b'\r',
                        3 => b'=',
                        _ => (state >> 8) as u8,
                    }
                })
                .collect();
            let encoded = quoted_printable(&data);
            assert!(encoded.is_ascii());
            for line in encoded.split(|&b| b == b'\n') {
                assert!(line.strip_suffix(b"\r").is_some() || !line.contains(&b'\r'));
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                assert!(line.len() <= QP_LINE_MAX);
                assert!(!matches!(line.last(), Some(b' ' | b'\t')));
            }
            assert_eq!(qp_decode(&encoded), crlf(&data), "length {len}");
        }
    }

    #[test]
    fn base64_lines_are_76_characters() {
        let data = vec![0xAB; 200];
        let out = base64_lines(&data, false);
        let lines: Vec<&[u8]> = out.split(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[..3].iter().all(|line| line.len() == 77));
        assert!(!out.ends_with(b"\n"));
        assert!(base64_lines(&data, true).ends_with(b"s=\r\n"));
        assert_eq!(base64_lines(b"", false), b"");
    }
}
