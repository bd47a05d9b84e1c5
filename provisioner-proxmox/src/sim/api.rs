//! The simulator's HTTP server: auth, schema check, injected HTTP faults,
//! PVE's error envelope, and the handlers that answer at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use super::PveVersion;
use super::faults::{take_drop, take_dropped_request, take_lost_answer};
use super::state::{Shared, SimNode, SimState, SimVm};
use super::tasks::{clone_vm, destroy_vm, start_vm, stop_vm, task_log, task_status};

pub(super) async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let app = app.clone();
                let shared = shared.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let app = app.clone();
                        let shared = shared.clone();
                        async move {
                            if take_drop(&shared) || take_dropped_request(&shared, req.uri().path()) {
                                // An error from the service makes hyper close
                                // the connection without an answer.
                                return Err(std::io::Error::other("fault: dropped connection"));
                            }
                            let path = req.uri().path().to_owned();
                            let resp = app.oneshot(req.map(Body::new)).await;
                            if take_lost_answer(&shared, &path) {
                                return Err(std::io::Error::other("fault: answer lost"));
                            }
                            match resp {
                                Ok(r) => Ok(r),
                                Err(e) => match e {},
                            }
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acc) => {
                            if let Ok(stream) = acc.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
            _ = stop.changed() => break,
        }
        // Reap finished connections.
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}

/// PVE's error answer: the status line carries the first line of the
/// message as reason phrase (pve-http-server `AnyEvent.pm`, `response()`;
/// every release), the body is `{"data":null}`, plus `"message":"...\n"` on
/// releases with libpve-http-server-perl >= 5.2 ([`PveVersion`]), plus
/// `errors` for parameter errors (`Formatter/Standard.pm`,
/// `prepare_response_data`).
pub(super) fn pve_error(v: PveVersion, status: u16, message: &str) -> Response {
    pve_error_with(v, status, message, None)
}

pub(super) fn pve_error_with(
    v: PveVersion,
    status: u16,
    message: &str,
    errors: Option<Value>,
) -> Response {
    let mut body = json!({"data": null});
    if v.message_in_body() {
        body["message"] = json!(format!("{message}\n"));
    }
    if let Some(e) = errors {
        body["errors"] = e;
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (code, axum::Json(body)).into_response();
    let first = message.lines().next().unwrap_or("").trim();
    if !first.is_empty()
        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(first.as_bytes().to_vec())
    {
        resp.extensions_mut().insert(reason);
    }
    resp
}

pub(super) fn ok(data: Value) -> Response {
    axum::Json(json!({ "data": data })).into_response()
}

/// An error raised by a handler: status and PVE message.
pub(super) struct Fail(pub(super) u16, pub(super) String);

impl Fail {
    pub(super) fn e500(m: impl Into<String>) -> Self {
        Self(500, m.into())
    }
}

pub(super) type HResult = Result<Value, Fail>;

pub(super) async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let path_full = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let ctype = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let v = sh.opts.version;
    let Some(path) = path_full.strip_prefix("/api2/json") else {
        return pve_error(
            v,
            501,
            &format!("Method '{method} {path_full}' not implemented"),
        );
    };
    let path = path.to_owned();
    let mut params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    if !body.is_empty() {
        if ctype.starts_with("application/json") {
            if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&body) {
                for (k, v) in m {
                    match v {
                        Value::Array(a) => params.extend(a.iter().map(|x| (k.clone(), plain(x)))),
                        other => params.push((k, plain(&other))),
                    }
                }
            }
        } else {
            params.extend(url::form_urlencoded::parse(&body).into_owned());
        }
    }

    // Auth first, as PVE.
    let user = match auth.strip_prefix("PVEAPIToken=") {
        Some(rest) => match rest.split_once('=') {
            Some((id, secret)) if id == sh.opts.token_id && secret == sh.opts.token_secret => {
                id.to_owned()
            }
            _ => {
                sh.state.lock().unwrap().requests += 1;
                tokio::time::sleep(sh.opts.auth_failure_delay).await;
                return pve_error(v, 401, "authentication failure");
            }
        },
        None => {
            sh.state.lock().unwrap().requests += 1;
            return pve_error(v, 401, "No ticket");
        }
    };

    let latency = sh.state.lock().unwrap().faults.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    // Outside the bundled schema extract: checks its parameters itself.
    if method == Method::GET && path == "/access/permissions" {
        sh.state.lock().unwrap().requests += 1;
        let mut p: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in params {
            p.entry(k).or_default().push(v);
        }
        return match super::access::permissions(&sh, &p, &user) {
            Ok(data) => ok(data),
            Err(Fail(status, m)) => pve_error(v, status, &m),
        };
    }
    let found = sh.schema.find(method.as_str(), &path);
    let template = found.as_ref().map(|(e, _)| e.path.clone());
    {
        let mut s = sh.state.lock().unwrap();
        s.requests += 1;
        *s.by_endpoint
            .entry(format!("{method} {}", template.as_deref().unwrap_or(&path)))
            .or_default() += 1;
        // Injected HTTP errors.
        let mut hit = None;
        for f in s.faults.http.iter_mut() {
            if f.4 > 0
                && path.contains(&f.0)
                && f.1
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method.as_str()))
            {
                f.4 -= 1;
                hit = Some((f.2, f.3.clone()));
                break;
            }
        }
        if let Some((status, message)) = hit {
            return pve_error(v, status, &message);
        }
    }
    if sh.opts.validate_requests
        && let Err(violation) = sh.schema.check(method.as_str(), &path, &params)
    {
        sh.state
            .lock()
            .unwrap()
            .violations
            .push(violation.to_string());
        if violation.unknown_endpoint {
            return pve_error(v, 501, &format!("Method '{method} {path}' not implemented"));
        }
        let errs: serde_json::Map<String, Value> = violation
            .errors
            .iter()
            .map(|(k, m)| (k.clone(), Value::String(format!("{m}\n"))))
            .collect();
        return pve_error_with(
            v,
            400,
            "Parameter verification failed.",
            Some(Value::Object(errs)),
        );
    }
    let (Some(template), Some((_, vars))) = (template, found) else {
        return pve_error(v, 501, &format!("Method '{method} {path}' not implemented"));
    };
    let mut p: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in vars.into_iter().chain(params) {
        p.entry(k).or_default().push(v);
    }
    let r = dispatch(&sh, &method, &template, &p, &user).await;
    match r {
        Ok(v) => ok(v),
        Err(Fail(status, m)) => pve_error(v, status, &m),
    }
}

