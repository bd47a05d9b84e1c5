//! Prometheus metrics of the gateway, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a webhook delivery's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `X-GitHub-Event` (`workflow_job`, `ping`, `other`).
    pub event: &'static str,
    /// What the gateway answered: `accepted`, `duplicate`, `stale`, `ping`,
    /// `ignored`, `unauthorized`, `bad_request`, `unsupported_media_type`,
    /// `too_large`, `unavailable`, `error`.
    pub outcome: &'static str,
}

/// Labels of a control-plane error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// The RPC (`SubmitJobEvents`, `GetBootstrapDocument`).
    pub rpc: &'static str,
    /// The gRPC code (`Unavailable`, ...).
    pub code: String,
}

/// Labels of a cloud-init document request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BootstrapLabels {
    /// `meta-data`, `user-data`, ...
    pub document: &'static str,
    /// `served`, `not_found`, `unavailable`, `error`.
    pub outcome: &'static str,
}

/// Every metric the gateway keeps.
#[derive(Debug)]
pub struct Metrics {
    /// Deliveries by event and outcome.
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// Time from request to answer for `/webhook`.
    pub delivery_seconds: Histogram,
    /// Failed control-plane calls by RPC and code.
    pub control_plane_errors: Family<CodeLabels, Counter>,
    /// Cloud-init document requests.
    pub bootstrap: Family<BootstrapLabels, Counter>,
    /// Events per `SubmitJobEvents` call.
    pub submit_batch_size: Histogram,
    registry: Registry,
}

impl Metrics {
    /// Fresh metrics, registered.
    pub fn new() -> Self {
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        // 0.25 ms .. ~8 s: the gateway answers in milliseconds; GitHub gives
        // up at 10 s.
        let delivery_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.00025, 2.0, 16),
        );
        let control_plane_errors = Family::<CodeLabels, Counter>::default();
        let bootstrap = Family::<BootstrapLabels, Counter>::default();
        // 1 .. 256 (the most a call carries).
        let submit_batch_size = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 9),
        );
        let mut registry = Registry::with_prefix("grs_gateway");
        registry.register(
            "deliveries",
            "Webhook deliveries by event and outcome",
            deliveries.clone(),
        );
        registry.register(
            "delivery_duration_seconds",
            "Time to answer a webhook delivery",
            delivery_seconds.clone(),
        );
        registry.register(
            "control_plane_errors",
            "Failed control-plane calls by RPC and gRPC code",
            control_plane_errors.clone(),
        );
        registry.register(
            "bootstrap_requests",
            "Cloud-init document requests by document and outcome",
            bootstrap.clone(),
        );
        registry.register(
            "submit_batch_size",
            "Job events per SubmitJobEvents call to the control plane",
            submit_batch_size.clone(),
        );
        Self {
            deliveries,
            delivery_seconds,
            control_plane_errors,
            bootstrap,
            submit_batch_size,
            registry,
        }
    }

    /// Counts one failed control-plane call of `rpc`, labelled by its gRPC code.
    pub fn count_control_plane_error(&self, rpc: &'static str, status: &tonic::Status) {
        self.control_plane_errors
            .get_or_create(&CodeLabels {
                rpc,
                code: format!("{:?}", status.code()),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
