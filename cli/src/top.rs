//! `grs top`: a live view of pools, queues and instances.
//!
//! Expected flow: subscribe to `WatchEvents` first (so no transition
//! between the first snapshot and the stream is missed), take a snapshot
//! (`GetStats`, `ListPools`, `ListInstances`), draw; then redraw on every
//! event (at most every [`MIN_REDRAW`]) and every `--interval`.
//!
//! Modes:
//! - a terminal: the alternate screen in raw mode, redrawn in place; `q`,
//!   `Esc` or Ctrl-C end it, and so does SIGTERM/SIGINT (the `shutdown`
//!   future). The terminal is restored on every way out, errors and
//!   panics included (a guard's `Drop`).
//! - not a terminal (a pipe, a file, tests): a snapshot per `--interval`,
//!   separated by blank lines, until shutdown; `--once` prints one and
//!   exits (`-o json`: the snapshot as one JSON document).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use futures::StreamExt;
use grs_proto::v1 as pb;

use crate::args::OutputFormat;
use crate::client::Connection;
use crate::error::{CliError, Subject};
use crate::table::{Table, ago, id_or_dash, or_dash};
use crate::view::{self, instance_state};

/// Redraws caused by events are at least this far apart.
pub const MIN_REDRAW: Duration = Duration::from_millis(200);

/// Events kept for the "recent events" section.
const RECENT_EVENTS: usize = 8;

/// `grs top`
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Only this pool's instances and events.
    #[arg(long)]
    pub pool: Option<String>,
    /// Take a fresh snapshot at least this often, events or not.
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Print one snapshot and exit (scripts, tests).
    #[arg(long)]
    pub once: bool,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err("must be at least 100ms".into());
    }
    Ok(d)
}

/// What one redraw shows.
#[derive(Debug)]
pub struct Snapshot {
    at: SystemTime,
    stats: pb::Stats,
    pools: Vec<pb::Pool>,
    instances: Vec<pb::Instance>,
}

async fn snapshot(conn: &Connection, pool: &str) -> Result<Snapshot, CliError> {
    let subject = (!pool.is_empty()).then(|| Subject::Pool(pool.to_owned()));
    let stats = conn
        .call(None, |mut api| async move {
            api.get_stats(pb::GetStatsRequest {}).await
        })
        .await?;
    let pools = conn
        .call(None, |mut api| async move {
            api.list_pools(pb::ListPoolsRequest {}).await
        })
        .await?
        .pools
        .into_iter()
        .filter(|p| pool.is_empty() || p.name == pool)
        .collect();
    let req = pb::ListInstancesRequest {
        pool: pool.to_owned(),
        include_deleted: false,
    };
    let instances = conn
        .call(
            subject,
            |mut api| async move { api.list_instances(req).await },
        )
        .await?
        .instances;
    Ok(Snapshot {
        at: SystemTime::now(),
        stats,
        pools,
        instances,
    })
}

