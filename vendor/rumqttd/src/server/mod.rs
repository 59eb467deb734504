// use tokio::io::{AsyncRead, AsyncWrite};

mod broker;
mod handoff;
#[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
mod tls;

pub use broker::{Broker, LinkType, LocalServer, Server};
pub use handoff::{Handoff, HandoffSender};

// pub trait IO: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
// impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> IO for T {}
