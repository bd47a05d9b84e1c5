//! The one conversion each way between the trait's types and the wire's,
//! for the client and the server alike.
//!
//! # Error codes
//! | `ProvisionerError` | gRPC code             |
//! |--------------------|-----------------------|
//! | `Transient`        | `UNAVAILABLE`         |
//! | `NoCapacity`       | `RESOURCE_EXHAUSTED`  |
//! | `NotOwned`         | `PERMISSION_DENIED`   |
//! | `InvalidSpec`      | `INVALID_ARGUMENT`    |
//! | `Config`           | `FAILED_PRECONDITION` |
//! | `UnknownPool`      | `NOT_FOUND`           |
//! | `Unsupported`      | `UNIMPLEMENTED`       |
//! | `Permanent`        | `INTERNAL`            |
//!
//! Read back, `DEADLINE_EXCEEDED`, `ABORTED` and `CANCELLED` are transient
//! too, `UNAUTHENTICATED` is a configuration error, and every other code is
//! permanent. `NotOwned` carries no name on the wire: the client knows the
//! name it asked about.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grs_proto::provisioner::v1 as pb;
use grs_provisioner::{
    Bootstrap, BootstrapKind, Instance, InstanceSpec, InstanceState, ProvisionerError,
};
use secrecy::{ExposeSecret, SecretString};
use tonic::{Code, Status};

/// The status a backend's error travels as.
pub fn error_to_status(e: &ProvisionerError) -> Status {
    let code = match e {
        ProvisionerError::Transient(_) => Code::Unavailable,
        ProvisionerError::NoCapacity(_) => Code::ResourceExhausted,
        ProvisionerError::NotOwned { .. } => Code::PermissionDenied,
        ProvisionerError::InvalidSpec(_) => Code::InvalidArgument,
        ProvisionerError::Config(_) => Code::FailedPrecondition,
        ProvisionerError::UnknownPool(_) => Code::NotFound,
        ProvisionerError::Unsupported(_) => Code::Unimplemented,
        ProvisionerError::Permanent(_) => Code::Internal,
    };
    // The message only: the kind is in the code, so the client does not
    // repeat the kind's prefix ("no capacity: no capacity: ...").
    let message = match e {
        ProvisionerError::Transient(m)
        | ProvisionerError::NoCapacity(m)
        | ProvisionerError::InvalidSpec(m)
        | ProvisionerError::Config(m)
        | ProvisionerError::UnknownPool(m)
        | ProvisionerError::Unsupported(m)
        | ProvisionerError::Permanent(m) => m.clone(),
        ProvisionerError::NotOwned { .. } => e.to_string(),
    };
    Status::new(code, message)
}

/// The error a status stands for; `name` is the instance the call was
/// about (for `NotOwned`), `what` says which call failed.
pub fn status_to_error(s: &Status, name: &str, what: &str) -> ProvisionerError {
    let m = if s.message().is_empty() {
        format!("{what}: {}", s.code().description())
    } else {
        format!("{what}: {}", s.message())
    };
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => {
            ProvisionerError::Transient(m)
        }
        Code::ResourceExhausted => ProvisionerError::NoCapacity(m),
        Code::PermissionDenied => ProvisionerError::NotOwned {
            name: name.to_owned(),
        },
        Code::InvalidArgument => ProvisionerError::InvalidSpec(m),
        Code::FailedPrecondition | Code::Unauthenticated => ProvisionerError::Config(m),
        Code::NotFound => ProvisionerError::UnknownPool(m),
        Code::Unimplemented => ProvisionerError::Unsupported(m),
        _ => ProvisionerError::Permanent(m),
    }
}

/// The wire's state for `s`.
pub fn state_to_pb(s: InstanceState) -> pb::InstanceState {
    use pb::InstanceState as P;
    match s {
        InstanceState::PendingCreate => P::PendingCreate,
        InstanceState::Creating => P::Creating,
        InstanceState::Running => P::Running,
        InstanceState::Stopped => P::Stopped,
        InstanceState::Error => P::Error,
        InstanceState::PendingDelete => P::PendingDelete,
        InstanceState::Deleting => P::Deleting,
        InstanceState::Deleted => P::Deleted,
    }
}

/// The trait's state for a wire value; an unknown or unset value is an
/// error state (the plugin said something GRS cannot read).
pub fn state_from_pb(v: i32) -> InstanceState {
    use pb::InstanceState as P;
    match P::try_from(v).unwrap_or(P::Unspecified) {
        P::PendingCreate => InstanceState::PendingCreate,
        P::Creating => InstanceState::Creating,
        P::Running => InstanceState::Running,
        P::Stopped => InstanceState::Stopped,
        P::Error | P::Unspecified => InstanceState::Error,
        P::PendingDelete => InstanceState::PendingDelete,
        P::Deleting => InstanceState::Deleting,
        P::Deleted => InstanceState::Deleted,
    }
}

fn time_to_pb(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn time_from_pb(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos.min(999_999_999)))
}

/// An instance for the wire.
pub fn instance_to_pb(i: &Instance) -> pb::Instance {
    pb::Instance {
        name: i.name.clone(),
        provider_id: i.provider_id.clone(),
        pool: i.pool.clone(),
        job_id: i.job_id,
        state: state_to_pb(i.state) as i32,
        location: i.location.clone().unwrap_or_default(),
        created_at: i.created_at.map(time_to_pb),
    }
}

/// An instance from the wire.
pub fn instance_from_pb(i: pb::Instance) -> Instance {
    Instance {
        state: state_from_pb(i.state),
        created_at: i.created_at.as_ref().and_then(time_from_pb),
        name: i.name,
        provider_id: i.provider_id,
        pool: i.pool,
        job_id: i.job_id,
        location: (!i.location.is_empty()).then_some(i.location),
    }
}

