//! `status`: every proxy the control plane knows, with the version it was sent, the one
//! it acked and the one it refused (and why), drift, and, for the proxies whose admin
//! ports are given with `--proxy`, certificate expiry. A NACK of the newest version
//! sent, or a connected proxy that has not acked what it was sent within `--grace`, is
//! a failure (exit 1): a refused snapshot is not reconciled.

use std::time::Duration;

use serde::Deserialize;

use crate::args::StatusArgs;
use crate::error::CliError;
use crate::table::{Table, now_ms, short, span, utc};
use crate::{Ctx, Verdict};

/// `GET /proxies` of the control plane.
#[derive(Debug, Deserialize)]
pub struct ProxiesAnswer {
    /// The version the control plane serves now.
    pub version: Option<String>,
    /// Every proxy it has seen.
    pub proxies: Vec<ProxyRecord>,
}

/// One proxy as the control plane's `/proxies` shows it (the fields used here).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ProxyRecord {
    /// Its node id.
    pub node_id: String,
    /// The address its stream came from.
    pub peer: Option<String>,
    /// Another open stream says the same node id (each has its own row).
    pub duplicate_node_id: bool,
    /// Its namespace.
    pub namespace: String,
    /// The service it fronts.
    pub service: String,
    /// The last version sent to it.
    pub version_sent: Option<String>,
    /// When (ms since the Unix epoch).
    pub sent_at_unix_ms: Option<u64>,
    /// The last version it acked.
    pub acked_version: Option<String>,
    /// The last version it refused.
    pub nacked_version: Option<String>,
    /// Why.
    pub nack_error: Option<String>,
    /// When (ms since the Unix epoch).
    pub nacked_at_unix_ms: Option<u64>,
    /// Whether its stream is open now.
    pub connected: bool,
    /// Last message from it.
    pub last_seen_unix_ms: u64,
}

/// A proxy's own `/config` (the fields used here).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProxyConfigAnswer {
    version: Option<String>,
    node_id: Option<String>,
    identity: Identity,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Identity {
    mtls: bool,
    spiffe_id: Option<String>,
    not_after: Option<String>,
    /// The certificate held has expired (renewal keeps failing).
    expired: bool,
}

/// Where a proxy stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// It acked the version it was sent.
    InSync,
    /// It refused the newest version it was sent.
    Nack,
    /// Connected, and has not acked what it was sent for longer than the grace.
    Drift,
    /// Has not acked yet, within the grace.
    Pending,
    /// Its stream is closed (its last state is kept).
    Disconnected,
    /// Given with `--proxy` but unknown to the control plane (standalone, or another
    /// control plane's).
    Unknown,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::InSync => "in-sync",
            State::Nack => "NACK",
            State::Drift => "DRIFT",
            State::Pending => "pending",
            State::Disconnected => "disconnected",
            State::Unknown => "not-on-control-plane",
        }
    }

    fn failing(self) -> bool {
        matches!(self, State::Nack | State::Drift)
    }
}

/// Where `r` stands at `now` (ms), allowing `grace` for an ack.
pub fn state_of(r: &ProxyRecord, now: u64, grace: Duration) -> State {
    if r.version_sent.is_some() && r.nacked_version == r.version_sent {
        return State::Nack;
    }
    if !r.connected {
        return State::Disconnected;
    }
    if r.version_sent.is_none() || r.acked_version == r.version_sent {
        return State::InSync;
    }
    let waited = now.saturating_sub(r.sent_at_unix_ms.unwrap_or(now));
    if waited > grace.as_millis() as u64 {
        State::Drift
    } else {
        State::Pending
    }
}

