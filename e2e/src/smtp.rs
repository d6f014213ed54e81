//! A raw SMTP client for probes that swaks cannot express (bare line endings, exact
//! pipelining, parameters): it writes bytes as given and reads replies as the server sends
//! them.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use base64::Engine;

pub struct RawSmtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawSmtp {
    /// Connects and returns the client with the greeting (or refusal) line(s).
    pub fn connect(addr: SocketAddr) -> (RawSmtp, String) {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut c = RawSmtp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = c.reply();
        (c, greeting)
    }

    /// One complete reply (all lines of a multi-line reply), or "" when the server closed.
    pub fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return out,
                Ok(_) => {}
            }
            out.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return out;
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write");
    }

    /// Sends one command line and returns its reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// EHLO and AUTH PLAIN (on a listener that allows AUTH without TLS).
    pub fn login(&mut self, user: &str, password: &str) -> String {
        let ehlo = self.cmd("EHLO probe.test");
        assert!(ehlo.starts_with("250"), "EHLO: {ehlo}");
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.cmd(&format!("AUTH PLAIN {token}"))
    }
}
