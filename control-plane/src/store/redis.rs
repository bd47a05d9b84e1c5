//! [`Store`] on Redis: production state shared by every control-plane replica.
//!
//! # Keys (all under the configured prefix `P`, default `grs`)
//! | key | type | holds |
//! |---|---|---|
//! | `P:delivery:<delivery id>` | string, TTL | de-duplication of webhook deliveries |
//! | `P:job:<job id>` | hash | a [`Job`]; expires `job_retention` after it ends |
//! | `P:jobs`, `P:pool:<pool>:jobs` | sorted set | job ids by recording time (listing) |
//! | `P:instance:<name>` | hash | an [`InstanceRecord`]; expires after deletion |
//! | `P:instances` | set | instance names (listing) |
//! | `P:pool:<pool>:live` | set | live instance names: the pool's capacity in use |
//! | `P:pool:<pool>:settings` | hash | operator overrides (`paused`, `min_idle`, `max_instances`) |
//! | `P:queue:provision:<pool>` | stream, group `dispatchers` | jobs waiting for an instance |
//! | `P:queue:teardown` | stream, group `teardown` | instances to destroy |
//! | `P:events` | stream, capped | transitions, for `WatchEvents` |
//! | `P:bootstrap:<sha256 of token>` | string, TTL | the instance a bootstrap token is bound to |
//! | `P:lease:<name>` | string, TTL | a lease's holder (leader election) |
//!
//! # Atomicity
//! Every change touching more than one key is a Lua script, so a crash of a
//! control plane never leaves half a transition, and two replicas never both
//! take the last capacity slot. The scripts name keys they derive from the
//! prefix rather than receiving them all in `KEYS`: fine for a standalone or
//! Sentinel-managed Redis, not for Redis Cluster.
//!
//! # Durability
//! Redis must persist (AOF; `appendfsync everysec` loses at most a second of
//! writes on a power cut, `always` none): an accepted job lives only here.
//!
//! # Connections
//! One multiplexed connection (auto-reconnecting) carries every
//! non-blocking command. Blocking reads (`XREADGROUP BLOCK`, `XREAD BLOCK`)
//! would stall it, so they use connections of their own, pooled.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Script, Value};
use tokio::sync::OnceCell;

use super::{
    BeginProvision, Delivery, PoolLimits, Queue, QueueDepth, QueueItem, Store, StoreError,
    StoreResult, SubmitResult,
};
use crate::model::{
    Event, InstanceRecord, InstanceState, Job, JobEvent, JobState, Millis, PoolOverrides,
    REASON_COMPLETED_UNSEEN, SubmitOutcome, apply_event, unrouted_reason,
};

/// Tunables of the Redis store.
#[derive(Debug, Clone)]
pub struct RedisStoreOptions {
    /// Key prefix (no trailing `:`).
    pub prefix: String,
    /// How long a delivery id is remembered (GitHub redelivers up to 3 days).
    pub dedup_ttl: Duration,
    /// How long an ended job's record is kept.
    pub job_retention: Duration,
    /// Approximate cap of the events stream.
    pub events_max: u64,
    /// Timeout of each command (not of blocking reads).
    pub response_timeout: Duration,
}

impl Default for RedisStoreOptions {
    fn default() -> Self {
        Self {
            prefix: "grs".into(),
            dedup_ttl: Duration::from_secs(4 * 24 * 3600),
            job_retention: Duration::from_secs(7 * 24 * 3600),
            events_max: 10_000,
            response_timeout: Duration::from_secs(5),
        }
    }
}

/// The consumer group of provision queues.
const PROVISION_GROUP: &str = "dispatchers";
/// The consumer group of the teardown queue.
const TEARDOWN_GROUP: &str = "teardown";

/// Redis-backed [`Store`].
pub struct RedisStore {
    client: Client,
    opts: RedisStoreOptions,
    /// Connected on first use, so the control plane starts (and reports
    /// NOT_SERVING) while Redis is down.
    conn: OnceCell<ConnectionManager>,
    /// Connections for blocking reads.
    blocking: Mutex<Vec<MultiplexedConnection>>,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's connection info may hold a password: not printed.
        f.debug_struct("RedisStore")
            .field("prefix", &self.opts.prefix)
            .finish_non_exhaustive()
    }
}

