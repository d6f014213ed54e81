//! Server-side SMTP framing shared by ingress and the sink: reading pipelined commands and
//! DATA with smtp-proto, batching replies, and upgrading a connection with STARTTLS.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use smtp_proto::{
    Request,
    request::receiver::{DataReceiver, RequestReceiver},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// A client connection, before or after TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What the client sent next.
#[derive(Debug)]
pub enum Incoming {
    Request(Request<String>),
    /// A line that is not a valid command; the parser has skipped past it.
    Invalid(smtp_proto::Error),
    /// The client closed the connection.
    Closed,
}

/// The outcome of reading a DATA section.
#[derive(Debug)]
pub enum Data {
    /// The message, dot-stuffing undone, ending with CRLF.
    Message(Vec<u8>),
    /// The message exceeded the limit; it was read to its end and discarded.
    TooLarge,
    Closed,
}

const READ_CHUNK: usize = 16 * 1024;

/// Longest command line accepted, CRLF included. RFC 5321 4.5.3.1.4 says 512 but lets
/// extensions raise it (SMTPUTF8 addresses, AUTH initial responses); 4096 as smtp-proto.
pub const MAX_COMMAND_LINE: usize = 4096;

/// Buffered SMTP I/O over one connection. Replies are queued and flushed only when the
/// client's input is exhausted, so a pipelined batch gets its replies in one write, in order.
pub struct SmtpIo {
    conn: Option<Conn>,
    inbuf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
    receiver: RequestReceiver,
    /// Inside an over-long command line: input is dropped up to its LF.
    skipping_line: bool,
}

impl SmtpIo {
    pub fn new(conn: Conn) -> SmtpIo {
        SmtpIo {
            conn: Some(conn),
            inbuf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            out: Vec::with_capacity(1024),
            receiver: RequestReceiver::default(),
            skipping_line: false,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.conn, Some(Conn::Tls(_)))
    }

    /// TLS protocol and cipher, for Received headers and logs.
    pub fn tls_info(&self) -> Option<(String, String)> {
        match &self.conn {
            Some(Conn::Tls(s)) => {
                let (_, session) = s.get_ref();
                Some((
                    session
                        .protocol_version()
                        .map(|v| format!("{v:?}"))
                        .unwrap_or_default(),
                    session
                        .negotiated_cipher_suite()
                        .map(|c| format!("{:?}", c.suite()))
                        .unwrap_or_default(),
                ))
            }
            _ => None,
        }
    }

