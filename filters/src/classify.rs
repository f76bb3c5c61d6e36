//! Sorting outcomes into failure classes, shared by the breaker and the retry layer.

use std::error::Error;
use std::io;

use http::HeaderMap;

use crate::error::{FilterError, UpstreamError, UpstreamErrorKind};

/// What an error from below says about the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// A try or the route ran out of time.
    Timeout,
    /// Never sent: no connection, or no endpoint to send it to.
    ConnectFailure,
    /// Never sent: this proxy could not dial yet; no backend is at fault.
    Unready,
    /// Never processed: an HTTP/2 REFUSED_STREAM.
    RefusedStream,
    /// Sent, then the connection or stream was lost.
    Reset,
    /// A breaker below refused it; fails fast, never retried.
    BreakerOpen,
    /// Anything else (a bug, a protocol error): not retried, a failure for breakers.
    Other,
}

/// Walks the source chain for the first error that says what happened.
pub(crate) fn classify_error(err: &(dyn Error + 'static)) -> ErrorClass {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(f) = e.downcast_ref::<FilterError>() {
            match f {
                FilterError::Timeout(_) => return ErrorClass::Timeout,
                FilterError::BreakerOpen { .. } => return ErrorClass::BreakerOpen,
                FilterError::NoHealthyEndpoint(_) => return ErrorClass::ConnectFailure,
                _ => return ErrorClass::Other,
            }
        }
        if let Some(u) = e.downcast_ref::<UpstreamError>() {
            return match u.kind {
                UpstreamErrorKind::ConnectFailure => ErrorClass::ConnectFailure,
                UpstreamErrorKind::Unready => ErrorClass::Unready,
                UpstreamErrorKind::RefusedStream => ErrorClass::RefusedStream,
                UpstreamErrorKind::Reset => ErrorClass::Reset,
            };
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::AddrNotAvailable
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable => return ErrorClass::ConnectFailure,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => return ErrorClass::Reset,
                _ => {}
            }
        }
        cur = e.source();
    }
    ErrorClass::Other
}

/// True when the message is gRPC (`content-type: application/grpc…`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The numeric `grpc-status` in a header block, if there is one.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    let v = headers.get("grpc-status")?;
    std::str::from_utf8(v.as_bytes()).ok()?.trim().parse().ok()
}

/// A set of gRPC codes (0..=16) as a bit mask, so a lookup is one AND.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GrpcCodes(u32);

impl GrpcCodes {
    pub(crate) fn from_codes(codes: impl IntoIterator<Item = sluice_config::GrpcCode>) -> Self {
        Self(codes.into_iter().fold(0, |m, c| m | (1 << c.code())))
    }

    pub(crate) fn contains(self, code: u32) -> bool {
        code < 32 && self.0 & (1 << code) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_typed_and_io_errors() {
        let e: tower::BoxError = Box::new(UpstreamError::new(
            UpstreamErrorKind::RefusedStream,
            "refused",
        ));
        assert_eq!(classify_error(&*e), ErrorClass::RefusedStream);
        let e: tower::BoxError = Box::new(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(classify_error(&*e), ErrorClass::ConnectFailure);
        let e: tower::BoxError = Box::new(FilterError::Timeout(std::time::Duration::from_secs(1)));
        assert_eq!(classify_error(&*e), ErrorClass::Timeout);
        let e: tower::BoxError = "odd".into();
        assert_eq!(classify_error(&*e), ErrorClass::Other);
    }

    #[test]
    fn reads_grpc_status() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(14));
        let set = GrpcCodes::from_codes([sluice_config::GrpcCode::Unavailable]);
        assert!(set.contains(14) && !set.contains(2));
    }

    #[test]
    fn an_upstreams_out_of_range_code_is_in_no_set_and_a_code_listed_twice_stays() {
        use sluice_config::GrpcCode::{Cancelled, Unauthenticated, Unavailable};
        let set = GrpcCodes::from_codes([Cancelled, Unavailable, Unavailable, Unauthenticated]);
        assert!(set.contains(1) && set.contains(14) && set.contains(16));
        // Whatever number an upstream sends: no panic, no wrap onto a listed code.
        for code in [17, 31, 32, 33, 64, u32::MAX] {
            assert!(!set.contains(code), "{code}");
        }
    }
}
