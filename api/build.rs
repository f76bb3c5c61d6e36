//! Generates the protobuf and tonic code with a vendored `protoc`, so no system
//! protoc is needed to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // `set_var` is unsafe in edition 2024 because another thread could read the
    // environment at the same time; this build script runs no other threads.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::configure()
        // Snapshot bytes are cloned once per connected proxy; `Bytes` makes that a refcount bump.
        .bytes(".sluice.v1.Snapshot.canonical")
        .compile_protos(
            &[
                "proto/sluice/v1/policy.proto",
                "proto/sluice/v1/identity.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
