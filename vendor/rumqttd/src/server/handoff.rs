//! xen-msg patch: connections accepted by the embedding program and handed to a server.
//!
//! dom0-broker serves MQTT 3.1.1 and MQTT 5 clients on one address (and on a UNIX socket): it
//! accepts, reads the CONNECT's protocol level, and hands the connection, with the bytes it read,
//! to the server of that version. From then on the client talks to the server's own task: no relay
//! in between.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection and the bytes already read from it (served first).
#[derive(Debug)]
pub enum Handoff {
    Tcp(std::net::TcpStream, Vec<u8>),
    Unix(std::os::unix::net::UnixStream, Vec<u8>),
}

/// Where the embedding program hands connections to a server (see `Broker::handoff`).
pub type HandoffSender = flume::Sender<Handoff>;

/// A stream whose first bytes were read by someone else: they are read again first.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = this.prefix.get(this.at..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The handed connection as a stream of the current runtime.
pub(crate) fn into_stream(h: Handoff) -> io::Result<Box<dyn crate::link::network::N>> {
    Ok(match h {
        Handoff::Tcp(s, prefix) => {
            s.set_nonblocking(true)?;
            let s = tokio::net::TcpStream::from_std(s)?;
            // xen-msg patch: no Nagle delay on what the broker writes.
            s.set_nodelay(true)?;
            Box::new(Prefixed::new(prefix, s))
        }
        Handoff::Unix(s, prefix) => {
            s.set_nonblocking(true)?;
            Box::new(Prefixed::new(prefix, tokio::net::UnixStream::from_std(s)?))
        }
    })
}