/// Runs `status`.
pub async fn run(ctx: &mut Ctx<'_>, args: StatusArgs) -> Result<Verdict, CliError> {
    let cp = ctx.control_plane()?;
    let answer: ProxiesAnswer = cp.get_json("/proxies").await?;
    // Certificates are known to each proxy only: ask those named with --proxy.
    let mut admins = Vec::new();
    for p in ctx.explicit_proxies()? {
        let config: ProxyConfigAnswer = p.get_json("/config").await?;
        admins.push((p.url().to_string(), config));
    }
    let now = now_ms();
    let grace = args.grace.get();
    let mut rows = Vec::new();
    for r in &answer.proxies {
        let admin = admins
            .iter()
            .position(|(_, c)| c.node_id.as_deref() == Some(r.node_id.as_str()));
        let admin = admin.map(|i| admins.remove(i));
        rows.push(Row {
            state: state_of(r, now, grace),
            record: r.clone(),
            admin,
        });
    }
    for (url, config) in admins {
        rows.push(Row {
            state: State::Unknown,
            record: ProxyRecord {
                node_id: config.node_id.clone().unwrap_or_else(|| url.clone()),
                acked_version: config.version.clone(),
                ..Default::default()
            },
            admin: Some((url, config)),
        });
    }
    let expired = rows
        .iter()
        .any(|r| r.admin.as_ref().is_some_and(|(_, c)| c.identity.expired));
    let failing = rows.iter().any(|r| r.state.failing()) || expired;
    if ctx.json() {
        let proxies: Vec<_> = rows
            .iter()
            .map(|row| {
                let r = &row.record;
                let identity = row.admin.as_ref().map(|(_, c)| &c.identity);
                serde_json::json!({
                    "node_id": r.node_id,
                    "peer": r.peer,
                    "duplicate_node_id": r.duplicate_node_id,
                    "namespace": r.namespace,
                    "service": r.service,
                    "state": row.state.as_str(),
                    "connected": r.connected,
                    "version_sent": r.version_sent,
                    "acked_version": r.acked_version,
                    "nacked_version": r.nacked_version,
                    "nack_error": r.nack_error,
                    "admin": row.admin.as_ref().map(|(u, _)| u),
                    "proxy_version": row.admin.as_ref().and_then(|(_, c)| c.version.clone()),
                    "mtls": identity.map(|i| i.mtls),
                    "spiffe_id": identity.and_then(|i| i.spiffe_id.clone()),
                    "cert_not_after": identity.and_then(|i| i.not_after.clone()),
                    "cert_expired": identity.map(|i| i.expired),
                })
            })
            .collect();
        ctx.print_json(&serde_json::json!({
            "ok": !failing,
            "version": answer.version,
            "proxies": proxies,
        }))?;
        return Ok(if failing {
            Verdict::Failing
        } else {
            Verdict::Ok
        });
    }
    let mut text = format!(
        "control plane {} serves version {}\n\n",
        cp.url(),
        answer.version.as_deref().unwrap_or("(none yet)")
    );
    let mut t = Table::new([
        "PROXY",
        "SERVICE",
        "STATE",
        "SENT",
        "ACKED",
        "NACKED",
        "LAST SEEN",
        "CERT EXPIRES",
    ]);
    let dash = || "-".to_string();
    for row in &rows {
        let r = &row.record;
        let cert = match row.admin.as_ref().map(|(_, c)| &c.identity) {
            None => dash(),
            Some(i) if !i.mtls => "no mTLS".into(),
            Some(i) if i.expired => format!("EXPIRED {}", i.not_after.as_deref().unwrap_or("?")),
            Some(i) => i.not_after.clone().unwrap_or_else(|| "none yet".into()),
        };
        let seen = if r.last_seen_unix_ms == 0 {
            dash()
        } else {
            format!(
                "{} ago",
                span(Duration::from_millis(
                    now.saturating_sub(r.last_seen_unix_ms)
                ))
            )
        };
        t.row([
            if r.duplicate_node_id {
                // Which of the proxies sharing the id this row is.
                format!("{} (dup, {})", r.node_id, r.peer.as_deref().unwrap_or("?"))
            } else {
                r.node_id.clone()
            },
            if r.service.is_empty() {
                dash()
            } else {
                format!("{}/{}", r.namespace, r.service)
            },
            row.state.as_str().to_string(),
            r.version_sent
                .as_deref()
                .map_or_else(dash, |v| short(v).into()),
            r.acked_version
                .as_deref()
                .map_or_else(dash, |v| short(v).into()),
            r.nacked_version
                .as_deref()
                .map_or_else(dash, |v| short(v).into()),
            seen,
            cert,
        ]);
    }
    if t.is_empty() {
        text.push_str("no proxy has connected\n");
    } else {
        text.push_str(&t.render());
    }
    let nacks: Vec<&Row> = rows
        .iter()
        .filter(|r| r.record.nack_error.is_some())
        .collect();
    if !nacks.is_empty() {
        text.push_str("\nrefusals (NACK):\n");
        for row in nacks {
            let r = &row.record;
            text.push_str(&format!(
                "  {} refused {} at {}: {}\n",
                r.node_id,
                r.nacked_version.as_deref().map_or("?", short),
                r.nacked_at_unix_ms.map_or_else(dash, utc),
                r.nack_error.as_deref().unwrap_or("")
            ));
        }
    }
    let mut duplicated: Vec<&str> = rows
        .iter()
        .filter(|r| r.record.duplicate_node_id)
        .map(|r| r.record.node_id.as_str())
        .collect();
    duplicated.dedup();
    for node in duplicated {
        text.push_str(&format!(
            "\nnode id {node} is used by more than one connected proxy: each is listed on its own row; give every proxy its own --node-id\n"
        ));
    }
    if rows.iter().any(|r| r.state.failing()) {
        text.push_str("\nnot in sync: a proxy refused or has not acked the version it was sent\n");
    }
    if expired {
        text.push_str("\na proxy's workload certificate has expired: its renewal keeps failing (see its log); peers refuse it\n");
    }
    ctx.print(&text)?;
    Ok(if failing {
        Verdict::Failing
    } else {
        Verdict::Ok
    })
}

