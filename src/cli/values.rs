//! Option values checked at the edge (counts, numbers, variant names) and clap's errors
//! as one line.

use std::process::ExitCode;

use lora_graft::passes::variants::{self, Alpha, Variant};
use lora_graft::{Error, Result};

/// alpha as given (`16` stays an integer, `16.0` a float).
pub fn parse_alpha(text: &str) -> Result<Alpha> {
    Alpha::parse(text).ok_or_else(|| Error::Usage(format!("--alpha '{text}' is not a number")))
}

/// The number of cores (the default of `--threads`).
pub fn every_core() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A count that must be at least 1 (`--batch`, `--seq`, `--steps`).
pub(super) fn at_least_one(text: &str) -> Result<usize> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(Error::Usage(format!(
            "'{text}' is not a whole number of at least 1"
        ))),
    }
}

/// A finite number (`--lambda0`).
pub(super) fn finite(text: &str) -> Result<f64> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(Error::Usage(format!("'{text}' is not a finite number"))),
    }
}

/// A finite number above 0.
pub(super) fn finite_positive(text: &str) -> Result<f64> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(Error::Usage(format!(
            "'{text}' is not a finite number above 0"
        ))),
    }
}

/// A finite number of at least 0 (`--grad-clip`; 0 turns clipping off).
pub(super) fn finite_non_negative(text: &str) -> Result<f64> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(Error::Usage(format!(
            "'{text}' is not a finite number of at least 0"
        ))),
    }
}

/// Resolves `--variant NAME` in the registry, once.
pub(super) fn parse_variant(name: &str) -> Result<&'static dyn Variant> {
    variants::variant(name)
}

/// The registry's names joined by `sep` (the last two by ` or ` when `sep` is `, `).
pub fn variant_names(last_sep: &str) -> String {
    let names: Vec<&str> = variants::VARIANTS.iter().map(|v| v.name()).collect();
    if last_sep == "|" {
        return names.join("|");
    }
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{}{last_sep}{last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// A bad value of an option is a one-line error and exit code 1, like every other
/// usage error; the rest (help, version, missing arguments) is clap's.
pub fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use std::error::Error as _;
    let text = |k| match e.get(k) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(v)) => v.join(", "),
        _ => String::new(),
    };
    match e.kind() {
        ErrorKind::ValueValidation => {
            if let Some(source) = e.source() {
                eprintln!("error: {}: {source}", text(ContextKind::InvalidArg));
                return ExitCode::FAILURE;
            }
        }
        ErrorKind::InvalidValue => {
            eprintln!(
                "error: {}: unknown value '{}'; choose one of {}",
                text(ContextKind::InvalidArg),
                text(ContextKind::InvalidValue),
                text(ContextKind::ValidValue)
            );
            return ExitCode::FAILURE;
        }
        _ => {}
    }
    e.exit()
}
