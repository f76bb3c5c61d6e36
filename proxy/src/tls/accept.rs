//! The inbound listener's TLS accept: `server::serve` calls [`accept`] in each
//! connection's own task (so a slow client never holds up the accept loop), then
//! serves HTTP/1.1 or HTTP/2 over it with the peer's verified SPIFFE ID in every
//! request's extensions as a [`PeerIdentity`].
//!
//! Strict (the default with mTLS): a connection that does not complete a TLS 1.3
//! handshake with a client certificate chaining to the mesh root is closed.
//! Permissive: the first byte decides; a TLS handshake record (`0x16`) goes
//! through the strict path, anything else is served as plaintext HTTP without
//! an identity (so `inbound.allow` refuses it when a list is set).

use std::sync::Arc;
use std::time::Duration;

use sluice_filters::extensions::PeerIdentity;
use tokio::net::TcpStream;

use super::{TlsStore, peer_identity};
use crate::transparent::Prefixed;

/// A client that has not finished its handshake (or sent a first byte) by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// How the inbound listener authenticates peers.
#[derive(Clone, Debug)]
pub(crate) struct InboundTls {
    /// The proxy's certificate and the trust root.
    pub(crate) store: Arc<TlsStore>,
    /// Serve plaintext clients too (without an identity).
    pub(crate) permissive: bool,
}

/// What a connection turned out to be after the accept step.
pub(crate) enum Accepted {
    /// A completed handshake and the peer's verified identity.
    Tls(
        Box<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>>,
        Option<PeerIdentity>,
    ),
    /// A plaintext client (permissive mode only).
    Plain(Prefixed<TcpStream>),
}

/// Decides between TLS and plaintext and completes the handshake.
pub(crate) async fn accept(
    tls: &InboundTls,
    stream: Prefixed<TcpStream>,
) -> std::io::Result<Accepted> {
    // The inbound intercept reads nothing ahead, so the socket's next byte is the first.
    if tls.permissive && !stream.has_prefix() {
        let mut first = [0u8; 1];
        let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.inner().peek(&mut first))
            .await
            .map_err(|_| std::io::Error::other("no first byte in time"))??;
        if n == 0 || first[0] != TLS_HANDSHAKE {
            return Ok(Accepted::Plain(stream));
        }
    }
    // Loaded per connection: a renewed certificate serves the next handshake.
    let Some(config) = tls.store.server_config() else {
        return Err(std::io::Error::other("no workload certificate yet"));
    };
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
    let peer = peer_identity(tls.get_ref().1);
    Ok(Accepted::Tls(Box::new(tls), peer))
}
