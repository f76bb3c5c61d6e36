//! One module per command; [`run`] dispatches.

pub mod breakers;
pub mod diff;
pub mod explain;
pub mod rollout;
pub mod status;
pub mod tap;
pub mod top;
pub mod validate;

use crate::args::Command;
use crate::error::CliError;
use crate::{Ctx, Verdict};

/// Runs one command.
pub async fn run(ctx: &mut Ctx<'_>, command: Command) -> Result<Verdict, CliError> {
    match command {
        Command::Breakers(args) => breakers::run(ctx, args).await,
        Command::Explain(args) => explain::run(ctx, args).await,
        Command::Validate(args) => validate::run(ctx, args).await,
        Command::Status(args) => status::run(ctx, args).await,
        Command::Top(args) => top::run(ctx, args).await,
        Command::Diff(args) => diff::run(ctx, args).await,
        Command::Tap(args) => tap::run(ctx, args).await,
        Command::Rollout(command) => rollout::run(ctx, command).await,
    }
}
