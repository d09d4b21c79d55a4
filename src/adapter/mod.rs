//! Adapter files behind one type: the safetensors file ([`file`]), its typed metadata
//! ([`meta`]), and reading one for a model ([`load`]). A new format is one file here.

pub mod file;
pub mod load;
pub mod meta;
pub mod onnx_adapter;
pub mod peft;

pub use file::{AdapterFile, CFG_KEY, GRAFT_KEY};
pub use load::{split_key, AdapterOverrides, LoadedAdapter};
pub use onnx_adapter::OnnxAdapter;
