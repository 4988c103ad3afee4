//! `bramble-image`: parses flags and builds the image (see the crate docs for what it does).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad flags (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

/// Makes flashable Raspberry Pi SD-card images with the Bramble agent inside.
#[derive(Parser, Debug)]
#[command(name = "bramble-image", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Writes a copy of a Raspberry Pi OS (Bookworm, Trixie) or Ubuntu image that joins
    /// the cluster on first boot.
    Build(BuildArgs),
}

#[derive(clap::Args, Debug)]
struct BuildArgs {
    /// The base image, `.img` or `.img.xz` (never modified).
    #[arg(long)]
    base: PathBuf,
    /// The image to write (`.img`); written as OUT.partial and renamed when complete.
    #[arg(long)]
    out: PathBuf,
    /// Controller URL, e.g. https://10.0.0.2:7878 [default: found over mDNS on the Pi].
    #[arg(long, env = "BRAMBLE_CONTROLLER")]
    controller: Option<String>,
    /// File with the cluster's join token, `BRAMBLE1-…` (the controller's data dir has it
    /// as join-token).
    #[arg(
        long,
        env = "BRAMBLE_JOIN_TOKEN_FILE",
        value_name = "FILE",
        required_unless_present = "join_token",
        conflicts_with = "join_token"
    )]
    join_token_file: Option<PathBuf>,
    /// The join token itself, from the environment (a flag would show it in argv).
    #[arg(long, env = "BRAMBLE_JOIN_TOKEN", hide_env_values = true, hide = true)]
    join_token: Option<String>,
    /// The agent binary [default: target/<triple>/release/bramble-agent for the image's
    /// architecture, as scripts/cross-build.sh --release makes it].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The static cron gate installed beside the agent, so cron runs start on time
    /// [default: bramble-gate beside the agent binary, if there].
    #[arg(long, value_name = "FILE")]
    gate: Option<PathBuf>,
    /// Hostnames become PREFIX-xxxxxx, from the last six hex digits of each board's serial.
    #[arg(long, default_value = "bramble")]
    hostname_prefix: String,
    /// An OpenSSH public key file to authorise for the first user.
    #[arg(long)]
    ssh_key: Option<PathBuf>,
    /// The user the SSH key is for [default: pi on Raspberry Pi OS, ubuntu on Ubuntu].
    #[arg(long)]
    ssh_user: Option<String>,
    /// Wi-Fi network to join.
    #[arg(long, requires = "wifi_password_file")]
    wifi_ssid: Option<String>,
    /// File with the Wi-Fi passphrase on one line (kept off the command line and history).
    #[arg(long, requires = "wifi_ssid")]
    wifi_password_file: Option<PathBuf>,
    /// Wi-Fi country (ISO 3166), which decides the channels the Pi may use.
    #[arg(long, default_value = "GB")]
    wifi_country: String,
    /// Node label key=value for the agent (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let Command::Build(a) = cli.command;
    let join_token = match (a.join_token, &a.join_token_file) {
        (Some(t), _) => t,
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(t) => t.trim().to_string(),
            Err(e) => {
                eprintln!("error: --join-token-file {}: {e}", path.display());
                return ExitCode::from(EX_USAGE);
            }
        },
        (None, None) => {
            eprintln!("error: give the join token: --join-token-file FILE or BRAMBLE_JOIN_TOKEN");
            return ExitCode::from(EX_USAGE);
        }
    };
    remove_partial_on_signal(&a.out);
    let opts = bramble_image::Options {
        base: a.base,
        out: a.out.clone(),
        agent: a.agent,
        gate: a.gate,
        controller: a.controller,
        join_token,
        hostname_prefix: a.hostname_prefix,
        labels: a.labels,
        ssh_key: a.ssh_key,
        ssh_user: a.ssh_user,
        wifi_ssid: a.wifi_ssid,
        wifi_password_file: a.wifi_password_file,
        wifi_country: a.wifi_country,
        progress: !a.quiet,
    };
    match bramble_image::build(&opts) {
        Ok(r) => {
            println!(
                "wrote {}: {} ({}), agent {}",
                a.out.display(),
                r.os,
                r.arch,
                r.agent.display()
            );
            match &r.gate {
                Some(g) => println!("cron gate {}", g.display()),
                None => println!(
                    "no cron gate (bramble-gate beside the agent, or --gate): cron runs will start a Docker start late"
                ),
            }
            println!("boot partition: {}", r.files.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", bramble_api::error_chain(&e));
            match e {
                bramble_image::Error::Usage(_) => ExitCode::from(EX_USAGE),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// On Ctrl-C or SIGTERM, removes `OUT.partial` (which `build` removes itself on any
/// error, but a signal ends the process without unwinding) and exits 130.
fn remove_partial_on_signal(out: &std::path::Path) {
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let Ok(mut signals) = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) else {
        return;
    };
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = std::fs::remove_file(&partial);
            eprintln!("interrupted: nothing written");
            std::process::exit(130);
        }
    });
}