/// Script arguments as strings (how Redis receives them anyway).
macro_rules! now_args {
    ($($a:expr),* $(,)?) => { [$($a.to_string()),*] };
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://[:password@]host:port[/db]`,
    /// `rediss://` for TLS). Checks the URL only; connects on first use.
    pub fn new(url: &str, opts: RedisStoreOptions) -> Result<Self, String> {
        let client = Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
        Ok(Self {
            client,
            opts,
            conn: OnceCell::new(),
            blocking: Mutex::new(Vec::new()),
            scripts: Scripts::new(),
        })
    }

    /// The key prefix (another replica's store on the same prefix shares
    /// everything with this one).
    pub fn prefix(&self) -> &str {
        &self.opts.prefix
    }

    async fn conn(&self) -> StoreResult<ConnectionManager> {
        self.conn
            .get_or_try_init(|| async {
                let cfg = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(self.opts.response_timeout))
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                self.client.get_connection_manager_with_config(cfg).await
            })
            .await
            .cloned()
            .map_err(unavailable)
    }

    async fn blocking_conn(&self, block: Duration) -> StoreResult<MultiplexedConnection> {
        let pooled = self.blocking.lock().unwrap().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)));
                self.client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map_err(unavailable)?
            }
        };
        conn.set_response_timeout(block + self.opts.response_timeout);
        Ok(conn)
    }

    fn give_back(&self, conn: MultiplexedConnection) {
        let mut pool = self.blocking.lock().unwrap();
        if pool.len() < 64 {
            pool.push(conn);
        }
    }

    /// A hash's fields (empty when the key does not exist).
    async fn hgetall(&self, key: &str) -> StoreResult<HashMap<String, String>> {
        let mut conn = self.conn().await?;
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.opts.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    fn queue_key(&self, q: &Queue) -> (String, &'static str) {
        match q {
            Queue::Provision(pool) => (self.key(&["queue", "provision", pool]), PROVISION_GROUP),
            Queue::Teardown => (self.key(&["queue", "teardown"]), TEARDOWN_GROUP),
        }
    }

    /// Runs a script with the common arguments (prefix, now, events cap,
    /// retention) followed by `args`.
    async fn run(&self, script: &Script, now: Millis, args: &[String]) -> StoreResult<Value> {
        let mut conn = self.conn().await?;
        let mut inv = script.prepare_invoke();
        inv.arg(&self.opts.prefix)
            .arg(now)
            .arg(self.opts.events_max)
            .arg(self.opts.job_retention.as_secs());
        for a in args {
            inv.arg(a);
        }
        inv.invoke_async(&mut conn).await.map_err(unavailable)
    }

    /// One event's `{outcome, job hash, torn-down instance}` from the submit
    /// script.
    fn submit_result(
        &self,
        reply: Value,
        ev: &JobEvent,
        routed_pool: Option<&str>,
        now: Millis,
    ) -> StoreResult<SubmitResult> {
        let mut it = items(reply).into_iter();
        let outcome = match it.next().as_ref().and_then(as_string).as_deref() {
            Some("created") => None,
            Some("accepted") => Some(SubmitOutcome::Accepted),
            Some("duplicate_delivery") => Some(SubmitOutcome::DuplicateDelivery),
            Some("stale") => Some(SubmitOutcome::Stale),
            other => {
                return Err(corrupt(
                    "submit script",
                    format!("unexpected outcome {other:?}"),
                ));
            }
        };
        let hash = it.next().unwrap_or(Value::Nil);
        let teardown = it
            .next()
            .as_ref()
            .and_then(as_string)
            .filter(|s| !s.is_empty());
        let Some(outcome) = outcome else {
            // The script wrote exactly what the shared rules derive for a
            // new record; derive it here rather than read it back.
            return Ok(SubmitResult {
                outcome: SubmitOutcome::Accepted,
                job: Some(apply_event(None, ev, routed_pool, now).job),
                teardown,
            });
        };
        let key = self.key(&["job", &ev.job_id.to_string()]);
        Ok(SubmitResult {
            outcome,
            job: job_from_hash(&hash_of(&hash), &key)?,
            teardown,
        })
    }

    /// Deletes every key under this store's prefix (tests and benchmarks
    /// clean up after themselves with it; never used by the control plane).
    pub async fn flush_prefix(&self) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let pattern = format!("{}:*", self.opts.prefix);
        let keys: Vec<String> = {
            let mut iter: redis::AsyncIter<String> = redis::cmd("SCAN")
                .cursor_arg(0)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .clone()
                .iter_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let mut keys = Vec::new();
            while let Some(k) = iter.next_item().await {
                keys.push(k.map_err(unavailable)?);
            }
            keys
        };
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn ensure_group(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        key: &str,
        group: &str,
    ) -> StoreResult<()> {
        // From id 0: entries added before the group existed are work too.
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    fn parse_deliveries(&self, q: &Queue, entries: &[Value]) -> Vec<Delivery> {
        entries
            .iter()
            .filter_map(|e| {
                let Value::Array(parts) = e else { return None };
                let id = as_string(parts.first()?)?;
                let fields = match parts.get(1)? {
                    Value::Array(f) => f,
                    _ => return None,
                };
                let map = pairs(fields);
                let item = match q {
                    Queue::Provision(_) => QueueItem::Provision {
                        job_id: map.get("job_id")?.parse().ok()?,
                    },
                    Queue::Teardown => QueueItem::Teardown {
                        instance: map.get("instance")?.clone(),
                    },
                };
                Some(Delivery { id, item })
            })
            .collect()
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

/// The entries of the first stream in an `XREAD`/`XREADGROUP` reply:
/// `[[key, [[id, [f, v, ...]], ...]]]` (RESP2) or a map (RESP3).
fn first_stream_entries(reply: Value) -> Vec<Value> {
    match reply {
        Value::Array(streams) => streams
            .into_iter()
            .next()
            .map(|s| items(s).into_iter().nth(1).map(items).unwrap_or_default()),
        Value::Map(m) => m.into_iter().next().map(|(_, e)| items(e)),
        _ => None,
    }
    .unwrap_or_default()
}

fn pairs(fields: &[Value]) -> HashMap<String, String> {
    fields
        .chunks(2)
        .filter_map(|c| Some((as_string(c.first()?)?, as_string(c.get(1)?)?)))
        .collect()
}

fn hash_of(v: &Value) -> HashMap<String, String> {
    match v {
        Value::Array(a) => pairs(a),
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((as_string(k)?, as_string(v)?)))
            .collect(),
        _ => HashMap::new(),
    }
}

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        Value::Nil => Vec::new(),
        other => vec![other],
    }
}

fn corrupt(key: &str, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        message: message.into(),
    }
}

fn num<T: std::str::FromStr + Default>(
    h: &HashMap<String, String>,
    field: &str,
    key: &str,
) -> StoreResult<T> {
    match h.get(field) {
        None => Ok(T::default()),
        Some(s) if s.is_empty() => Ok(T::default()),
        Some(s) => s
            .parse()
            .map_err(|_| corrupt(key, format!("field {field} is {s:?}, not a number"))),
    }
}

fn text(h: &HashMap<String, String>, field: &str) -> String {
    h.get(field).cloned().unwrap_or_default()
}

