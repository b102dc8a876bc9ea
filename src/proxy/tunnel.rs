//! CONNECT to a host that holds no grant: bytes both ways, untouched. The
//! proxy sees only ciphertext, so a placeholder inside stays a placeholder.
//!
//! The upstream is dialled before the agent gets its `200`, so an
//! unreachable host is a `502` the agent can read, and the audit line's
//! "denied" means that alone; a tunnel that ends with a reset after carrying
//! bytes is still one that was used, with the bytes it carried.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::audit::ProxyUse;
use super::inject::Target;

/// Dials the upstream of a tunnel.
pub async fn dial(target: &Target) -> std::io::Result<TcpStream> {
    let upstream = TcpStream::connect((target.host.as_str(), target.port)).await?;
    let _ = upstream.set_nodelay(true);
    Ok(upstream)
}

/// Copies until either side is done and writes the audit line with the
/// bytes each way, also when the copy ends with an error.
pub async fn run<A>(agent: A, upstream: TcpStream, mut record: ProxyUse)
where
    A: AsyncRead + AsyncWrite + Unpin,
{
    let carried = carry(agent, upstream).await;
    if let Some(error) = &carried.error {
        record.reason = Some("TunnelReset");
        tracing::debug!(%error, host = %record.host, "proxy: tunnel ended with an error");
    }
    record.request_bytes = carried.up;
    record.response_bytes = carried.down;
    record.latency_ms = record.started.elapsed().as_secs_f64() * 1000.0;
    record.emit();
}

/// What a tunnel carried: bytes from the agent, bytes to it, and how it ended.
#[derive(Debug)]
struct Carried {
    up: u64,
    down: u64,
    error: Option<std::io::Error>,
}

async fn carry<A, U>(agent: A, upstream: U) -> Carried
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut agent = Counted {
        inner: agent,
        read: up.clone(),
    };
    let mut upstream = Counted {
        inner: upstream,
        read: down.clone(),
    };
    let error = tokio::io::copy_bidirectional(&mut agent, &mut upstream)
        .await
        .err();
    Carried {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        error,
    }
}

/// A stream that counts the bytes read from it.
struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        self.read.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// An upstream that answers and then resets the connection: the tunnel
    /// carried bytes both ways, and they are counted.
    #[tokio::test]
    async fn a_reset_after_use_keeps_the_bytes_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (answered_tx, answered_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"world!").await.unwrap();
            let _ = answered_rx.await;
            // Linger 0: closing sends a reset, not a FIN.
            s.set_zero_linger().unwrap();
            drop(s);
        });
        let target = Target {
            host: "127.0.0.1".into(),
            port: addr.port(),
        };
        let upstream = dial(&target).await.unwrap();
        let (mut agent, proxy_side) = tokio::io::duplex(64);
        let task = tokio::spawn(carry(proxy_side, upstream));
        agent.write_all(b"hello").await.unwrap();
        let mut answer = [0u8; 6];
        agent.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"world!");
        answered_tx.send(()).unwrap();
        let carried = task.await.unwrap();
        assert_eq!((carried.up, carried.down), (5, 6));
        assert!(
            carried.error.is_some(),
            "the reset is reported: {carried:?}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_upstream_fails_the_dial() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let target = Target {
            host: "127.0.0.1".into(),
            port,
        };
        assert!(dial(&target).await.is_err());
    }
}
