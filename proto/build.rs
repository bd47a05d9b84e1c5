//! Generates the gRPC code from `grs/**/*.proto` without a system `protoc`:
//! protox parses the files into descriptor sets, tonic-prost-build generates
//! from them, and each encoded set is written to OUT_DIR for server
//! reflection (one per service, so a server lists only what it serves).

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    for (proto, descriptor) in [
        ("grs/v1/control_plane.proto", "grs_descriptor.bin"),
        (
            "grs/provisioner/v1/provisioner.proto",
            "grs_provisioner_descriptor.bin",
        ),
    ] {
        println!("cargo:rerun-if-changed={proto}");
        let fds = protox::compile([proto], ["."])?;
        fs::write(out.join(descriptor), fds.encode_to_vec())?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(fds)?;
    }
    Ok(())
}
