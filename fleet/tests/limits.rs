//! The console's HTTP server cannot be held open: the real `ferry-fleet
//! serve`, limited to 1,024 descriptors, against 1,000 connections that
//! send half a request's headers and wait.
//!
//! - `half_open_connections_cannot_hold_the_console`: `/healthz` and the
//!   API keep answering, every half-open connection is closed by the
//!   console (pushed out by newer ones, or at the header timeout); an
//!   upload whose body stops arriving is answered 400 and closed at the
//!   body timeout; event streams are capped (one more answers 503
//!   `too_many_streams`); a JSON body nested 100,000 deep is refused (422).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ferry_fleet::http::dashboard::MAX_STREAMS;
use ferry_testkit::slow::{CLOSE_WAIT, closed_by_server, half_open};

use crate::broker::Mosquitto;
use crate::state::Serve;

/// Opens `GET /api/stream` with `token`: the status line, and the rest.
fn open_stream(addr: &str, token: &str) -> (String, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /api/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(s);
    reader.read_line(&mut line).unwrap();
    (line, reader)
}

#[test]
fn half_open_connections_cannot_hold_the_console() {
    let broker = Mosquitto::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start_limited(&broker, &dir.path().join("state"), 1024);
    let addr = serve.url.trim_start_matches("http://").to_string();
    let client = serve.client();

    // An upload that stops: headers complete, 10 of 1,000 body bytes.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    write!(
        stalled,
        "POST /api/tokens HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"name\": ",
        serve.token
    )
    .unwrap();
    let mut held = half_open(&addr, 1000);
    for _ in 0..3 {
        let mut r = ureq::get(format!("{}/healthz", serve.url)).call().unwrap();
        assert_eq!(r.body_mut().read_to_string().unwrap(), "ok");
    }
    client.devices().unwrap();
    assert!(
        !serve.log_text().contains("Too many open files"),
        "{}",
        serve.log_text()
    );

    // Event streams: capped (each holds a connection for as long as its
    // page is open).
    let mut streams = Vec::new();
    for _ in 0..MAX_STREAMS {
        let (status, s) = open_stream(&addr, &serve.token);
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        streams.push(s);
    }
    let (status, mut s) = open_stream(&addr, &serve.token);
    assert!(
        status.starts_with("HTTP/1.1 503"),
        "{status:?}\n{}",
        serve.log_text()
    );
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    assert!(rest.contains("too_many_streams"), "{rest}");
    // A closed one makes room (noticed at the latest by its keep-alive).
    drop(streams.pop());
    let deadline = Instant::now() + CLOSE_WAIT;
    loop {
        let (status, s) = open_stream(&addr, &serve.token);
        if status.starts_with("HTTP/1.1 200") {
            streams.push(s);
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(streams);

    // Every half-open connection is closed by the console.
    let deadline = Instant::now() + CLOSE_WAIT;
    loop {
        let open = held.iter_mut().map(closed_by_server).filter(|c| !c).count();
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} still open");
        std::thread::sleep(Duration::from_millis(500));
    }
    client.devices().unwrap();

    // The stalled upload: answered 400, closed.
    stalled.set_read_timeout(Some(CLOSE_WAIT)).unwrap();
    let mut answer = String::new();
    let _ = stalled.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");

    // Nesting: an unknown field is refused before its value is read.
    let deep = format!(
        "{{\"name\": \"deep\", \"role\": \"viewer\", \"x\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .post(format!("{}/api/tokens", serve.url))
        .header("Authorization", format!("Bearer {}", serve.token))
        .header("Content-Type", "application/json")
        .send(deep.as_bytes())
        .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("unknown field `x`"), "{text}");
    // Deep where a value is parsed: serde_json's recursion limit (128).
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut r = agent
        .post(format!("{}/api/tokens", serve.url))
        .header("Authorization", format!("Bearer {}", serve.token))
        .header("Content-Type", "application/json")
        .send(deep.as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    assert!(!r.body_mut().read_to_string().unwrap().contains("token"));
    client.devices().unwrap();
}