pub(super) fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => (if *b { "1" } else { "0" }).to_owned(),
        other => other.to_string(),
    }
}

pub(super) fn one<'a>(p: &'a HashMap<String, Vec<String>>, k: &str) -> Option<&'a str> {
    p.get(k).and_then(|v| v.first()).map(String::as_str)
}

pub(super) fn flag(p: &HashMap<String, Vec<String>>, k: &str) -> Option<bool> {
    one(p, k).map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

pub(super) fn vmid_of(p: &HashMap<String, Vec<String>>) -> u32 {
    one(p, "vmid").and_then(|v| v.parse().ok()).unwrap_or(0)
}

pub(super) async fn dispatch(
    sh: &Arc<Shared>,
    method: &Method,
    template: &str,
    p: &HashMap<String, Vec<String>>,
    user: &str,
) -> HResult {
    let node = one(p, "node").unwrap_or("").to_owned();
    if !node.is_empty() {
        let s = sh.state.lock().unwrap();
        match s.nodes.get(&node) {
            None => {
                return Err(Fail::e500(format!(
                    "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
                )));
            }
            Some(n) if !n.online => return Err(Fail(595, "No route to host".into())),
            _ => {}
        }
    }
    match (method.as_str(), template) {
        ("GET", "/version") => Ok(sh.opts.version.version_json()),
        ("GET", "/nodes") => Ok(nodes_list(sh)),
        ("GET", "/cluster/resources") => Ok(resources(sh, one(p, "type"))),
        ("GET", "/cluster/nextid") => nextid(sh, p),
        ("GET", "/pools") => resource_pools(sh, one(p, "poolid")),
        ("GET", "/nodes/{node}/status") => node_status(sh, &node),
        ("GET", "/nodes/{node}/qemu") => Ok(qemu_list(sh, &node)),
        ("GET", "/nodes/{node}/qemu/{vmid}/config") => vm_config(sh, &node, vmid_of(p)),
        ("PUT", "/nodes/{node}/qemu/{vmid}/config")
        | ("POST", "/nodes/{node}/qemu/{vmid}/config") => set_config(sh, &node, vmid_of(p), p),
        ("GET", "/nodes/{node}/qemu/{vmid}/status/current") => {
            status_current(sh, &node, vmid_of(p))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/clone") => clone_vm(sh, &node, p, user),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/start") => start_vm(sh, &node, vmid_of(p), user),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/stop")
        | ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown") => {
            stop_vm(sh, &node, vmid_of(p), user)
        }
        ("DELETE", "/nodes/{node}/qemu/{vmid}") => destroy_vm(sh, &node, vmid_of(p), user, p),
        ("GET", "/nodes/{node}/tasks/{upid}/status") => {
            task_status(sh, &node, one(p, "upid").unwrap_or(""))
        }
        ("GET", "/nodes/{node}/tasks/{upid}/log") => task_log(sh, &node, p),
        ("POST", "/nodes/{node}/qemu/{vmid}/agent/ping")
        | ("POST", "/nodes/{node}/qemu/{vmid}/agent/file-write")
        | ("POST", "/nodes/{node}/qemu/{vmid}/agent/exec")
        | ("GET", "/nodes/{node}/qemu/{vmid}/agent/exec-status") => {
            agent(sh, &node, vmid_of(p), template, p)
        }
        _ => Err(Fail(
            501,
            format!("Method '{method} {template}' not implemented by the GRS PVE simulator"),
        )),
    }
}

