//! `grs-pve-sim`: the PVE simulator as a process, for the demo and manual
//! tries with curl or the `grs` CLI.
//!
//! ```text
//! grs-pve-sim --listen 127.0.0.1:8006 --tls --node pve1:64 --node pve2:64 --template pve1:9000
//! ```
//! Prints the URL, token and (with `--tls`) the certificate fingerprint,
//! then serves until SIGINT/SIGTERM.
//!
//! With `--control-listen ADDR` it also serves a plain-HTTP control API for
//! tests that run it as a separate process (the end-to-end harness in
//! `tests/`): `GET /vms` (every VM, read without going through the PVE
//! API, so injected faults do not hide them), `POST /vms` (a VM made
//! behind GRS's back: `{"node","vmid","name"}`), `POST /faults` (one
//! [`Fault`] as JSON) and `DELETE /faults`. Keep it on loopback: it
//! has no authentication.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use grs_provisioner_proxmox::sim::{PveSim, SimOptions, TaskDurations};

#[derive(Debug, Parser)]
#[command(about = "A Proxmox VE API simulator for GRS tests and demos")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8006")]
    listen: String,
    /// Serve HTTPS with a fresh self-signed certificate.
    #[arg(long)]
    tls: bool,
    /// Accepted API token id.
    #[arg(long, default_value = "root@pam!grs")]
    token_id: String,
    /// Accepted token secret.
    #[arg(long, env = "GRS_PROXMOX_TOKEN_SECRET", hide_env_values = true)]
    token_secret: String,
    /// A node, NAME:MEMORY_GIB (repeatable).
    #[arg(long = "node", default_value = "pve1:64")]
    nodes: Vec<String>,
    /// A template, `NODE:VMID[:NAME]` (repeatable).
    #[arg(long = "template", default_value = "pve1:9000")]
    templates: Vec<String>,
    /// Scale every task duration (1.0 = realistic defaults, 0.05 = fast).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// The part of a linked clone spent holding its storage's lock (clones
    /// in one lock domain serialize on it).
    #[arg(long, default_value_t = SimOptions::default().storage_lock_share)]
    storage_lock_share: f64,
    /// Also serve the control API (plain HTTP, no auth) on this address.
    #[arg(long)]
    control_listen: Option<String>,
}

fn scale(d: Duration, f: f64) -> Duration {
    d.mul_f64(f.max(0.0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let d = TaskDurations::default();
    let f = args.time_scale;
    let opts = SimOptions {
        tls: args.tls,
        token_id: args.token_id.clone(),
        token_secret: args.token_secret.clone(),
        durations: TaskDurations {
            linked_clone: scale(d.linked_clone, f),
            full_clone: scale(d.full_clone, f),
            start: scale(d.start, f),
            stop: scale(d.stop, f),
            destroy: scale(d.destroy, f),
            agent_ready: scale(d.agent_ready, f),
        },
        storage_lock_share: args.storage_lock_share,
        ..SimOptions::default()
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let sim = PveSim::start_on(listener, opts).await?;
    for n in &args.nodes {
        let (name, mem) = n.split_once(':').unwrap_or((n, "64"));
        sim.add_node(name, mem.parse().context("--node NAME:MEMORY_GIB")?);
    }
    sim.add_storage("ceph-rbd", true, "rbd");
    for t in &args.templates {
        let parts: Vec<&str> = t.split(':').collect();
        anyhow::ensure!(parts.len() >= 2, "--template NODE:VMID[:NAME]");
        let vmid = parts[1].parse().context("--template NODE:VMID[:NAME]")?;
        // On shared storage, so that clones may go to every node.
        sim.add_template_on(
            parts[0],
            vmid,
            parts.get(2).copied().unwrap_or("runner-template"),
            "ceph-rbd",
        );
    }
    println!("url: {}", sim.url());
    println!("token_id: {}", args.token_id);
    if let Some(fp) = sim.fingerprint() {
        println!("fingerprint: {fp}");
    }
    let sim = std::sync::Arc::new(sim);
    if let Some(addr) = &args.control_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--control-listen)"))?;
        println!("control: http://{}", listener.local_addr()?);
        tokio::spawn(control::serve(listener, sim.clone()));
    }
    // Lines above are read by whoever started us: make sure they are out.
    use std::io::Write;
    std::io::stdout().flush().ok();
    shutdown_signal().await;
    if let Ok(sim) = std::sync::Arc::try_unwrap(sim) {
        sim.shutdown().await;
    }
    Ok(())
}

/// The control API of `--control-listen`.
mod control {
    use std::sync::Arc;

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::get;
    use axum::{Json, Router};
    use grs_provisioner_proxmox::sim::{Fault, PveSim};
    use serde::Deserialize;
    use serde_json::{Value, json};

    #[derive(Debug, Deserialize)]
    struct NewVm {
        node: String,
        vmid: u32,
        name: String,
    }

    pub async fn serve(listener: tokio::net::TcpListener, sim: Arc<PveSim>) {
        let app = Router::new()
            .route("/vms", get(vms).post(add_vm))
            .route("/faults", axum::routing::post(inject).delete(clear))
            .route("/stats", get(stats))
            .with_state(sim);
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("grs-pve-sim: control API stopped: {e}");
        }
    }

    async fn vms(State(sim): State<Arc<PveSim>>) -> Json<Value> {
        Json(Value::Array(
            sim.vms()
                .into_iter()
                .map(|v| {
                    json!({
                        "vmid": v.vmid,
                        "node": v.node,
                        "name": v.name(),
                        "template": v.template,
                        "running": v.running,
                        "lock": v.lock,
                        "config": v.config,
                    })
                })
                .collect(),
        ))
    }

    async fn add_vm(State(sim): State<Arc<PveSim>>, Json(vm): Json<NewVm>) -> StatusCode {
        sim.add_vm(&vm.node, vm.vmid, &vm.name, false);
        StatusCode::CREATED
    }

    async fn inject(State(sim): State<Arc<PveSim>>, Json(f): Json<Fault>) -> StatusCode {
        sim.inject(f);
        StatusCode::NO_CONTENT
    }

    async fn clear(State(sim): State<Arc<PveSim>>) -> StatusCode {
        sim.clear_faults();
        StatusCode::NO_CONTENT
    }

    async fn stats(State(sim): State<Arc<PveSim>>) -> Json<Value> {
        Json(json!({
            "requests": sim.request_count(),
            "schema_violations": sim.schema_violations(),
            "peak_vms_per_node": sim.peak_vms_per_node(),
            "clone_tasks": sim.task_count("qmclone"),
        }))
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
