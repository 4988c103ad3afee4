//! `completion SHELL`.

use std::io::Write;

use anyhow::Result;
use clap::CommandFactory;

use crate::args::{Cli, CompletionArgs};

/// Prints the completion script.
pub fn run(args: &CompletionArgs, out: &mut dyn Write) -> Result<()> {
    let mut cmd = Cli::command();
    // Into memory first: clap_complete panics when its writer fails (`| head`).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "bramblectl", &mut script);
    out.write_all(&script)?;
    out.flush()?;
    Ok(())
}