pub(super) fn node_stats(s: &SimState, n: &SimNode) -> Value {
    let used: u64 = s
        .vms
        .values()
        .filter(|v| v.node == n.name && v.running)
        .map(SimVm::memory_bytes)
        .sum();
    if !n.online {
        return json!({"node": n.name, "id": format!("node/{}", n.name), "type": "node", "status": "offline"});
    }
    json!({
        "node": n.name, "id": format!("node/{}", n.name), "type": "node", "status": "online",
        "maxmem": n.maxmem, "mem": n.base_mem + used, "maxcpu": n.maxcpu, "cpu": 0.05, "level": "",
        "uptime": 3600,
    })
}

pub(super) fn nodes_list(sh: &Shared) -> Value {
    let s = sh.state.lock().unwrap();
    Value::Array(s.nodes.values().map(|n| node_stats(&s, n)).collect())
}

pub(super) fn vm_entry(s: &SimState, vm: &SimVm) -> Value {
    let online = s.nodes.get(&vm.node).is_some_and(|n| n.online);
    let mut e = json!({
        "id": format!("qemu/{}", vm.vmid), "type": "qemu", "vmid": vm.vmid, "node": vm.node,
        "name": vm.name(),
        "status": if !online { "unknown" } else if vm.running { "running" } else { "stopped" },
        "template": u8::from(vm.template), "maxmem": vm.memory_bytes(),
        "mem": if vm.running { vm.memory_bytes() / 2 } else { 0 }, "maxcpu": vm.cores(),
    });
    if let Some(t) = vm.config.get("tags") {
        e["tags"] = json!(t);
    }
    if let Some(l) = &vm.lock {
        e["lock"] = json!(l);
    }
    if let Some(pool) = vm.config.get("pool") {
        e["pool"] = json!(pool);
    }
    e
}

pub(super) fn resources(sh: &Shared, kind: Option<&str>) -> Value {
    let s = sh.state.lock().unwrap();
    let mut out = Vec::new();
    if kind.is_none_or(|k| k == "vm") {
        out.extend(s.vms.values().map(|vm| vm_entry(&s, vm)));
    }
    if kind.is_none_or(|k| k == "node") {
        out.extend(s.nodes.values().map(|n| node_stats(&s, n)));
    }
    // One entry per node and storage, `shared` since pve-manager 1ce3fa3b
    // (PVE/API2Tools.pm `extract_storage_stats`).
    if kind.is_none_or(|k| k == "storage") {
        for n in s.nodes.values() {
            for st in s.storages.values() {
                out.push(json!({
                    "id": format!("storage/{}/{}", n.name, st.id), "type": "storage",
                    "node": n.name, "storage": st.id, "shared": u8::from(st.shared),
                    "plugintype": st.plugintype, "content": "images,rootdir",
                    "status": if n.online && st.online { "available" } else { "unknown" },
                }));
            }
        }
    }
    Value::Array(out)
}

pub(super) fn qemu_list(sh: &Shared, node: &str) -> Value {
    let s = sh.state.lock().unwrap();
    Value::Array(
        s.vms
            .values()
            .filter(|v| v.node == node)
            .map(|vm| vm_entry(&s, vm))
            .collect(),
    )
}

pub(super) fn node_status(sh: &Shared, node: &str) -> HResult {
    let s = sh.state.lock().unwrap();
    let n = s
        .nodes
        .get(node)
        .ok_or_else(|| Fail::e500("no such node"))?;
    let st = node_stats(&s, n);
    Ok(json!({"memory": {"total": st["maxmem"], "used": st["mem"]}, "cpu": 0.05, "uptime": 3600}))
}

pub(super) fn resource_pools(sh: &Shared, poolid: Option<&str>) -> HResult {
    let s = sh.state.lock().unwrap();
    let entry = |id: &String| {
        let members: Vec<Value> = s
            .vms
            .values()
            .filter(|v| v.config.get("pool") == Some(id))
            .map(|v| json!({"id": format!("qemu/{}", v.vmid), "node": v.node, "type": "qemu", "vmid": v.vmid}))
            .collect();
        json!({"poolid": id, "members": members})
    };
    match poolid {
        Some(id) if !s.resource_pools.contains(id) => {
            Err(Fail::e500(format!("pool '{id}' does not exist")))
        }
        Some(id) => Ok(json!([entry(&id.to_owned())])),
        None => Ok(Value::Array(s.resource_pools.iter().map(entry).collect())),
    }
}

