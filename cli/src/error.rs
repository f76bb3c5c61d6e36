//! Why a command could not give its answer, each said in one line.

use std::path::PathBuf;

/// What went wrong talking to an admin API or reading local input.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The admin URL is not an `http://host:port` URL.
    #[error("{what} URL {url:?} is not an http://host:port URL: {reason}")]
    BadUrl {
        /// `proxy` or `control plane`.
        what: &'static str,
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection could be made, or it broke before an answer.
    #[error("cannot reach the {what} admin at {url}: {reason}")]
    Unreachable {
        /// `proxy` or `control plane`.
        what: &'static str,
        /// The admin's base URL.
        url: String,
        /// The transport's error.
        reason: String,
    },
    /// No answer within `--timeout`.
    #[error("the {what} admin at {url} did not answer {path} within {secs:.1}s")]
    Timeout {
        /// `proxy` or `control plane`.
        what: &'static str,
        /// The admin's base URL.
        url: String,
        /// The path asked for.
        path: String,
        /// The timeout in seconds.
        secs: f64,
    },
    /// 401 or 403: the token is missing, wrong, or the admin has none configured.
    #[error("the {what} admin at {url} refused {path} ({status}): {hint}")]
    Refused {
        /// `proxy` or `control plane`.
        what: &'static str,
        /// The admin's base URL.
        url: String,
        /// The path asked for.
        path: String,
        /// The HTTP status.
        status: u16,
        /// What to do about it.
        hint: String,
    },
    /// Any other status that is not a success.
    #[error("the {what} admin at {url} answered {path} with {status}: {body}")]
    Status {
        /// `proxy` or `control plane`.
        what: &'static str,
        /// The admin's base URL.
        url: String,
        /// The path asked for.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The first line of the answer's body.
        body: String,
    },
    /// The answer is not what the admin API documents.
    #[error("the {what} admin at {url} answered {path} with something unexpected: {reason}")]
    Malformed {
        /// `proxy` or `control plane`.
        what: &'static str,
        /// The admin's base URL.
        url: String,
        /// The path asked for.
        path: String,
        /// What did not parse.
        reason: String,
    },
    /// A local file (token, policy) could not be read.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// A command-line value clap cannot check (a header without `:`, an empty filter).
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// The process exit code for this error: 2 for what the user gave (flags, files),
    /// 3 for an admin API that could not be used.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::BadUrl { .. } | CliError::File { .. } | CliError::Usage(_) => 2,
            _ => 3,
        }
    }
}
