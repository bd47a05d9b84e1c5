//! The GRS gRPC API.
//!
//! - [`v1`]: `grs.v1.ControlPlane`, the control plane's API for the webhook
//!   gateway and operators (source: `grs/v1/control_plane.proto`, where every
//!   message and field is documented).
//! - [`provisioner::v1`]: `grs.provisioner.v1.Provisioner`, the protocol
//!   of provisioner plugins (source: `grs/provisioner/v1/provisioner.proto`;
//!   guide: `docs/provisioner-plugins.md`).
//! - [`FILE_DESCRIPTOR_SET`], [`PROVISIONER_FILE_DESCRIPTOR_SET`]: the
//!   encoded descriptors of each service's `.proto`, for server reflection
//!   (grpcurl works with no `.proto` at hand).
//!
//! The code is generated at build time by protox + tonic-prost-build: no
//! system `protoc` is needed.

/// `grs.v1`: the control plane API.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("grs.v1");
}

/// `grs.provisioner.v1`: the provisioner plugin protocol.
pub mod provisioner {
    /// Version 1.
    #[allow(missing_docs, clippy::all, missing_debug_implementations)]
    pub mod v1 {
        tonic::include_proto!("grs.provisioner.v1");
    }
}

/// Wire limits of `grs.v1`, defined once: the control plane refuses what
/// exceeds them (INVALID_ARGUMENT naming the field) and the gateway refuses
/// a webhook that would (400) instead of sending it.
///
/// Most labels one job event may carry (GitHub's own limit per runner).
pub const MAX_LABELS: usize = 100;
/// Longest label, delivery id, name or other string field of a job event, in
/// bytes.
pub const MAX_FIELD_LEN: usize = 256;
/// Most events one `SubmitJobEvents` call may carry.
pub const MAX_BATCH: usize = 256;

/// Encoded `FileDescriptorSet` of `grs.v1`, for `tonic-reflection` on the
/// control plane.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/grs_descriptor.bin"));

/// Encoded `FileDescriptorSet` of `grs.provisioner.v1`, for
/// `tonic-reflection` on provisioner plugins.
pub const PROVISIONER_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/grs_provisioner_descriptor.bin"));

/// `EventError` is a `tonic::Status` carried inside a `SubmitJobEvents`
/// result: the one conversion each way, for the server and its clients.
impl From<&tonic::Status> for v1::EventError {
    fn from(s: &tonic::Status) -> Self {
        Self {
            code: s.code() as i32,
            message: s.message().to_owned(),
        }
    }
}

impl From<v1::EventError> for tonic::Status {
    fn from(e: v1::EventError) -> Self {
        tonic::Status::new(tonic::Code::from_i32(e.code), e.message)
    }
}