pub(super) fn nextid(sh: &Shared, p: &HashMap<String, Vec<String>>) -> HResult {
    let s = sh.state.lock().unwrap();
    if let Some(v) = one(p, "vmid") {
        let id: u32 = v.parse().unwrap_or(0);
        if s.vms.contains_key(&id) {
            return Err(Fail(400, format!("VM {id} already exists")));
        }
        return Ok(json!(id));
    }
    let mut id = 100;
    while s.vms.contains_key(&id) {
        id += 1;
    }
    // PVE answers a string here.
    Ok(json!(id.to_string()))
}

pub(super) fn missing(node: &str, vmid: u32) -> Fail {
    Fail::e500(format!(
        "Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"
    ))
}

pub(super) fn find<'a>(s: &'a mut SimState, node: &str, vmid: u32) -> Result<&'a mut SimVm, Fail> {
    match s.vms.get_mut(&vmid) {
        Some(vm) if vm.node == node => Ok(vm),
        _ => Err(missing(node, vmid)),
    }
}

pub(super) fn vm_config(sh: &Shared, node: &str, vmid: u32) -> HResult {
    let mut s = sh.state.lock().unwrap();
    let vm = find(&mut s, node, vmid)?;
    let mut m = serde_json::Map::new();
    for (k, v) in &vm.config {
        let val = match v.parse::<i64>() {
            Ok(n) if matches!(k.as_str(), "cores" | "template" | "sockets") => json!(n),
            _ => json!(v),
        };
        m.insert(k.clone(), val);
    }
    if let Some(l) = &vm.lock {
        m.insert("lock".into(), json!(l));
    }
    m.insert(
        "digest".into(),
        json!(format!(
            "{:040x}",
            vm.config.len() as u64 * 7919 + vmid as u64
        )),
    );
    Ok(Value::Object(m))
}

pub(super) fn locked(vm: &SimVm) -> Result<(), Fail> {
    match &vm.lock {
        Some(l) => Err(Fail::e500(format!("VM is locked ({l})"))),
        None => Ok(()),
    }
}

pub(super) fn set_config(
    sh: &Shared,
    node: &str,
    vmid: u32,
    p: &HashMap<String, Vec<String>>,
) -> HResult {
    let mut s = sh.state.lock().unwrap();
    let vm = find(&mut s, node, vmid)?;
    locked(vm)?;
    for (k, v) in p {
        if matches!(
            k.as_str(),
            "node" | "vmid" | "digest" | "delete" | "skiplock"
        ) {
            continue;
        }
        if let Some(v) = v.first() {
            vm.config.insert(k.clone(), v.clone());
        }
    }
    if let Some(d) = one(p, "delete") {
        for k in crate::client::split_tags(d) {
            vm.config.remove(k);
        }
    }
    Ok(Value::Null)
}

pub(super) fn status_current(sh: &Shared, node: &str, vmid: u32) -> HResult {
    let mut s = sh.state.lock().unwrap();
    let vm = find(&mut s, node, vmid)?;
    let st = if vm.running { "running" } else { "stopped" };
    let mut v = json!({"vmid": vmid, "name": vm.name(), "status": st, "qmpstatus": st,
        "maxmem": vm.memory_bytes(), "agent": u8::from(vm.agent_enabled())});
    if let Some(l) = &vm.lock {
        v["lock"] = json!(l);
    }
    Ok(v)
}

pub(super) fn agent(
    sh: &Shared,
    node: &str,
    vmid: u32,
    template: &str,
    p: &HashMap<String, Vec<String>>,
) -> HResult {
    let mut s = sh.state.lock().unwrap();
    let vm = find(&mut s, node, vmid)?;
    if !vm.running {
        return Err(Fail::e500(format!("VM {vmid} is not running")));
    }
    if !vm.agent_enabled() {
        return Err(Fail::e500("No QEMU guest agent configured"));
    }
    if vm.agent_ready_at.is_none_or(|t| Instant::now() < t) {
        return Err(Fail::e500("QEMU guest agent is not running"));
    }
    match template.rsplit('/').next().unwrap_or("") {
        "ping" => Ok(json!({"result": {}})),
        "file-write" => {
            let file = one(p, "file").unwrap_or("").to_owned();
            let content = one(p, "content").unwrap_or("").to_owned();
            vm.agent_files.push((file, content));
            Ok(Value::Null)
        }
        "exec" => {
            vm.agent_execs
                .push(p.get("command").cloned().unwrap_or_default());
            Ok(json!({"pid": 1000 + vm.agent_execs.len()}))
        }
        _ => Ok(json!({"exited": 0})),
    }
}