fn job_from_hash(h: &HashMap<String, String>, key: &str) -> StoreResult<Option<Job>> {
    let Some(state) = h.get("state") else {
        return Ok(None);
    };
    let state = JobState::parse(state)
        .ok_or_else(|| corrupt(key, format!("unknown job state {state:?}")))?;
    let labels: Vec<String> = match h.get("labels") {
        Some(l) if !l.is_empty() => {
            serde_json::from_str(l).map_err(|e| corrupt(key, format!("labels: {e}")))?
        }
        _ => Vec::new(),
    };
    Ok(Some(Job {
        job_id: num(h, "job_id", key)?,
        run_id: num(h, "run_id", key)?,
        run_attempt: num(h, "run_attempt", key)?,
        repository: text(h, "repository"),
        organization: text(h, "organization"),
        installation_id: num(h, "installation_id", key)?,
        labels,
        state,
        pool: text(h, "pool"),
        instance_name: text(h, "instance_name"),
        runner_name: text(h, "runner_name"),
        runner_id: num(h, "runner_id", key)?,
        conclusion: text(h, "conclusion"),
        reason: text(h, "reason"),
        attempts: num(h, "attempts", key)?,
        job_name: text(h, "job_name"),
        workflow_name: text(h, "workflow_name"),
        recorded_at: num(h, "recorded_at", key)?,
        updated_at: num(h, "updated_at", key)?,
    }))
}

fn instance_from_hash(
    h: &HashMap<String, String>,
    key: &str,
) -> StoreResult<Option<InstanceRecord>> {
    let Some(state) = h.get("state") else {
        return Ok(None);
    };
    let state = InstanceState::parse(state)
        .ok_or_else(|| corrupt(key, format!("unknown instance state {state:?}")))?;
    Ok(Some(InstanceRecord {
        name: text(h, "name"),
        pool: text(h, "pool"),
        job_id: num(h, "job_id", key)?,
        assigned_job_id: num(h, "assigned_job_id", key)?,
        state,
        provider_id: text(h, "provider_id"),
        location: text(h, "location"),
        reason: text(h, "reason"),
        created_at: num(h, "created_at", key)?,
        updated_at: num(h, "updated_at", key)?,
    }))
}

fn event_from_fields(f: &HashMap<String, String>) -> Option<Event> {
    let at = f.get("at")?.parse().ok()?;
    let pool = f.get("pool").cloned().unwrap_or_default();
    let reason = f.get("reason").cloned().unwrap_or_default();
    match f.get("kind")?.as_str() {
        "job" => Some(Event::Job {
            at,
            job_id: f.get("id")?.parse().ok()?,
            pool,
            from: f.get("from").and_then(|s| JobState::parse(s)),
            to: JobState::parse(f.get("to")?)?,
            reason,
        }),
        "instance" => Some(Event::Instance {
            at,
            name: f.get("id")?.clone(),
            pool,
            from: f.get("from").and_then(|s| InstanceState::parse(s)),
            to: InstanceState::parse(f.get("to")?)?,
            reason,
        }),
        _ => None,
    }
}

/// Lua shared by every script. ARGV[1..4]: prefix, now (ms), events cap, job
/// retention (s); script arguments start at ARGV[5].
const LUA_PRELUDE: &str = r#"
local P, NOW, EVMAX, RETAIN = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local function k(...) return P .. ':' .. table.concat({...}, ':') end
local function emit(kind, id, pool, from, to, reason)
  redis.call('XADD', k('events'), 'MAXLEN', '~', EVMAX, '*',
    'kind', kind, 'at', NOW, 'id', id, 'pool', pool or '', 'from', from or '', 'to', to, 'reason', reason or '')
end
local function set_job(jk, id, to, reason)
  local from = redis.call('HGET', jk, 'state')
  local pool = redis.call('HGET', jk, 'pool')
  redis.call('HSET', jk, 'state', to, 'updated_at', NOW)
  if reason ~= nil and reason ~= '' then redis.call('HSET', jk, 'reason', reason) end
  if to == 'completed' or to == 'failed' or to == 'unrouted' then redis.call('EXPIRE', jk, RETAIN) end
  emit('job', id, pool, from, to, reason)
end
local function set_inst(ik, name, to, reason)
  local from = redis.call('HGET', ik, 'state')
  local pool = redis.call('HGET', ik, 'pool')
  redis.call('HSET', ik, 'state', to, 'updated_at', NOW)
  if reason ~= nil and reason ~= '' then redis.call('HSET', ik, 'reason', reason) end
  emit('instance', name, pool, from, to, reason)
end
local function revoke_bootstrap(ik)
  local h = redis.call('HGET', ik, 'bootstrap')
  if h and h ~= '' then
    redis.call('DEL', k('bootstrap', h))
    redis.call('HSET', ik, 'bootstrap', '')
  end
end
-- Queues an instance for teardown: 1 queued, 0 already on its way out, -1 unknown.
local function teardown(name, reason)
  local ik = k('instance', name)
  local st = redis.call('HGET', ik, 'state')
  if not st then return -1 end
  if st == 'pending_delete' or st == 'deleting' or st == 'deleted' then return 0 end
  set_inst(ik, name, 'pending_delete', reason)
  redis.call('XADD', k('queue', 'teardown'), '*', 'instance', name)
  return 1
end
local function is_created(st) return st == 'running' or st == 'stopped' or st == 'error' end
"#;

