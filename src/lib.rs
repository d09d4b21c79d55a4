//! lora-graft: a model-graph rewriting compiler that grafts LoRA-family adapters into
//! ONNX models, trains them with tract, and merges them back.
//!
//! ```text
//! model.onnx -> model::Model::load -> ir::Graph -> passes::* (run_pass) -> Model::save
//! ```
//!
//! [`jobs`] compose the passes for typed requests; [`adapter`] reads and writes adapter
//! files; [`train`] runs training graphs on tract.

pub mod adapter;
pub mod calibrate;
pub mod commit;
pub mod data;
pub mod dtype;
pub mod error;
pub mod files;
pub mod inspect;
pub mod interp;
pub mod ir;
pub mod jobs;
pub mod linalg;
pub mod model;
pub mod parallel;
pub mod quant;
pub mod rng;
pub mod runtime;
pub mod tensor;
pub mod train;

#[path = "../passes/mod.rs"]
pub mod passes;

/// ONNX protobuf types generated from `src/onnx/onnx.proto` (prost, at build time).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use error::{Error, Result};
pub use model::Model;