struct Row {
    state: State,
    record: ProxyRecord,
    admin: Option<(String, ProxyConfigAnswer)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        sent: &str,
        acked: Option<&str>,
        nacked: Option<&str>,
        connected: bool,
    ) -> ProxyRecord {
        ProxyRecord {
            node_id: "n".into(),
            version_sent: Some(sent.into()),
            sent_at_unix_ms: Some(1_000),
            acked_version: acked.map(Into::into),
            nacked_version: nacked.map(Into::into),
            connected,
            ..Default::default()
        }
    }

    #[test]
    fn a_nack_of_the_newest_version_is_never_in_sync() {
        let grace = Duration::from_secs(10);
        let at = |s: u64| 1_000 + s * 1000;
        assert_eq!(
            state_of(&record("b", Some("b"), None, true), at(1), grace),
            State::InSync
        );
        assert_eq!(
            state_of(&record("b", Some("a"), Some("b"), true), at(1), grace),
            State::Nack
        );
        // A NACK of an older version, then an ack of the newest: in sync.
        assert_eq!(
            state_of(&record("c", Some("c"), Some("b"), true), at(1), grace),
            State::InSync
        );
        assert_eq!(
            state_of(&record("b", Some("a"), None, true), at(5), grace),
            State::Pending
        );
        // The grace is the time allowed: exactly at it still pending.
        assert_eq!(
            state_of(&record("b", Some("a"), None, true), at(10), grace),
            State::Pending
        );
        assert_eq!(
            state_of(&record("b", Some("a"), None, true), at(10) + 1, grace),
            State::Drift
        );
        assert_eq!(
            state_of(&record("b", Some("a"), None, false), at(99), grace),
            State::Disconnected
        );
        assert_eq!(
            state_of(&record("b", Some("a"), Some("b"), false), at(99), grace),
            State::Nack
        );
        assert!(State::Nack.failing() && State::Drift.failing() && !State::Pending.failing());
    }
}
