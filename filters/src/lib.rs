//! `sluice-filters`: traffic governance as tower layers over `http::Request`/`Response`.

#![warn(missing_docs, unreachable_pub)]