/// `submit_events`: a batch of events, applied in order. ARGV[5..7]: dedup
/// ttl (s), completed-unseen reason, number of events; then
/// [`SUBMIT_ARGS_PER_EVENT`] arguments per event: delivery id, action, job
/// id, routed pool ('' = none), runner name, runner id, conclusion, run id,
/// run attempt, repository, organization, installation id, labels (JSON),
/// job name, workflow name, unrouted reason. Returns one
/// `{outcome, job hash (empty when created), torn-down instance}` per event.
const LUA_SUBMIT: &str = r#"
local TTL, COMPLETED_UNSEEN = ARGV[5], ARGV[6]
local function submit(a)
  local delivery, action, id, routed = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local runner, runner_id, conclusion = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local jk = k('job', id)
  if not redis.call('SET', k('delivery', delivery), NOW, 'NX', 'EX', TTL) then
    return {'duplicate_delivery', redis.call('HGETALL', jk), ''}
  end
  local st = redis.call('HGET', jk, 'state')
  local enqueue = false
  local function with_runner()
    if runner ~= '' then redis.call('HSET', jk, 'runner_name', runner) end
    if runner_id ~= '0' then redis.call('HSET', jk, 'runner_id', runner_id) end
  end
  local created = false
  local qpool = routed
  if not st then
    -- A new record: every field is known from the event, so it is written in
    -- one HSET and not read back (the caller derives it the same way).
    created = true
    local state
    if action == 'queued' then state = (routed ~= '') and 'queued' or 'unrouted'
    elseif action == 'waiting' then state = (routed ~= '') and 'waiting' or 'unrouted'
    elseif action == 'in_progress' then state = 'in_progress'
    else state = 'completed' end
    local reason = (routed == '') and ARGV[a + 15] or ''
    local concl = ''
    if action == 'completed' then reason = COMPLETED_UNSEEN; concl = conclusion end
    redis.call('HSET', jk, 'job_id', id, 'run_id', ARGV[a + 7], 'run_attempt', ARGV[a + 8], 'repository', ARGV[a + 9],
      'organization', ARGV[a + 10], 'installation_id', ARGV[a + 11], 'labels', ARGV[a + 12], 'state', state, 'pool', routed,
      'instance_name', '', 'runner_name', runner, 'runner_id', runner_id, 'conclusion', concl, 'reason', reason,
      'attempts', '0', 'job_name', ARGV[a + 13], 'workflow_name', ARGV[a + 14], 'recorded_at', NOW, 'updated_at', NOW)
    redis.call('ZADD', k('jobs'), NOW, id)
    if routed ~= '' then redis.call('ZADD', k('pool', routed, 'jobs'), NOW, id) end
    if state == 'completed' or state == 'unrouted' then redis.call('EXPIRE', jk, RETAIN) end
    emit('job', id, routed, '', state, reason)
    enqueue = (state == 'queued')
  elseif action == 'queued' and st == 'waiting' then
    qpool = redis.call('HGET', jk, 'pool')
    if qpool == '' then set_job(jk, id, 'unrouted', '') else set_job(jk, id, 'queued', ''); enqueue = true end
  elseif action == 'in_progress' and st ~= 'completed' and st ~= 'failed' and st ~= 'in_progress' then
    with_runner()
    set_job(jk, id, 'in_progress', '')
  elseif action == 'completed' and st ~= 'completed' then
    with_runner()
    redis.call('HSET', jk, 'conclusion', conclusion)
    if redis.call('HGET', jk, 'instance_name') == '' and redis.call('HGET', jk, 'reason') == '' then
      redis.call('HSET', jk, 'reason', 'completed while ' .. st .. '; no instance made')
    end
    set_job(jk, id, 'completed', '')
  else
    return {'stale', redis.call('HGETALL', jk), ''}
  end
  if enqueue then
    redis.call('XADD', k('queue', 'provision', qpool), '*', 'job_id', id)
  end
  local torn = ''
  if action == 'in_progress' and runner ~= '' then
    local ik = k('instance', runner)
    if redis.call('EXISTS', ik) == 1 then
      redis.call('HSET', ik, 'assigned_job_id', id, 'updated_at', NOW)
      revoke_bootstrap(ik)
    end
  elseif action == 'completed' then
    local target = nil
    if runner ~= '' then
      target = runner
    else
      local own = redis.call('HGET', jk, 'instance_name')
      if own and own ~= '' and redis.call('HGET', k('instance', own), 'assigned_job_id') == '0' then target = own end
    end
    if target and is_created(redis.call('HGET', k('instance', target), 'state')) then
      if teardown(target, 'job ' .. id .. ' completed') == 1 then torn = target end
    end
  end
  if created then return {'created', {}, torn} end
  return {'accepted', redis.call('HGETALL', jk), torn}
end
local out = {}
for i = 0, tonumber(ARGV[7]) - 1 do out[i + 1] = submit(8 + i * 16) end
return out
"#;

/// Arguments of one event in [`LUA_SUBMIT`].
const SUBMIT_ARGS_PER_EVENT: usize = 16;

/// `begin_provision`. ARGV[5..]: job id, instance name, configured max,
/// configured paused (0/1).
const LUA_BEGIN_PROVISION: &str = r#"
local id, name, cfg_max, cfg_paused = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local jk, ik = k('job', id), k('instance', name)
local st = redis.call('HGET', jk, 'state')
if not st then return {'skip', 'job ' .. id .. ' is not recorded'} end
local ist = redis.call('HGET', ik, 'state')
if ist then
  if ist ~= 'pending_create' and ist ~= 'creating' then return {'skip', 'instance ' .. name .. ' is ' .. ist} end
  if st == 'completed' or st == 'failed' then
    local r = 'job ' .. id .. ' is ' .. st
    teardown(name, r)
    return {'skip', r}
  end
  local a = redis.call('HINCRBY', jk, 'attempts', 1)
  return {'proceed', redis.call('HGETALL', ik), a}
end
local own = redis.call('HGET', jk, 'instance_name') or ''
if not (st == 'queued' or st == 'provisioning' or (st == 'in_progress' and own == '')) then
  return {'skip', 'job ' .. id .. ' is ' .. st}
end
local pool = redis.call('HGET', jk, 'pool')
local sk = k('pool', pool, 'settings')
local paused = redis.call('HGET', sk, 'paused') or cfg_paused
if paused == '1' then return {'paused'} end
local max = tonumber(redis.call('HGET', sk, 'max_instances') or cfg_max)
local lk = k('pool', pool, 'live')
if redis.call('SCARD', lk) >= max then return {'no_capacity'} end
redis.call('SADD', lk, name)
redis.call('SADD', k('instances'), name)
redis.call('HSET', ik, 'name', name, 'pool', pool, 'job_id', id, 'assigned_job_id', '0', 'state', 'pending_create',
  'provider_id', '', 'location', '', 'reason', '', 'bootstrap', '', 'created_at', NOW, 'updated_at', NOW)