/// A pool's bootstrap kind for the wire.
pub fn bootstrap_kind_to_pb(k: BootstrapKind) -> pb::BootstrapKind {
    match k {
        BootstrapKind::CloudInit => pb::BootstrapKind::CloudInit,
        BootstrapKind::GuestAgent => pb::BootstrapKind::GuestAgent,
        BootstrapKind::None => pb::BootstrapKind::None,
    }
}

/// A pool's bootstrap kind from the wire: unset (a plugin from before the
/// field) or unknown is cloud-init, as before the field existed.
pub fn bootstrap_kind_from_pb(k: i32) -> BootstrapKind {
    match pb::BootstrapKind::try_from(k) {
        Ok(pb::BootstrapKind::GuestAgent) => BootstrapKind::GuestAgent,
        Ok(pb::BootstrapKind::None) => BootstrapKind::None,
        _ => BootstrapKind::CloudInit,
    }
}

/// A create request for the wire (the bootstrap secrets included: the
/// channel to the plugin is local or the operator's to protect).
pub fn spec_to_pb(s: &InstanceSpec) -> pb::CreateRequest {
    use pb::bootstrap::Kind;
    let kind = match &s.bootstrap {
        Bootstrap::None => Kind::None(pb::NoBootstrap {}),
        Bootstrap::CloudInit { seed_url } => Kind::CloudInit(pb::CloudInit {
            seed_url: seed_url.expose_secret().to_owned(),
        }),
        Bootstrap::GuestAgent {
            path,
            content,
            command,
        } => Kind::GuestAgent(pb::GuestAgent {
            path: path.clone(),
            content: content.expose_secret().to_owned(),
            command: command.clone(),
        }),
    };
    pb::CreateRequest {
        name: s.name.clone(),
        pool: s.pool.clone(),
        job_id: s.job_id,
        labels: s.labels.clone(),
        bootstrap: Some(pb::Bootstrap { kind: Some(kind) }),
    }
}

/// A create request from the wire; an unset bootstrap is none.
pub fn spec_from_pb(r: pb::CreateRequest) -> InstanceSpec {
    use pb::bootstrap::Kind;
    let bootstrap = match r.bootstrap.and_then(|b| b.kind) {
        None | Some(Kind::None(_)) => Bootstrap::None,
        Some(Kind::CloudInit(c)) => Bootstrap::CloudInit {
            seed_url: SecretString::from(c.seed_url),
        },
        Some(Kind::GuestAgent(g)) => Bootstrap::GuestAgent {
            path: g.path,
            content: SecretString::from(g.content),
            command: g.command,
        },
    };
    InstanceSpec {
        name: r.name,
        pool: r.pool,
        job_id: r.job_id,
        labels: r.labels,
        bootstrap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_round_trips_through_its_code() {
        let kinds = [
            ProvisionerError::Transient("lock".into()),
            ProvisionerError::NoCapacity("full".into()),
            ProvisionerError::NotOwned {
                name: "grs-1".into(),
            },
            ProvisionerError::InvalidSpec("bad name".into()),
            ProvisionerError::Config("no template".into()),
            ProvisionerError::UnknownPool("pool x".into()),
            ProvisionerError::Unsupported("stop".into()),
            ProvisionerError::Permanent("boom".into()),
        ];
        for e in kinds {
            let back = status_to_error(&error_to_status(&e), "grs-1", "call");
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&e),
                "{e:?} came back as {back:?}"
            );
            assert_eq!(back.is_retryable(), e.is_retryable());
            if let ProvisionerError::NotOwned { name } = back {
                assert_eq!(name, "grs-1");
            } else {
                assert!(back.to_string().contains("call: "), "{back}");
            }
        }
    }

    #[test]
    fn codes_no_backend_sends_still_map_sensibly() {
        let t = |c| status_to_error(&Status::new(c, "x"), "n", "get");
        assert!(t(Code::DeadlineExceeded).is_retryable());
        assert!(t(Code::Aborted).is_retryable());
        assert!(matches!(
            t(Code::Unauthenticated),
            ProvisionerError::Config(_)
        ));
        assert!(matches!(t(Code::Unknown), ProvisionerError::Permanent(_)));
        assert!(matches!(t(Code::DataLoss), ProvisionerError::Permanent(_)));
    }

    #[test]
    fn instances_and_specs_survive_the_wire() {
        let i = Instance {
            name: "grs-7".into(),
            provider_id: "pve1/101".into(),
            pool: "linux".into(),
            job_id: Some(u64::MAX),
            state: InstanceState::Stopped,
            location: Some("pve1".into()),
            created_at: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
        };
        assert_eq!(instance_from_pb(instance_to_pb(&i)), i);
        let bare = Instance {
            job_id: None,
            location: None,
            created_at: None,
            ..i
        };
        assert_eq!(instance_from_pb(instance_to_pb(&bare)), bare);
        let s = InstanceSpec {
            name: "grs-7".into(),
            pool: "linux".into(),
            job_id: 7,
            labels: vec!["self-hosted".into()],
            bootstrap: Bootstrap::GuestAgent {
                path: "/run/jit".into(),
                content: SecretString::from("secret".to_owned()),
                command: vec!["run.sh".into()],
            },
        };
        let back = spec_from_pb(spec_to_pb(&s));
        assert_eq!(
            (back.name, back.pool, back.job_id),
            ("grs-7".into(), "linux".into(), 7)
        );
        match back.bootstrap {
            Bootstrap::GuestAgent {
                path,
                content,
                command,
            } => {
                assert_eq!(path, "/run/jit");
                assert_eq!(content.expose_secret(), "secret");
                assert_eq!(command, vec!["run.sh".to_owned()]);
            }
            other => panic!("{other:?}"),
        }
    }
}
