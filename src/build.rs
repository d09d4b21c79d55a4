//! Generates the ONNX protobuf types from `src/onnx/onnx.proto` with a pure-Rust
//! protobuf compiler (protox), so that building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "src/onnx/onnx.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["src/onnx"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