emit('instance', name, pool, '', 'pending_create', '')
local a = redis.call('HINCRBY', jk, 'attempts', 1)
redis.call('HSET', jk, 'instance_name', name)
if st == 'queued' then set_job(jk, id, 'provisioning', '') end
return {'proceed', redis.call('HGETALL', ik), a}
"#;

/// `mark_creating`. ARGV[5]: instance name.
const LUA_MARK_CREATING: &str = r#"
local ik = k('instance', ARGV[5])
if redis.call('HGET', ik, 'state') == 'pending_create' then set_inst(ik, ARGV[5], 'creating', '') end
return 0
"#;

/// `finish_provision`. ARGV[5..]: job id, name, provider id, location.
/// Returns 1 when the instance was queued for teardown at once.
const LUA_FINISH_PROVISION: &str = r#"
local id, name = ARGV[5], ARGV[6]
local jk, ik = k('job', id), k('instance', name)
local ist = redis.call('HGET', ik, 'state')
if ist ~= 'pending_create' and ist ~= 'creating' then return 0 end
redis.call('HSET', ik, 'provider_id', ARGV[7], 'location', ARGV[8])
set_inst(ik, name, 'running', '')
local st = redis.call('HGET', jk, 'state')
if st == 'provisioning' then
  set_job(jk, id, 'provisioned', '')
elseif st == 'completed' and redis.call('HGET', ik, 'assigned_job_id') == '0' then
  if teardown(name, 'job ' .. id .. ' completed while its instance was created') == 1 then return 1 end
end
return 0
"#;

/// `fail_provision`. ARGV[5..]: job id, name, reason.
const LUA_FAIL_PROVISION: &str = r#"
local id, name, reason = ARGV[5], ARGV[6], ARGV[7]
local jk = k('job', id)
local st = redis.call('HGET', jk, 'state')
if st and st ~= 'completed' and st ~= 'failed' then set_job(jk, id, 'failed', reason) end
teardown(name, reason)
return 0
"#;

/// `enqueue_teardown`. ARGV[5..]: name, reason.
const LUA_ENQUEUE_TEARDOWN: &str = r#"
return teardown(ARGV[5], ARGV[6])
"#;

/// `begin_teardown`. ARGV[5]: name. Returns the instance hash or {}.
const LUA_BEGIN_TEARDOWN: &str = r#"
local name = ARGV[5]
local ik = k('instance', name)
local st = redis.call('HGET', ik, 'state')
if not st or st == 'deleted' then return {} end
if st ~= 'deleting' then set_inst(ik, name, 'deleting', '') end
return redis.call('HGETALL', ik)
"#;

/// `finish_teardown`. ARGV[5..]: name, reason, retention (s).
const LUA_FINISH_TEARDOWN: &str = r#"
local name, reason, keep = ARGV[5], ARGV[6], ARGV[7]
local ik = k('instance', name)
local st = redis.call('HGET', ik, 'state')
if not st or st == 'deleted' then return 0 end
set_inst(ik, name, 'deleted', reason)
redis.call('SREM', k('pool', redis.call('HGET', ik, 'pool'), 'live'), name)
revoke_bootstrap(ik)
redis.call('EXPIRE', ik, keep)
return 1
"#;

/// `acquire_lease`. KEYS[1]: the lease; ARGV: holder, ttl (ms). Free (absent:
/// never taken, released, or expired by Redis itself) → taken; ours →
/// extended; someone else's → 0.
const LUA_ACQUIRE_LEASE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// `release_lease`. KEYS[1]: the lease; ARGV[1]: holder. Deletes it only if
/// `holder` holds it.
const LUA_RELEASE_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// `note_instance_error`. ARGV[5..]: name, reason.
const LUA_NOTE_ERROR: &str = r#"
local ik = k('instance', ARGV[5])
if redis.call('EXISTS', ik) == 1 then redis.call('HSET', ik, 'reason', ARGV[6], 'updated_at', NOW) end
return 0
"#;

/// `put_bootstrap_token`. ARGV[5..]: token hash, instance, ttl (s).
const LUA_PUT_BOOTSTRAP: &str = r#"
local h, name, ttl = ARGV[5], ARGV[6], ARGV[7]
local ik = k('instance', name)
revoke_bootstrap(ik)
redis.call('SET', k('bootstrap', h), name, 'EX', ttl)
redis.call('HSET', ik, 'bootstrap', h)
return 0
"#;

/// `revoke_bootstrap_token`. ARGV[5]: instance.
const LUA_REVOKE_BOOTSTRAP: &str = r#"
revoke_bootstrap(k('instance', ARGV[5]))
return 0
"#;

/// `update_pool_overrides`. ARGV[5..]: pool, then field/value pairs.
const LUA_UPDATE_POOL: &str = r#"
local sk = k('pool', ARGV[5], 'settings')
for i = 6, #ARGV, 2 do redis.call('HSET', sk, ARGV[i], ARGV[i + 1]) end
return redis.call('HGETALL', sk)
"#;

struct Scripts {
    submit: Script,
    begin_provision: Script,
    mark_creating: Script,
    finish_provision: Script,
    fail_provision: Script,
    enqueue_teardown: Script,
    begin_teardown: Script,
    finish_teardown: Script,
    note_error: Script,
    put_bootstrap: Script,
    revoke_bootstrap: Script,
    update_pool: Script,
    // Leases stand alone: they name their key in KEYS and need no prelude.
    acquire_lease: Script,
    release_lease: Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{LUA_PRELUDE}\n{body}"));
        Self {
            submit: s(LUA_SUBMIT),
            begin_provision: s(LUA_BEGIN_PROVISION),
            mark_creating: s(LUA_MARK_CREATING),
            finish_provision: s(LUA_FINISH_PROVISION),
            fail_provision: s(LUA_FAIL_PROVISION),
            enqueue_teardown: s(LUA_ENQUEUE_TEARDOWN),
            begin_teardown: s(LUA_BEGIN_TEARDOWN),
            finish_teardown: s(LUA_FINISH_TEARDOWN),
            note_error: s(LUA_NOTE_ERROR),
            put_bootstrap: s(LUA_PUT_BOOTSTRAP),
            revoke_bootstrap: s(LUA_REVOKE_BOOTSTRAP),
            update_pool: s(LUA_UPDATE_POOL),
            acquire_lease: Script::new(LUA_ACQUIRE_LEASE),
            release_lease: Script::new(LUA_RELEASE_LEASE),
        }
    }
}

