//! `bramblectl`: see the library crate for the commands.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = bramblectl::Cli::parse();
    bramblectl::client::install_tls_provider();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(bramblectl::run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ExitCode::from(bramblectl::report(&e, &mut std::io::stderr())),
    }
}
