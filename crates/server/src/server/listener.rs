//! The accept loop: a bounded number of open connections, and file descriptors kept in
//! reserve for the Raft core.
//!
//! 19,990 idle connections to a leader once exhausted its file descriptors and its Raft
//! core quit on `Too many open files` while writing the log. So: the soft descriptor
//! limit is raised to the hard one at start ([`raise_fd_limit`]); at most
//! `max_connections` are open at once, the rest are closed as soon as they are accepted
//! (a client sees a reset and retries elsewhere); and `max_connections` is kept below
//! the descriptor limit by [`FD_RESERVE`], so log files, snapshots and peer channels
//! always find a descriptor. An accept that fails for want of descriptors backs off
//! instead of spinning. A connection holds its place only while it talks: one that has
//! not sent its first [`FIRST_BYTES`] within [`FIRST_BYTES_WITHIN`] of being accepted
//! (no TLS ClientHello, no HTTP/2 preface) is closed, so idle sockets opened by the
//! thousand free their places on their own.
//!
//! Must never hold a connection it did not count, nor let the count leak: the permit
//! lives inside the connection and is released when tonic drops it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Descriptors left for everything but client connections: the log and snapshot files,
/// connections to and from peers, forwarding channels, the process's own.
pub const FD_RESERVE: u64 = 512;

/// Bytes a new connection must send before [`FIRST_BYTES_WITHIN`]: the HTTP/2 client
/// preface is 24 bytes and a TLS ClientHello is longer.
pub const FIRST_BYTES: usize = 24;

/// How long a new connection may stay silent.
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(10);

/// How often a refused connection is logged at most.
const REFUSAL_REPORT: Duration = Duration::from_secs(10);

/// Raises the soft limit on open files to the hard limit; returns the soft limit in
/// force afterwards (`None` if it cannot be read).
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => return Some(hard),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        }
    }
    Some(soft)
}

/// The connection bound actually used: the configured one, lowered so that
/// [`FD_RESERVE`] descriptors stay free under `fd_limit`.
pub fn effective_max_connections(configured: usize, fd_limit: Option<u64>) -> usize {
    let Some(limit) = fd_limit else {
        return configured;
    };
    let room = limit.saturating_sub(FD_RESERVE).max(16);
    configured.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// An accepted connection holding its place in the bound.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Until the first bytes arrived: when the connection is closed without them.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes read so far, counted until [`FIRST_BYTES`].
    seen: usize,
    /// The far end, as accepted.
    remote: Option<std::net::SocketAddr>,
    /// Told the far end's address when the connection is dropped.
    on_close: Option<OnClose>,
}

/// Called with a connection's remote address when the server drops it.
pub type OnClose = Arc<dyn Fn(std::net::SocketAddr) + Send + Sync>;