fn overrides_from_hash(h: &HashMap<String, String>) -> PoolOverrides {
    PoolOverrides {
        paused: h.get("paused").map(|v| v == "1"),
        min_idle: h.get("min_idle").and_then(|v| v.parse().ok()),
        max_instances: h.get("max_instances").and_then(|v| v.parse().ok()),
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn submit_event(
        &self,
        ev: &JobEvent,
        routed_pool: Option<&str>,
        now: Millis,
    ) -> StoreResult<SubmitResult> {
        let mut r = self.submit_events(&[(ev, routed_pool)], now).await?;
        r.pop()
            .ok_or_else(|| corrupt("submit script", "no result for the event"))
    }

    async fn submit_events(
        &self,
        batch: &[(&JobEvent, Option<&str>)],
        now: Millis,
    ) -> StoreResult<Vec<SubmitResult>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = Vec::with_capacity(3 + batch.len() * SUBMIT_ARGS_PER_EVENT);
        args.extend(now_args!(
            self.opts.dedup_ttl.as_secs().max(1),
            REASON_COMPLETED_UNSEEN,
            batch.len(),
        ));
        for (ev, routed_pool) in batch {
            let labels = serde_json::to_string(&ev.labels).unwrap_or_else(|_| "[]".into());
            // Only an unrouted job records why.
            let unrouted = if routed_pool.is_none() {
                unrouted_reason(&ev.labels)
            } else {
                String::new()
            };
            args.extend(now_args!(
                ev.delivery_id,
                ev.action.as_str(),
                ev.job_id,
                routed_pool.unwrap_or(""),
                ev.runner_name,
                ev.runner_id,
                ev.conclusion,
                ev.run_id,
                ev.run_attempt,
                ev.repository,
                ev.organization,
                ev.installation_id,
                labels,
                ev.job_name,
                ev.workflow_name,
                unrouted,
            ));
        }
        let replies = items(self.run(&self.scripts.submit, now, &args).await?);
        if replies.len() != batch.len() {
            return Err(corrupt(
                "submit script",
                format!("{} results for {} events", replies.len(), batch.len()),
            ));
        }
        replies
            .into_iter()
            .zip(batch)
            .map(|(reply, (ev, routed_pool))| self.submit_result(reply, ev, *routed_pool, now))
            .collect()
    }

    async fn get_job(&self, job_id: u64) -> StoreResult<Option<Job>> {
        let key = self.key(&["job", &job_id.to_string()]);
        job_from_hash(&self.hgetall(&key).await?, &key)
    }

    async fn list_jobs(
        &self,
        pool: Option<&str>,
        state: Option<JobState>,
        cursor: u64,
        limit: usize,
    ) -> StoreResult<(Vec<Job>, Option<u64>)> {
        let index = match pool {
            Some(p) => self.key(&["pool", p, "jobs"]),
            None => self.key(&["jobs"]),
        };
        let mut conn = self.conn().await?;
        let mut page = Vec::new();
        let mut pos = cursor;
        const BATCH: u64 = 200;
        loop {
            let ids: Vec<String> = redis::cmd("ZREVRANGE")
                .arg(&index)
                .arg(pos)
                .arg(pos + BATCH - 1)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if ids.is_empty() {
                return Ok((page, None));
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGETALL").arg(self.key(&["job", id]));
            }
            let hashes: Vec<HashMap<String, String>> =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
            let mut expired = Vec::new();
            for (id, h) in ids.iter().zip(hashes) {
                pos += 1;
                let key = self.key(&["job", id]);
                match job_from_hash(&h, &key)? {
                    None => expired.push(id.clone()),
                    Some(j) if state.is_none_or(|s| j.state == s) => page.push(j),
                    Some(_) => {}
                }
                if page.len() >= limit {
                    break;
                }
            }
            if !expired.is_empty() {
                // Jobs past their retention: drop them from the index. The
                // cursor already counted them, so step back.
                let _: () = redis::cmd("ZREM")
                    .arg(&index)
                    .arg(&expired)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                pos -= expired.len() as u64;
            }
            if page.len() >= limit {
                let total: u64 = redis::cmd("ZCARD")
                    .arg(&index)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                return Ok((page, (pos < total).then_some(pos)));
            }
        }
    }

    async fn get_instance(&self, name: &str) -> StoreResult<Option<InstanceRecord>> {
        let key = self.key(&["instance", name]);
        instance_from_hash(&self.hgetall(&key).await?, &key)
    }

    async fn list_instances(
        &self,
        pool: Option<&str>,
        include_deleted: bool,
    ) -> StoreResult<Vec<InstanceRecord>> {
        let mut conn = self.conn().await?;
        let index = self.key(&["instances"]);
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&index)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if names.is_empty() {
            // Redis refuses an empty pipeline ("empty command").
            return Ok(Vec::new());
        }
        names.sort();
        let mut pipe = redis::pipe();
        for n in &names {
            pipe.cmd("HGETALL").arg(self.key(&["instance", n]));
        }
        let hashes: Vec<HashMap<String, String>> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (n, h) in names.iter().zip(hashes) {
            match instance_from_hash(&h, &self.key(&["instance", n]))? {
                None => gone.push(n.clone()),
                Some(i)
                    if pool.is_none_or(|p| i.pool == p)
                        && (include_deleted || i.state != InstanceState::Deleted) =>
                {
                    out.push(i)
                }
                Some(_) => {}
            }
        }
        if !gone.is_empty() {
            let _: () = redis::cmd("SREM")
                .arg(&index)
                .arg(&gone)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(out)
    }

    async fn begin_provision(
        &self,
        job_id: u64,
        name: &str,
        limits: &PoolLimits,
        now: Millis,
    ) -> StoreResult<BeginProvision> {
        let paused = if limits.paused { "1" } else { "0" };
        let r = self
            .run(
                &self.scripts.begin_provision,
                now,
                &now_args!(job_id, name, limits.max_instances, paused),
            )
            .await?;
        let mut it = items(r).into_iter();
        match it.next().as_ref().and_then(as_string).as_deref() {
            Some("proceed") => {
                let key = self.key(&["instance", name]);
                let instance =
                    instance_from_hash(&hash_of(&it.next().unwrap_or(Value::Nil)), &key)?
                        .ok_or_else(|| corrupt(&key, "begin_provision returned no instance"))?;
                let attempts = it
                    .next()
                    .as_ref()
                    .and_then(as_string)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1);
                Ok(BeginProvision::Proceed { instance, attempts })
            }
            Some("skip") => Ok(BeginProvision::Skip(
                it.next().as_ref().and_then(as_string).unwrap_or_default(),
            )),
            Some("paused") => Ok(BeginProvision::Paused),
            Some("no_capacity") => Ok(BeginProvision::NoCapacity),
            other => Err(corrupt(
                "begin_provision script",
                format!("unexpected answer {other:?}"),
            )),
        }
    }

    async fn mark_creating(&self, name: &str, now: Millis) -> StoreResult<()> {
        self.run(&self.scripts.mark_creating, now, &now_args!(name))
            .await
            .map(drop)
    }

    async fn finish_provision(
        &self,
        job_id: u64,
        name: &str,
        provider_id: &str,
        location: &str,
        now: Millis,
    ) -> StoreResult<bool> {
        let r = self
            .run(
                &self.scripts.finish_provision,
                now,
                &now_args!(job_id, name, provider_id, location),
            )
            .await?;
        Ok(matches!(r, Value::Int(1)))
    }

    async fn fail_provision(
        &self,
        job_id: u64,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<()> {
        self.run(
            &self.scripts.fail_provision,
            now,
            &now_args!(job_id, name, reason),
        )
        .await
        .map(drop)
    }

    async fn enqueue_teardown(
        &self,
        name: &str,
        reason: &str,
        now: Millis,
    ) -> StoreResult<Option<bool>> {
        let r = self
            .run(
                &self.scripts.enqueue_teardown,
                now,
                &now_args!(name, reason),
            )
            .await?;
        Ok(match r {
            Value::Int(1) => Some(true),
            Value::Int(0) => Some(false),
            _ => None,
        })
    }

    async fn begin_teardown(&self, name: &str, now: Millis) -> StoreResult<Option<InstanceRecord>> {
        let r = self
            .run(&self.scripts.begin_teardown, now, &now_args!(name))
            .await?;
        instance_from_hash(&hash_of(&r), &self.key(&["instance", name]))
    }

    async fn finish_teardown(
        &self,
        name: &str,
        reason: &str,
        retention: Duration,
        now: Millis,
    ) -> StoreResult<()> {
        self.run(
            &self.scripts.finish_teardown,
            now,
            &now_args!(name, reason, retention.as_secs().max(1)),
        )
        .await
        .map(drop)
    }

    async fn note_instance_error(&self, name: &str, reason: &str, now: Millis) -> StoreResult<()> {
        self.run(&self.scripts.note_error, now, &now_args!(name, reason))
            .await
            .map(drop)
    }

    async fn read(
        &self,
        queue: &Queue,
        consumer: &str,
        block: Duration,
    ) -> StoreResult<Option<Delivery>> {
        let (key, group) = self.queue_key(queue);
        let mut conn = self.blocking_conn(block).await?;
        let result = async {
            for _ in 0..2 {
                let r: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(group)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(block.as_millis().max(1) as u64)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(">")
                    .query_async(&mut conn)
                    .await;
                match r {
                    Ok(Value::Nil) => return Ok(None),
                    Ok(v) => {
                        let entries = first_stream_entries(v);
                        return Ok(self.parse_deliveries(queue, &entries).into_iter().next());
                    }
                    Err(e) if e.code() == Some("NOGROUP") => {
                        self.ensure_group(&mut conn, &key, group).await?
                    }
                    Err(e) => return Err(unavailable(e)),
                }
            }
            Ok(None)
        }
        .await;
        if result.is_ok() {
            self.give_back(conn);
        }
        result
    }

    async fn claim_stale(
        &self,
        queue: &Queue,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<Delivery>> {
        let (key, group) = self.queue_key(queue);
        let mut conn = self.conn().await?;
        let r: redis::RedisResult<Value> = redis::cmd("XAUTOCLAIM")
            .arg(&key)
            .arg(group)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await;
        let v = match r {
            Ok(v) => v,
            Err(e) if e.code() == Some("NOGROUP") => {
                self.ensure_group(&mut conn, &key, group).await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(unavailable(e)),
        };
        let mut parts = items(v).into_iter();
        let _next = parts.next();
        let entries = parts.next().map(items).unwrap_or_default();
        // Entries whose data is gone (deleted while pending) come back as
        // nil; the third element lists their ids: acknowledge them away.
        let deleted: Vec<String> = parts
            .next()
            .map(items)
            .unwrap_or_default()
            .iter()
            .filter_map(as_string)
            .collect();
        if !deleted.is_empty() {
            let _: () = redis::cmd("XACK")
                .arg(&key)
                .arg(group)
                .arg(&deleted)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(self.parse_deliveries(queue, &entries))
    }

    async fn touch(&self, queue: &Queue, consumer: &str, id: &str) -> StoreResult<()> {
        let (key, group) = self.queue_key(queue);
        let mut conn = self.conn().await?;
        let _: Value = redis::cmd("XCLAIM")
            .arg(&key)
            .arg(group)
            .arg(consumer)
            .arg(0)
            .arg(id)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn ack(&self, queue: &Queue, id: &str) -> StoreResult<()> {
        let (key, group) = self.queue_key(queue);
        let mut conn = self.conn().await?;
        // Acknowledge and delete in one transaction: the stream only ever
        // holds work not yet done, so it needs no other trimming.
        let _: () = redis::pipe()
            .atomic()
            .cmd("XACK")
            .arg(&key)
            .arg(group)
            .arg(id)
            .ignore()
            .cmd("XDEL")
            .arg(&key)
            .arg(id)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn queue_depth(&self, queue: &Queue) -> StoreResult<QueueDepth> {
        let (key, group) = self.queue_key(queue);
        let mut conn = self.conn().await?;
        let depth: u64 = redis::cmd("XLEN")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let pending: redis::RedisResult<Value> = redis::cmd("XPENDING")
            .arg(&key)
            .arg(group)
            .query_async(&mut conn)
            .await;
        let pending = match pending {
            Ok(v) => items(v)
                .first()
                .and_then(as_string)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            Err(e) if e.code() == Some("NOGROUP") => 0,
            Err(e) => return Err(unavailable(e)),
        };
        Ok(QueueDepth { depth, pending })
    }

    async fn pool_in_use(&self, pool: &str) -> StoreResult<u32> {
        let mut conn = self.conn().await?;
        redis::cmd("SCARD")
            .arg(self.key(&["pool", pool, "live"]))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn pool_overrides(&self, pool: &str) -> StoreResult<PoolOverrides> {
        let h = self.hgetall(&self.key(&["pool", pool, "settings"])).await?;
        Ok(overrides_from_hash(&h))
    }

    async fn update_pool_overrides(
        &self,
        pool: &str,
        update: &PoolOverrides,
    ) -> StoreResult<PoolOverrides> {
        let mut args: Vec<String> = vec![pool.to_owned()];
        if let Some(p) = update.paused {
            args.extend(["paused".into(), if p { "1" } else { "0" }.into()]);
        }
        if let Some(m) = update.min_idle {
            args.extend(["min_idle".into(), m.to_string()]);
        }
        if let Some(m) = update.max_instances {
            args.extend(["max_instances".into(), m.to_string()]);
        }
        let r = self
            .run(&self.scripts.update_pool, crate::model::now_ms(), &args)
            .await?;
        Ok(overrides_from_hash(&hash_of(&r)))
    }

    async fn put_bootstrap_token(
        &self,
        token_hash: &str,
        instance: &str,
        ttl: Duration,
    ) -> StoreResult<()> {
        self.run(
            &self.scripts.put_bootstrap,
            crate::model::now_ms(),
            &now_args!(token_hash, instance, ttl.as_secs().max(1)),
        )
        .await
        .map(drop)
    }

    async fn lookup_bootstrap_token(&self, token_hash: &str) -> StoreResult<Option<String>> {
        let mut conn = self.conn().await?;
        redis::cmd("GET")
            .arg(self.key(&["bootstrap", token_hash]))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn revoke_bootstrap_token(&self, instance: &str) -> StoreResult<()> {
        self.run(
            &self.scripts.revoke_bootstrap,
            crate::model::now_ms(),
            &now_args!(instance),
        )
        .await
        .map(drop)
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let taken: i64 = self
            .scripts
            .acquire_lease
            .key(self.key(&["lease", name]))
            .arg(holder)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(taken == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let released: i64 = self
            .scripts
            .release_lease
            .key(self.key(&["lease", name]))
            .arg(holder)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(released == 1)
    }

    async fn watch(
        &self,
        pool: Option<String>,
    ) -> StoreResult<BoxStream<'static, StoreResult<Event>>> {
        let key = self.key(&["events"]);
        let block = Duration::from_secs(5);
        let mut conn = self.blocking_conn(block).await?;
        // Start after the newest event now: a watcher sees what happens from
        // here on.
        let last: Value = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let start = items(last)
            .first()
            .and_then(|e| items(e.clone()).first().and_then(as_string))
            .unwrap_or_else(|| "0-0".into());
        let (tx, rx) = tokio::sync::mpsc::channel::<StoreResult<Event>>(256);
        tokio::spawn(async move {
            let mut last_id = start;
            loop {
                let r: redis::RedisResult<Value> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(100)
                    .arg("BLOCK")
                    .arg(block.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last_id)
                    .query_async(&mut conn)
                    .await;
                let v = match r {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(e))).await;
                        return;
                    }
                };
                let entries = first_stream_entries(v);
                for e in entries {
                    let parts = items(e);
                    let Some(id) = parts.first().and_then(as_string) else {
                        continue;
                    };
                    last_id = id;
                    let fields = parts.get(1).cloned().map(items).unwrap_or_default();
                    if let Some(ev) = event_from_fields(&pairs(&fields))
                        && pool.as_deref().is_none_or(|p| ev.pool() == p)
                        && tx.send(Ok(ev)).await.is_err()
                    {
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_hashes_with_bad_numbers_are_reported_as_corrupt_naming_the_key() {
        let mut h = HashMap::new();
        h.insert("state".to_owned(), "queued".to_owned());
        h.insert("job_id".to_owned(), "x".to_owned());
        let e = job_from_hash(&h, "grs:job:1").unwrap_err().to_string();
        assert!(e.contains("grs:job:1") && e.contains("job_id"), "{e}");
    }

    #[test]
    fn the_debug_form_hides_the_redis_url() {
        let s = RedisStore::new(
            "redis://:hunter2@127.0.0.1:6379",
            RedisStoreOptions::default(),
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn a_bad_redis_url_is_refused_with_the_reason() {
        let e = RedisStore::new("http://nope", RedisStoreOptions::default()).unwrap_err();
        assert!(e.contains("invalid Redis URL"), "{e}");
    }
}
