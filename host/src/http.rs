//! An HTTP/1.1 server that a client cannot hold open: the accept loop of
//! the agent's API and the console's, written once over hyper (the router
//! is any `tower::Service`, an axum `Router` in both programs).
//!
//! # What is bounded ([`Limits`])
//! - **Headers**: a request's headers must arrive within
//!   `header_read_timeout` (hyper's own timer), or the connection is
//!   closed: a client that sends half a request and waits holds nothing
//!   for long.
//! - **Bodies**: each piece of a request body must arrive within
//!   `body_read_timeout` of the previous one, or reading it fails (the
//!   route answers its body error) and the connection closes.
//! - **Requests**: the route must produce its answer's head within
//!   `request_timeout` (503 `request_timeout` otherwise). Streaming the
//!   answer's body (a download, an event stream) is not limited by it: the
//!   client reads at its pace, and the routes bound their own streams.
//! - **Connections**: at most `max_connections` at once, well under the
//!   process's descriptor limit. When a new one comes in at the limit, the
//!   connection that has been *idle* longest (no request being served:
//!   half-sent headers or a kept-alive connection) is closed to make room;
//!   when every connection is serving a request, the new one is closed
//!   instead. So a thousand half-open connections cannot keep a health
//!   check out: each new connection pushes out the oldest idle one.
//!
//! # Stopping
//! When `shutdown` resolves, no new connection is taken, idle
//! connections close, and requests in flight finish; [`serve`] returns when
//! every connection is closed. Dropping the future closes them all at once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};

/// The error inside a body read that went past its length limit (e.g.
/// `axum::body::to_bytes`'s), to tell it from a failed read.
pub use http_body_util::LengthLimitError;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, Sleep};

/// What a connection and a request may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    /// 10 s for headers (a person's browser sends them in one go), 30 s
    /// between body pieces, 60 s to answer, 512 connections (half the
    /// common 1,024-descriptor limit, leaving room for files and MQTT).
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_connections: 512,
        }
    }
}

/// The request body a route gets: the connection's, each piece within
/// [`Limits::body_read_timeout`] of the previous one.
pub struct TimedBody {
    inner: Incoming,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

/// A request body that stopped arriving.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body stalled for more than {0:?}")]
    Stalled(Duration),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(BodyError::from)))
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Stalled(self.idle)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts its connection busy until it is dropped
/// (sent, or the connection gone).
pub struct CountedBody<B> {
    inner: B,
    _busy: Busy,
}

struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Busy {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap() = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One open connection, as the accept loop sees it.
struct Conn {
    /// Requests being served (answers still being sent included).
    busy: AtomicUsize,
    /// Since when no request was served (the accept time at first).
    idle_since: Mutex<Instant>,
    /// Closes the connection.
    evict: Notify,
}

/// The open connections, by number.
#[derive(Default)]
struct Table {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Table {
    /// Makes room for one more connection: `true` when there is room (an
    /// idle connection was told to close if needed).
    /// The one told to close leaves the table at once, so the next call
    /// picks another.
    fn make_room(&self, max: usize) -> bool {
        let mut conns = self.conns.lock().unwrap();
        if conns.len() < max {
            return true;
        }
        let oldest_idle = conns
            .iter()
            .filter(|(_, c)| c.busy.load(Ordering::SeqCst) == 0)
            .min_by_key(|(_, c)| *c.idle_since.lock().unwrap())
            .map(|(id, _)| *id);
        match oldest_idle.and_then(|id| conns.remove(&id)) {
            Some(c) => {
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// The answer when a route takes longer than [`Limits::request_timeout`].
fn timed_out<B>(limit: Duration) -> Response<Either<B, Full<Bytes>>> {
    let body = format!(
        "{{\"error\":\"no answer within {} s\",\"code\":\"request_timeout\"}}",
        limit.as_secs()
    );
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Reads and discards a request body the server refuses before reading it
/// (a 401 or 403 decided from the headers), up to `limit` bytes, so that a
/// client still sending it reads the refusal instead of a broken
/// connection. A body announced (`Content-Length`) or found larger than
/// `limit` is left: the answer goes out and the connection closes. Returns
/// whether the whole body was read. The server's body timeouts apply.
pub async fn discard_body<B>(body: B, content_length: Option<u64>, limit: u64) -> bool
where
    B: Body + Unpin,
{
    use http_body_util::BodyExt;
    if content_length.is_some_and(|n| n > limit) {
        return false;
    }
    let mut body = body;
    let mut read = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        if let Some(data) = frame.data_ref() {
            read += bytes::Buf::remaining(data) as u64;
            if read > limit {
                return false;
            }
        }
    }
    true
}

/// Serves `service` on `listener` within `limits` until `shutdown`
/// resolves (see the module header).
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    S: tower_service::Service<Request<TimedBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let table = Arc::new(Table::default());
    let (stopping, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of descriptors, or a connection reset before it
                    // was taken: wait a little, never spin or stop.
                    tracing::warn!(%error, "Cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        if !table.make_room(limits.max_connections) {
            tracing::warn!(
                max = limits.max_connections,
                "Every connection is serving a request: refused a new one"
            );
            drop(stream);
            continue;
        }
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "Cannot set TCP_NODELAY");
        }
        next_id += 1;
        let id = next_id;
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            evict: Notify::new(),
        });
        table.conns.lock().unwrap().insert(id, conn.clone());
        let service = service.clone();
        let table = table.clone();
        let mut stop_rx = stop_rx.clone();
        tasks.spawn(async move {
            let svc = hyper::service::service_fn({
                let conn = conn.clone();
                move |req: Request<Incoming>| {
                    let busy = Busy::new(conn.clone());
                    let req = req.map(|inner| TimedBody {
                        inner,
                        idle: limits.body_read_timeout,
                        deadline: Box::pin(tokio::time::sleep(limits.body_read_timeout)),
                    });
                    let mut service = service.clone();
                    async move {
                        let answer = tokio::time::timeout(limits.request_timeout, async {
                            std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                            service.call(req).await
                        })
                        .await;
                        let response = match answer {
                            Ok(Ok(r)) => {
                                r.map(|inner| Either::Left(CountedBody { inner, _busy: busy }))
                            }
                            Ok(Err(never)) => match never {},
                            Err(_) => timed_out(limits.request_timeout),
                        };
                        Ok::<_, Infallible>(response)
                    }
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(connection);
            let mut graceful = false;
            loop {
                tokio::select! {
                    ended = connection.as_mut() => {
                        if let Err(error) = ended {
                            tracing::debug!(%error, "Connection ended with an error");
                        }
                        break;
                    }
                    () = conn.evict.notified() => {
                        tracing::debug!("Closed an idle connection to make room");
                        break;
                    }
                    changed = stop_rx.changed(), if !graceful => {
                        if changed.is_ok() {
                            graceful = true;
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            table.conns.lock().unwrap().remove(&id);
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers `ok`, after `delay` on `/slow`.
    #[derive(Clone)]
    struct Slow(Duration);

    impl tower_service::Service<Request<TimedBody>> for Slow {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future =
            Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<TimedBody>) -> Self::Future {
            let delay = self.0;
            Box::pin(async move {
                if req.uri().path() == "/slow" {
                    tokio::time::sleep(delay).await;
                }
                Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
            })
        }
    }

    /// The whole answer to `request` on a new connection.
    async fn ask(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer).await;
        answer
    }

    /// Whether the server closes `s` (read returns end of file or an error).
    async fn closed(s: &mut tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_routes_half_sent_headers_and_a_full_table_are_bounded() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            body_read_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(300),
            max_connections: 2,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = Slow(Duration::from_secs(3600));
        tokio::spawn(serve(listener, service, limits, std::future::pending()));
        let get =
            |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");

        // A route that never answers: 503 request_timeout.
        let answer = ask(addr, &get("/slow")).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(ask(addr, &get("/")).await.ends_with("ok"));

        // Half-sent headers: closed by the header timeout.
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let closing = tokio::time::timeout(Duration::from_secs(30), closed(&mut half));
        assert!(closing.await.expect("closed by the header timeout"));

        // A full table (two half-open connections): a new one still gets
        // its answer, and the oldest idle one was closed for it.
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        first.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        second.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(ask(addr, &get("/")).await.ends_with("ok"));
        let closing = tokio::time::timeout(Duration::from_secs(30), closed(&mut first));
        assert!(closing.await.expect("the oldest idle connection closed"));
        let _ = second;
    }

    #[test]
    fn the_oldest_idle_connection_makes_room() {
        let table = Table::default();
        let now = Instant::now();
        let conn = |busy: usize, ago: u64| {
            Arc::new(Conn {
                busy: AtomicUsize::new(busy),
                idle_since: Mutex::new(now - Duration::from_secs(ago)),
                evict: Notify::new(),
            })
        };
        let (a, b, c) = (conn(0, 5), conn(1, 50), conn(0, 9));
        for (i, x) in [&a, &b, &c].into_iter().enumerate() {
            table.conns.lock().unwrap().insert(i as u64, x.clone());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(table.make_room(4));
        assert!(table.make_room(3));
        assert_eq!(table.conns.lock().unwrap().len(), 2);
        // c, idle for 9 s, was told to close (b is busy, a idle for 5 s).
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), c.evict.notified())
                .await
                .expect("c evicted");
        });
        // Then a; then all busy: no room.
        assert!(table.make_room(2));
        assert_eq!(table.conns.lock().unwrap().len(), 1);
        assert!(!table.make_room(1));
    }
}
