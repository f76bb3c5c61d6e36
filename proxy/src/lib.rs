//! `sluice-proxy`: listeners, forwarding, live policy and admin for the Sluice sidecar.

#![warn(missing_docs, unreachable_pub)]