/// The snapshot as lines (at most `max_instances` instance rows).
fn render(
    s: &Snapshot,
    events: &VecDeque<String>,
    server: &str,
    max_instances: usize,
) -> Vec<String> {
    let mut text = Vec::new();
    let at = humantime::format_rfc3339_seconds(s.at);
    writeln!(text, "grs top — {server} — {at}").ok();
    writeln!(text).ok();
    let mut q = Table::new(&["QUEUE", "DEPTH", "IN WORK"]);
    q.row(vec![
        "provision".into(),
        s.stats.provision_queue_depth.to_string(),
        s.stats.provision_queue_pending.to_string(),
    ]);
    q.row(vec![
        "teardown".into(),
        s.stats.teardown_queue_depth.to_string(),
        s.stats.teardown_queue_pending.to_string(),
    ]);
    q.write(&mut text).ok();
    writeln!(text).ok();
    // Instances by state, per pool.
    let mut by_state: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for i in &s.instances {
        *by_state
            .entry(i.pool.as_str())
            .or_default()
            .entry(instance_state(i.state))
            .or_default() += 1;
    }
    let mut p = Table::new(&[
        "POOL",
        "STATUS",
        "IN USE",
        "QUEUED",
        "MIN IDLE",
        "INSTANCES",
    ]);
    for pool in &s.pools {
        let states = by_state
            .get(pool.name.as_str())
            .map(|m| {
                m.iter()
                    .map(|(st, n)| format!("{st} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        p.row(vec![
            pool.name.clone(),
            if pool.paused { "paused" } else { "active" }.into(),
            format!("{}/{}", pool.instances_in_use, pool.max_instances),
            pool.jobs_queued.to_string(),
            pool.min_idle.to_string(),
            or_dash(&states),
        ]);
    }
    p.write(&mut text).ok();
    writeln!(text).ok();
    let mut t = Table::new(&["INSTANCE", "STATE", "POOL", "JOB", "LOCATION", "UPDATED"]);
    let mut instances: Vec<&pb::Instance> = s.instances.iter().collect();
    instances.sort_by(|a, b| a.name.cmp(&b.name));
    for i in instances.iter().take(max_instances) {
        t.row(vec![
            i.name.clone(),
            instance_state(i.state),
            or_dash(&i.pool),
            id_or_dash(if i.assigned_job_id != 0 {
                i.assigned_job_id
            } else {
                i.job_id
            }),
            or_dash(&i.location),
            ago(i.updated_at.as_ref(), s.at),
        ]);
    }
    t.write(&mut text).ok();
    if instances.len() > max_instances {
        writeln!(text, "… and {} more", instances.len() - max_instances).ok();
    }
    writeln!(text).ok();
    writeln!(text, "RECENT EVENTS").ok();
    if events.is_empty() {
        writeln!(text, "(none since grs top started)").ok();
    }
    for e in events {
        writeln!(text, "{e}").ok();
    }
    String::from_utf8_lossy(&text)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `-o json`: the snapshot with the API's JSON forms.
fn json(s: &Snapshot) -> serde_json::Value {
    let pools = pb::ListPoolsResponse {
        pools: s.pools.clone(),
    };
    let instances = pb::ListInstancesResponse {
        instances: s.instances.clone(),
    };
    serde_json::json!({
        "at": humantime::format_rfc3339_millis(s.at).to_string(),
        "stats": view::Stats::from(&s.stats),
        "pools": view::ListPools::from(&pools),
        "instances": view::ListInstances::from(&instances),
    })
}

/// Runs `grs top`; `terminal` says whether stdout is an interactive
/// terminal (then `out` is not used: the screen is drawn on stdout).
pub(crate) async fn run(
    conn: &Connection,
    args: TopArgs,
    format: OutputFormat,
    out: &mut impl Write,
    shutdown: impl Future<Output = ()>,
    terminal: bool,
) -> Result<(), CliError> {
    let pool = args.pool.clone().unwrap_or_default();
    if args.once {
        let s = snapshot(conn, &pool).await?;
        match format {
            OutputFormat::Json => {
                serde_json::to_writer_pretty(&mut *out, &json(&s)).map_err(std::io::Error::from)?;
                writeln!(out)?;
            }
            OutputFormat::Table => {
                for l in render(&s, &VecDeque::new(), conn.server(), usize::MAX) {
                    writeln!(out, "{l}")?;
                }
            }
        }
        return Ok(());
    }
    let req = pb::WatchEventsRequest { pool: pool.clone() };
    let subject = (!pool.is_empty()).then(|| Subject::Pool(pool.clone()));
    let mut stream = conn
        .call(
            subject,
            |mut api| async move { api.watch_events(req).await },
        )
        .await?;
    let mut screen = if terminal {
        Some(Screen::enter()?)
    } else {
        None
    };
    let mut keys = screen
        .as_ref()
        .map(|_| crossterm::event::EventStream::new());
    let mut events: VecDeque<String> = VecDeque::new();
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An event asks for a redraw no sooner than MIN_REDRAW after the last.
    let mut redraw_at: Option<tokio::time::Instant> = None;
    let mut drawn_at = Instant::now();
    tokio::pin!(shutdown);
    loop {
        let redraw = async {
            match redraw_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let key = async {
            match keys.as_mut() {
                Some(k) => k.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tick.tick() => {}
            _ = redraw => {}
            k = key => {
                if is_quit(k) {
                    return Ok(());
                }
                // A resize or another key: draw again at once.
            }
            next = stream.next() => {
                match next {
                    Some(Ok(e)) => {
                        if events.len() == RECENT_EVENTS {
                            events.pop_front();
                        }
                        events.push_back(crate::commands::event_line(&e));
                        if redraw_at.is_none() {
                            let wait = MIN_REDRAW.saturating_sub(drawn_at.elapsed());
                            redraw_at = Some(tokio::time::Instant::now() + wait);
                        }
                        continue;
                    }
                    Some(Err(status)) => return Err(conn.error(&status, None)),
                    None => {
                        return Err(CliError::Unavailable(format!(
                            "the control plane at {} ended the event stream",
                            conn.server()
                        )));
                    }
                }
            }
        };
        redraw_at = None;
        // An event redraw also takes a fresh snapshot: the event says
        // something changed, the snapshot says what it all looks like now.
        let last = snapshot(conn, &pool).await?;
        drawn_at = Instant::now();
        match screen.as_mut() {
            Some(s) => s.draw(&last, &events, conn.server())?,
            None => {
                for l in render(&last, &events, conn.server(), usize::MAX) {
                    writeln!(out, "{l}")?;
                }
                writeln!(out)?;
                out.flush()?;
            }
        }
    }
}

/// Whether a terminal event asks to quit (`q`, `Esc`, Ctrl-C), or the
/// terminal's input ended.
fn is_quit(e: Option<std::io::Result<crossterm::event::Event>>) -> bool {
    use crossterm::event::{Event, KeyCode, KeyEventKind, KeyModifiers};
    match e {
        None | Some(Err(_)) => true,
        Some(Ok(Event::Key(k))) if k.kind != KeyEventKind::Release => {
            matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL))
        }
        _ => false,
    }
}

/// The terminal in the alternate screen and raw mode; restored on drop.
struct Screen {
    stdout: std::io::Stdout,
}

impl Screen {
    fn enter() -> Result<Self, CliError> {
        crossterm::terminal::enable_raw_mode()?;
        let mut s = Self {
            stdout: std::io::stdout(),
        };
        crossterm::execute!(
            s.stdout,
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )?;
        Ok(s)
    }

    fn draw(
        &mut self,
        snap: &Snapshot,
        events: &VecDeque<String>,
        server: &str,
    ) -> Result<(), CliError> {
        use crossterm::{cursor, queue, terminal};
        // A terminal that does not know its size (0×0, as a bare pty
        // reports) is drawn as the classic 80×24.
        let (w, h) = match terminal::size() {
            Ok((w, h)) if w > 0 && h > 0 => (w, h),
            _ => (80, 24),
        };
        // Room for the instance rows: the height minus everything else.
        let fixed = 14 + snap.pools.len() + events.len().max(1);
        let rows = (h as usize).saturating_sub(fixed).max(1);
        let mut lines = render(snap, events, server, rows);
        lines.truncate(h.saturating_sub(1) as usize);
        queue!(
            self.stdout,
            cursor::MoveTo(0, 0),
            terminal::Clear(terminal::ClearType::All)
        )?;
        for l in &lines {
            let l: String = l.chars().take(w as usize).collect();
            write!(self.stdout, "{l}\r\n")?;
        }
        write!(self.stdout, "q: quit")?;
        self.stdout.flush()?;
        Ok(())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = crossterm::execute!(
            self.stdout,
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
        let _ = crossterm::terminal::disable_raw_mode();
    }
}
