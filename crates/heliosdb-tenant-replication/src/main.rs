//! The binary: parse the command line and hand over to [`cli::run`].

use clap::Parser;
use heliosdb_tenant_replication::cli;

fn main() -> std::process::ExitCode {
    cli::run(cli::Cli::parse())
}