impl Drop for Counted {
    fn drop(&mut self) {
        // The address from accept: once the peer reset the connection, the socket no
        // longer has one to ask for.
        if let (Some(on_close), Some(remote)) = (&self.on_close, self.remote) {
            on_close(remote);
        }
    }
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(silence) = this.silence.as_mut() else {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        };
        if silence.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "a new connection sent nothing in time",
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            this.seen += buf.filled().len() - before;
            if this.seen >= FIRST_BYTES {
                this.silence = None;
            }
        }
        read
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections of `listener`, at most `max` open at once, each closed if it has not
/// sent [`FIRST_BYTES`] within `first_bytes_within`, for tonic's `serve_with_incoming`.
/// The accept loop ends when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    max: usize,
    first_bytes_within: Duration,
    on_close: Option<OnClose>,
) -> ReceiverStream<io::Result<Counted>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max));
    tokio::spawn(async move {
        let mut refused = Refusals::default();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok((stream, remote)) => (stream, remote),
                Err(e) => {
                    // EMFILE/ENFILE and friends: the listener stays readable, so retrying
                    // at once would spin on the same error.
                    refused.note(&format!("accept failed: {e}"), max);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                refused.note("too many open connections", max);
                drop(stream);
                continue;
            };
            // The builder's tcp_nodelay only reaches sockets tonic accepts itself: without
            // it a response's last frame waits for the peer's delayed ACK (~40 ms).
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let conn = Counted {
                stream,
                _permit: permit,
                silence: Some(Box::pin(tokio::time::sleep(first_bytes_within))),
                seen: 0,
                remote: Some(remote),
                on_close: on_close.clone(),
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Counts refused connections into one WARN line per [`REFUSAL_REPORT`].
#[derive(Default)]
struct Refusals {
    last: Option<Instant>,
    count: u64,
}

impl Refusals {
    fn note(&mut self, why: &str, max: usize) {
        self.count += 1;
        if self.last.is_none_or(|t| t.elapsed() >= REFUSAL_REPORT) {
            tracing::warn!(
                refused = self.count,
                max_connections = max,
                reason = why,
                "refusing connections"
            );
            self.last = Some(Instant::now());
            self.count = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_leaves_the_reserve_free() {
        assert_eq!(effective_max_connections(10_000, Some(1 << 20)), 10_000);
        assert_eq!(effective_max_connections(10_000, Some(1024)), 512);
        assert_eq!(effective_max_connections(10_000, None), 10_000);
        assert_eq!(effective_max_connections(10_000, Some(100)), 16);
    }

    #[tokio::test]
    async fn connections_past_the_bound_are_closed_and_a_closed_one_frees_its_place() {
        use tokio::io::AsyncReadExt;
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut conns = incoming(listener, 2, FIRST_BYTES_WITHIN, None);
        let _a = TcpStream::connect(addr).await.expect("connect a");
        let _b = TcpStream::connect(addr).await.expect("connect b");
        let first = conns.next().await.expect("a").expect("a ok");
        let _second = conns.next().await.expect("b").expect("b ok");
        // The third is accepted and closed at once: its reader sees the end.
        let mut c = TcpStream::connect(addr).await.expect("connect c");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "over the bound: {read:?}");
        // Dropping one frees a place for the next.
        drop(first);
        let _d = TcpStream::connect(addr).await.expect("connect d");
        let fourth = tokio::time::timeout(Duration::from_secs(10), conns.next())
            .await
            .expect("accepted in time");
        assert!(matches!(fourth, Some(Ok(_))));
    }

    /// Idle sockets opened by the thousand once held every place until they closed: a
    /// connection that sends nothing is closed at the deadline, one that speaks is not.
    #[tokio::test]
    async fn a_silent_connection_is_closed_and_frees_its_place() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut conns = incoming(listener, 1, Duration::from_millis(200), None);
        let mut talker = TcpStream::connect(addr).await.expect("connect");
        let mut served = conns.next().await.expect("accepted").expect("ok");
        talker.write_all(&[7u8; FIRST_BYTES]).await.expect("write");
        let mut got = [0u8; FIRST_BYTES];
        served.read_exact(&mut got).await.expect("the bytes arrive");
        // Past the deadline, the talker's connection still reads.
        tokio::time::sleep(Duration::from_millis(400)).await;
        talker.write_all(b"more").await.expect("write more");
        let mut more = [0u8; 4];
        served.read_exact(&mut more).await.expect("still open");
        drop(served);
        drop(talker);

        let _silent = TcpStream::connect(addr).await.expect("connect");
        let mut quiet = conns.next().await.expect("accepted").expect("ok");
        let mut one = [0u8; 1];
        let started = Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(10), quiet.read(&mut one))
            .await
            .expect("ended in time");
        assert!(
            matches!(&read, Err(e) if e.kind() == io::ErrorKind::TimedOut),
            "{read:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
        drop(quiet);
        // Its place is free again.
        let _next = TcpStream::connect(addr).await.expect("connect");
        let next = tokio::time::timeout(Duration::from_secs(10), conns.next())
            .await
            .expect("accepted in time");
        assert!(matches!(next, Some(Ok(_))));
    }
}
