//! The `lora-graft` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lora_graft::{inspect, Model};

/// Graft LoRA-family adapters into ONNX models.
#[derive(Parser)]
#[command(name = "lora-graft", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summarise a model: versions, inputs and outputs, ops, weights, external data.
    Inspect {
        /// The .onnx file.
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> lora_graft::Result<()> {
    match cli.command {
        Command::Inspect { model, json } => {
            let model = Model::load(&model)?;
            let report = inspect::Report::new(&model);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serialisable")
                );
            } else {
                print!("{report}");
            }
        }
    }
    Ok(())
}
