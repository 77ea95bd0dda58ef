//! Clients that hold a server open: [`half_open`] connections that send
//! part of a request's headers and wait, the attack an HTTP server must
//! survive; [`closed_by_server`] tells whether the server gave up on one;
//! [`raise_nofile`] and [`with_nofile`] set descriptor limits (of this
//! process, and of a server started as a child).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

/// The start of a request, never finished.
pub const PARTIAL: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: ferry\r\nX-Slow: ";

/// Opens `n` connections to `addr` (`host:port`), each sending
/// [`PARTIAL`] and nothing more. A connection the server refuses or
/// closes at once is still counted (and held).
pub fn half_open(addr: &str, n: usize) -> Vec<TcpStream> {
    raise_nofile(n as u64 + 256);
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
            let _ = s.write_all(PARTIAL);
            s
        })
        .collect()
}

/// Whether the server closed `s` (end of file or reset), without waiting.
pub fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            // An answer (408, 503): read on to its end of file.
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Raises this process's soft descriptor limit to at least `n` (up to the
/// hard limit).
pub fn raise_nofile(n: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|c| c < n) {
        limit.current = Some(match limit.maximum {
            Some(max) => n.min(max),
            None => n,
        });
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

/// `cmd` run with a descriptor limit of `n` (`ulimit -n` in a shell that
/// then becomes the program: the process id is the program's).
pub fn with_nofile(cmd: &Command, n: u64) -> Command {
    let mut wrapped = Command::new("sh");
    wrapped
        .arg("-c")
        .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// How long a test waits for a server to close connections it holds
/// (generous: the servers' header timeout is 10 s).
pub const CLOSE_WAIT: Duration = Duration::from_secs(90);