    fn conn(&mut self) -> io::Result<&mut Conn> {
        self.conn.as_mut().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "connection lost in TLS upgrade",
            )
        })
    }

    /// Queues one reply line; `text` may hold several lines separated by `\n`.
    pub fn reply(&mut self, code: u16, esc: &str, text: &str) {
        let lines: Vec<&str> = text.split('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            if esc.is_empty() {
                self.out
                    .extend_from_slice(format!("{code}{sep}{line}\r\n").as_bytes());
            } else {
                self.out
                    .extend_from_slice(format!("{code}{sep}{esc} {line}\r\n").as_bytes());
            }
        }
    }

    /// Queues bytes already formatted as replies (e.g. an EHLO response).
    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let conn = self.conn()?;
        conn.write_all(&out).await?;
        conn.flush().await?;
        self.out = out;
        self.out.clear();
        Ok(())
    }

    /// True when the client already sent more than has been parsed (pipelining).
    pub fn has_buffered_input(&self) -> bool {
        self.pos < self.inbuf.len()
    }

    async fn fill(&mut self, timeout: Duration) -> io::Result<usize> {
        // Replies are owed before we wait for the client.
        self.flush().await?;
        self.inbuf.drain(..self.pos);
        self.pos = 0;
        let start = self.inbuf.len();
        self.inbuf.resize(start + READ_CHUNK, 0);
        let read = {
            let conn = self.conn.as_mut().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    "connection lost in TLS upgrade",
                )
            })?;
            let fut = conn.read(&mut self.inbuf[start..]);
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "client timed out")),
            }
        };
        match read {
            Ok(n) => {
                self.inbuf.truncate(start + n);
                Ok(n)
            }
            Err(e) => {
                self.inbuf.truncate(start);
                Err(e)
            }
        }
    }

    /// Reads the next command, waiting at most `timeout` for the client. A command line
    /// longer than [`MAX_COMMAND_LINE`] is skipped whole and reported as
    /// `Invalid(ResponseTooLong)`, so its tail is never read as a command.
    pub async fn next_request(&mut self, timeout: Duration) -> io::Result<Incoming> {
        loop {
            let rest = &self.inbuf[self.pos..];
            if self.skipping_line {
                match rest.iter().position(|&b| b == b'\n') {
                    Some(lf) => {
                        self.pos += lf + 1;
                        self.skipping_line = false;
                        continue;
                    }
                    None => self.pos = self.inbuf.len(),
                }
            } else {
                match rest.iter().position(|&b| b == b'\n') {
                    Some(lf) if lf + 1 > MAX_COMMAND_LINE => {
                        self.pos += lf + 1;
                        return Ok(Incoming::Invalid(smtp_proto::Error::ResponseTooLong));
                    }
                    Some(lf) => {
                        let line = &self.inbuf[self.pos..self.pos + lf + 1];
                        let mut iter = line.iter();
                        let result = self.receiver.ingest(&mut iter).map(Request::into_owned);
                        self.pos += lf + 1 - iter.len();
                        self.receiver = RequestReceiver::default();
                        match result {
                            Ok(req) => return Ok(Incoming::Request(req)),
                            Err(smtp_proto::Error::NeedsMoreData { .. }) => {
                                return Ok(Incoming::Invalid(smtp_proto::Error::SyntaxError {
                                    syntax: "command",
                                }));
                            }
                            Err(e) => return Ok(Incoming::Invalid(e)),
                        }
                    }
                    None if rest.len() > MAX_COMMAND_LINE => {
                        self.pos = self.inbuf.len();
                        self.skipping_line = true;
                        return Ok(Incoming::Invalid(smtp_proto::Error::ResponseTooLong));
                    }
                    None => {}
                }
            }
            if self.fill(timeout).await? == 0 {
                return Ok(Incoming::Closed);
            }
        }
    }

    /// Reads one raw line (an AUTH continuation), without its line ending. `None` when the
    /// client closed the connection or sent a line longer than `max_len`.
    pub async fn read_line(
        &mut self,
        max_len: usize,
        timeout: Duration,
    ) -> io::Result<Option<String>> {
        loop {
            if let Some(lf) = self.inbuf[self.pos..].iter().position(|&b| b == b'\n') {
                let line = &self.inbuf[self.pos..self.pos + lf];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let text = String::from_utf8_lossy(line).into_owned();
                self.pos += lf + 1;
                return Ok((text.len() <= max_len).then_some(text));
            }
            if self.inbuf.len() - self.pos > max_len {
                return Ok(None);
            }
            if self.fill(timeout).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads a DATA section up to `<CRLF>.<CRLF>`, undoing dot-stuffing; keeps at most
    /// `max_size` octets (the rest is read and dropped so the session stays in sync).
    pub async fn read_data(&mut self, max_size: usize, timeout: Duration) -> io::Result<Data> {
        let mut receiver = DataReceiver::new();
        let mut message = Vec::with_capacity(8192);
        let mut too_large = false;
        loop {
            if self.pos < self.inbuf.len() {
                let mut iter = self.inbuf[self.pos..].iter();
                let done = receiver.ingest(&mut iter, &mut message);
                self.pos = self.inbuf.len() - iter.len();
                if message.len() > max_size {
                    too_large = true;
                    // Keep the tail so the terminator state stays correct; drop the rest.
                    let keep = message.len().min(4);
                    message.drain(..message.len() - keep);
                }
                if done {
                    return Ok(if too_large {
                        Data::TooLarge
                    } else {
                        Data::Message(message)
                    });
                }
            }
            if self.fill(timeout).await? == 0 {
                return Ok(Data::Closed);
            }
        }
    }

    /// Upgrades to TLS after a `220` to STARTTLS. Anything the client pipelined after the
    /// STARTTLS command is discarded: it was sent in clear and must not be trusted
    /// (the CVE-2011-0411 command injection).
    pub async fn start_tls(&mut self, acceptor: &TlsAcceptor, timeout: Duration) -> io::Result<()> {
        self.flush().await?;
        self.inbuf.clear();
        self.pos = 0;
        self.receiver = RequestReceiver::default();
        self.skipping_line = false;
        let Some(Conn::Plain(tcp)) = self.conn.take() else {
            return Err(io::Error::other("TLS already active"));
        };
        let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        self.conn = Some(Conn::Tls(Box::new(tls)));
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        if let Ok(conn) = self.conn() {
            let _ = conn.shutdown().await;
        }
    }
}

/// Accepts a TLS connection from the first byte (implicit TLS, port 465).
pub async fn accept_implicit_tls(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> io::Result<Conn> {
    let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(Conn::Tls(Box::new(tls)))
}

pub fn acceptor(config: Arc<rustls::ServerConfig>) -> TlsAcceptor {
    TlsAcceptor::from(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (SmtpIo, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (SmtpIo::new(Conn::Plain(server)), client)
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn pipelined_commands_are_read_in_order() {
        let (mut io, mut client) = pair().await;
        client
            .write_all(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
            .await
            .expect("write");
        let mut names = Vec::new();
        for _ in 0..3 {
            match io.next_request(T).await.expect("read") {
                Incoming::Request(r) => names.push(r.name()),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(names, ["MAIL", "RCPT", "DATA"]);
    }

    #[tokio::test]
    async fn data_is_unstuffed_and_ends_only_at_crlf_dot_crlf() {
        let (mut io, mut client) = pair().await;
        client
            .write_all(b"Subject: x\r\n\r\n..leading dot\r\nbare\n.\nstill body\r\n.\r\nQUIT\r\n")
            .await
            .expect("write");
        let Data::Message(m) = io.read_data(1000, T).await.expect("data") else {
            panic!("no message")
        };
        assert_eq!(
            m,
            b"Subject: x\r\n\r\n.leading dot\r\nbare\n.\nstill body\r\n".to_vec()
        );
        assert!(matches!(
            io.next_request(T).await.expect("quit"),
            Incoming::Request(Request::Quit)
        ));
    }

    #[tokio::test]
    async fn oversized_data_is_drained_and_reported() {
        let (mut io, mut client) = pair().await;
        let mut msg = vec![b'a'; 5000];
        msg.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        client.write_all(&msg).await.expect("write");
        assert!(matches!(
            io.read_data(100, T).await.expect("data"),
            Data::TooLarge
        ));
        assert!(matches!(
            io.next_request(T).await.expect("noop"),
            Incoming::Request(Request::Noop { .. })
        ));
    }

    #[tokio::test]
    async fn an_overlong_command_line_is_skipped_whole() {
        let (mut io, mut client) = pair().await;
        let mut line = b"NOOP ".to_vec();
        line.extend(std::iter::repeat_n(b'z', 5000));
        line.extend_from_slice(b"\r\nQUIT\r\n");
        // In two writes, so the long line also arrives split across reads.
        client.write_all(&line[..3000]).await.expect("write");
        client.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(&line[3000..]).await.expect("write");
        assert!(matches!(
            io.next_request(T).await.expect("read"),
            Incoming::Invalid(smtp_proto::Error::ResponseTooLong)
        ));
        assert!(matches!(
            io.next_request(T).await.expect("quit"),
            Incoming::Request(Request::Quit)
        ));
    }

    #[tokio::test]
    async fn replies_are_batched_until_input_runs_out() {
        let (mut io, mut client) = pair().await;
        io.reply(250, "2.1.0", "Ok");
        io.reply(250, "", "first\nsecond");
        io.flush().await.expect("flush");
        let mut buf = vec![0; 100];
        let n = client.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"250 2.1.0 Ok\r\n250-first\r\n250 second\r\n");
    }
}
