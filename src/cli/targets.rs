//! lora-lite's targeting options, compiled once into `Filters`.

use clap::Args;
use lora_graft::adapter::meta::FilterText;
use lora_graft::passes::target::{Filters, Role};
use lora_graft::{Error, Result};
use regex::Regex;

use super::values::at_least_one;

/// lora-lite's targeting knobs.
#[derive(Args, Clone, Debug)]
pub struct TargetArgs {
    /// Roles to adapt, comma-separated: reader, writer, inner.
    #[arg(long, value_delimiter = ',', default_value = "reader,writer")]
    pub target_roles: Vec<String>,
    /// Adapt only modules matching this regex (repeatable).
    #[arg(long = "target-names", value_name = "REGEX")]
    pub target_names: Vec<String>,
    /// Skip modules matching this regex (repeatable; default: lm_head, embed_tokens).
    #[arg(long = "exclude-names", value_name = "REGEX", default_values = ["lm_head", "embed_tokens"])]
    pub exclude_names: Vec<String>,
    /// Adapt only these layer indices, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Remove this prefix from module names (e.g. a wrapper's `m.`).
    #[arg(long)]
    pub strip_prefix: Option<String>,
    /// The residual width, when the model has no token embedding to tell it.
    #[arg(long, value_parser = at_least_one)]
    pub d_model: Option<usize>,
    /// Role of square layers matching REGEX: `REGEX=reader` or `REGEX=writer` (repeatable).
    #[arg(long = "role", value_name = "REGEX=ROLE")]
    pub roles: Vec<String>,
    /// Also adapt output heads (the last linear before an output, to a vocabulary or
    /// class count), which are left out by default.
    #[arg(long)]
    pub include_heads: bool,
}

fn regex(s: &str, flag: &str) -> Result<Regex> {
    Regex::new(s).map_err(|e| {
        let why = lora_graft::error::regex_reason(&e);
        Error::Usage(format!("{flag} '{s}' is not a valid regex: {why}"))
    })
}

impl TargetArgs {
    /// The filters as the user wrote them.
    pub fn text(&self) -> FilterText {
        FilterText {
            roles: self.target_roles.clone(),
            names: self.target_names.clone(),
            excludes: self.exclude_names.clone(),
            layers: self.layers.clone(),
        }
    }

    /// The filters, compiled.
    pub fn filters(&self) -> Result<Filters> {
        Ok(Filters {
            roles: self
                .target_roles
                .iter()
                .map(|r| Role::parse(r))
                .collect::<Result<_>>()?,
            names: self
                .target_names
                .iter()
                .map(|s| regex(s, "--target-names"))
                .collect::<Result<_>>()?,
            excludes: self
                .exclude_names
                .iter()
                .map(|s| regex(s, "--exclude-names"))
                .collect::<Result<_>>()?,
            layers: self.layers.clone(),
            strip_prefix: self.strip_prefix.clone(),
            d_model: self.d_model,
            role_overrides: self
                .roles
                .iter()
                .map(|s| {
                    let (re, role) = s.rsplit_once('=').ok_or_else(|| {
                        Error::Usage(format!(
                            "--role '{s}' should be REGEX=reader or REGEX=writer"
                        ))
                    })?;
                    Ok((regex(re, "--role")?, Role::parse(role)?))
                })
                .collect::<Result<_>>()?,
            modules: None,
            include_heads: self.include_heads,
        })
    }
}
