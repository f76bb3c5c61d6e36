//! The fleet limits' buckets in Redis: one Lua script per key, all keys of a
//! reconciliation in one pipeline.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, ServerErrorKind};
use sluice_filters::ratelimit::fleet::{LeaseFuture, LeaseGrant, LeaseRequest, LeaseStore};

use crate::ProxyError;

/// One token bucket per key, in thousandths of a token: refilled from Redis's own clock
/// (the same for every proxy), charged a first-seen key's credit (`debt`, even into
/// the negative), then asked for `delta` tokens (granted as far as whole tokens are
/// there) or given `-delta` back. It expires once it would be full again, which is what
/// a missing key means, so expiry never changes an answer and memory stays bounded.
const SCRIPT: &str = include_str!("bucket.lua");

/// The lease store of the fleet limits: a reconnecting Redis connection.
pub struct RedisLeases {
    conn: ConnectionManager,
    script: redis::Script,
}

impl std::fmt::Debug for RedisLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLeases").finish_non_exhaustive()
    }
}

impl RedisLeases {
    /// A store for `url` (`redis://` or `rediss://`, verified with `ca_pem`'s roots
    /// when given, else the system's). Connects lazily, so a proxy starts while Redis
    /// is down; every command and connection attempt gives up after `timeout`.
    pub fn new(url: &str, ca_pem: Option<Vec<u8>>, timeout: Duration) -> Result<Self, ProxyError> {
        let bad = |e: redis::RedisError| ProxyError::Compile(format!("--redis-url: {e}"));
        let client = match ca_pem {
            Some(root_cert) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            ),
            None => redis::Client::open(url),
        }
        .map_err(bad)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            // Reconnection is the sync loop's business: one attempt per interval.
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(bad)?;
        Ok(Self {
            conn,
            script: redis::Script::new(SCRIPT),
        })
    }

    async fn run(&mut self, batch: &[LeaseRequest]) -> redis::RedisResult<Vec<(i64, i64)>> {
        let mut pipe = redis::pipe();
        for r in batch {
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(1)
                .arg(&*r.key)
                .arg(r.per_second)
                .arg(r.capacity)
                .arg(r.debt)
                .arg(r.delta);
        }
        pipe.query_async(&mut self.conn).await
    }
}

impl LeaseStore for RedisLeases {
    fn exchange<'a>(&'a mut self, batch: &'a [LeaseRequest]) -> LeaseFuture<'a> {
        Box::pin(async move {
            self.exchange_once(batch).await.map_err(|e| {
                // The client's own time limit: counted as a timeout, not an error.
                if e.is_timeout() {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, e).into()
                } else {
                    e.into()
                }
            })
        })
    }
}

impl RedisLeases {
    /// One batch: `PING` when empty, else the script per key, loading it again if
    /// Redis lost it.
    async fn exchange_once(
        &mut self,
        batch: &[LeaseRequest],
    ) -> redis::RedisResult<Vec<LeaseGrant>> {
        if batch.is_empty() {
            redis::cmd("PING").query_async::<()>(&mut self.conn).await?;
            return Ok(Vec::new());
        }
        let answers = match self.run(batch).await {
            // A restarted (or flushed) Redis has lost the script: load it, once.
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(SCRIPT)
                    .query_async::<String>(&mut self.conn)
                    .await?;
                self.run(batch).await?
            }
            other => other?,
        };
        Ok(answers
            .into_iter()
            .map(|(granted, balance)| LeaseGrant {
                granted: u64::try_from(granted).unwrap_or(0),
                balance,
            })
            .collect())
    }
}
