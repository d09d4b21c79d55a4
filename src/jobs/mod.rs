//! The user-facing jobs, one file each, as short functions over typed requests:
//! grafting and applying ([`graft`]), merging ([`merge`]), training graphs
//! ([`training_graph`]); where they write ([`output`]).

pub mod export;
pub mod graft;
pub mod merge;
pub mod output;
pub mod request;
pub mod training_graph;

pub use graft::{apply, expose_fused_projections, graft, lower, set_param, Outcome};
pub use merge::merge;
pub use output::{default_paths, write, OutputPlan};
pub use request::{AdapterDtype, GraftRequest, TrainingRequest};
pub use training_graph::{input_shapes, training_graph, training_graph_of, Training};
