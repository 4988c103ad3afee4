//! `bramblectl`: see the library crate for the commands.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match bramblectl::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(hint) = bramblectl::args::suggest_command(&e) {
                eprintln!("{hint}");
                return ExitCode::from(bramblectl::error::EXIT_USAGE);
            }
            e.exit()
        }
    };
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
