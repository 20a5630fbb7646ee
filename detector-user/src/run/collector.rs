//! The run loop: drains the ring buffer into the correlator, the hazard tracker and the sink
//! until the target exits, a signal arrives or the duration elapses, then reports the hazards
//! and the summary.
use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use detector_common::{DecodeError, Event, Stat, request_wait_ns};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
};

use crate::{
    engine::{
        budget::{BURST_MAX, BURST_MIN, Budget, Spent},
        correlate::{Alert, Correlator},
        cost::{Costs, ProbeHits, SelfCost, Traps, required_ns, sampling_ns},
        dedup::Pairs,
        hazard::HazardTracker,
        sampling::Sampler,
        summary::{LostByKind, ProcessJson, ProvokeJson, Summary, WindowJson},
    },
    probe::loader::{Loaded, monotonic_ns},
    probe::plan::Discover,
    process::{cpu::CpuMeter, table::Processes, target::Target},
    report::Sink,
    report::{file::Reopen, metrics::Metrics},
    targets::Resolver,
};

/// How often the ring buffer is drained when no write woke us: the kernel side writes without
/// wakeups below half full, so this bounds the alert latency.
const POLL: Duration = Duration::from_millis(10);

/// How often a run on the host looks for what else to watch (new interpreter files).
const DISCOVER: Duration = Duration::from_secs(crate::targets::python::host::LOOK_EVERY_S);

/// Events read from the ring ahead of their handling, at most (8 KiB each at worst).
const QUEUE_MAX: usize = 4096;

/// How a SIGHUP ends a run that does not reopen its output on it.
const HANGUP: &str = "hung up (SIGHUP)";

/// The signals that end a run, caught from before the probes are loaded: one that arrives while
/// racewatch loads or attaches still ends the run with a summary and a clean detach.
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    pub fn catch() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves with how the run ended when one arrives.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "interrupted (SIGINT)",
            _ = self.term.recv() => "terminated (SIGTERM)",
            _ = self.hup.recv() => HANGUP,
        }
    }
}

pub struct Run<'a> {
    pub signals: Signals,
    /// Reopens `-o FILE` on SIGHUP instead of ending the run.
    pub reopen: Option<Reopen>,
    /// `--metrics`: where Prometheus scrapes the counts.
    pub metrics: Option<tokio::net::TcpListener>,
    pub loaded: &'a mut Loaded,
    pub events: RingBuf<MapData>,
    pub correlator: Correlator,
    /// The name of each window attached, by window.
    pub windows: BTreeMap<u32, String>,
    pub resolver: Resolver,
    pub sink: &'a mut dyn Sink,
    pub duration: Option<Duration>,
    /// Hazard reports between the start and the end, if asked for.
    pub interval: Option<Duration>,
    /// How each probe traps, for the estimate of what racewatch added to the target.
    pub traps: Traps,
    /// What one probe hit costs here, measured before the probes were attached.
    pub costs: Option<Costs>,
    /// What else to watch, looked for every [`DISCOVER`] (a run on the host).
    pub discover: Option<Box<dyn Discover>>,
    pub budget: Budget,
    /// The processes watched from the start, each with the watched process it was forked from.
    pub watched_at_start: Vec<(u32, Option<u32>)>,
    /// Why processes the target forks are not watched, if they are not.
    pub forks_unfollowed: Option<String>,
    /// What the run knew from its start it could not watch.
    pub unwatched: Vec<String>,
}

/// Where decoded events go.
struct Consumers<'a> {
    correlator: Correlator,
    windows: BTreeMap<u32, String>,
    hazard: HazardTracker,
    resolver: Resolver,
    pairs: Pairs,
    sink: &'a mut dyn Sink,
    queue: VecDeque<Result<Event, DecodeError>>,
    decode_errors: u64,
    processes: Processes,
    /// The watched processes' CPU time, for the budget.
    cpu: CpuMeter,
    metrics: Metrics,
}

impl Consumers<'_> {
    /// Counts each alert in its stack pair; only a pair's first reaches the sink.
    fn alerts(&mut self, alerts: Vec<Alert>) -> anyhow::Result<()> {
        for alert in alerts {
            if let Some(pair) = self.pairs.observe(&alert) {
                let window = self.windows.get(&alert.window).map_or("", String::as_str);
                self.sink
                    .alert(&alert, pair, self.processes.identity(alert.pid), window)?;
            }
        }
        Ok(())
    }

    /// Feeds every event waiting in the ring to the correlator (stacks resolved first) and the
    /// hazard tracker, and the alerts to the sink. The ring is emptied into `queue` before each
    /// event is handled, so a slow first symbolization (files parsed on first use) never leaves
    /// the kernel a full ring.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        loop {
            // Bounded: when resolving falls behind for good, the ring fills and the kernel
            // counts what it cannot deliver, rather than racewatch's memory growing.
            while self.queue.len() < QUEUE_MAX
                && let Some(item) = ring.next()
            {
                self.queue.push_back(Event::decode(&item));
            }
            let Some(event) = self.queue.pop_front() else {
                self.sink.flush()?;
                return Ok(());
            };
            match event {
                Ok(Event::Fork(f)) => self.processes.forked(&f),
                Ok(Event::Exit(x)) => {
                    let had_window = self.correlator.per_process().contains_key(&x.tgid);
                    self.processes.exited(x.tgid, had_window);
                    self.cpu.exited(x.tgid);
                    self.hazard.on_exit(x.tgid);
                    self.resolver.forget(x.tgid);
                    self.correlator.on_exit(x.tgid);
                    for pid in self.correlator.take_dropped() {
                        self.processes.forget(pid);
                    }
                }
                Ok(event) => {
                    self.processes.seen(event.tgid());
                    if let Some((tid, ns, frames)) = self.resolver.resolve(&event) {
                        self.correlator.on_stack(event.tgid(), tid, ns, frames);
                    }
                    self.hazard.on_event(&event);
                    let alerts = self.correlator.on_event(&event);
                    self.alerts(alerts)?;
                }
                Err(_) => self.decode_errors += 1,
            }
        }
    }

    /// The stack pairs that raced since the last report, with their counts.
    fn report_pairs(&mut self) -> anyhow::Result<()> {
        for (number, pair, new) in self.pairs.report() {
            self.sink.pair(number, &pair.into(), new)?;
        }
        Ok(())
    }

    /// The counts so far, as Prometheus text.
    fn metrics_text(&mut self, loaded: &Loaded) -> String {
        let lost = loaded
            .stats()
            .map(|s| Stat::LOST.iter().map(|&k| s[k as usize]).sum())
            .unwrap_or(0);
        let processes = &self.processes;
        self.metrics.update(
            self.correlator.per_process(),
            self.correlator.counts(),
            |pid| {
                processes
                    .get(pid)
                    .map(|p| p.comm.clone())
                    .unwrap_or_default()
            },
            lost,
            loaded.watched().unwrap_or(0),
        );
        let windows = &self.windows;
        self.metrics
            .update_windows(self.correlator.per_window(), |w| {
                windows.get(&w).cloned().unwrap_or_default()
            });
        self.metrics.render()
    }

    /// `sampled`: how long lookups were counted, when they are counted in bursts.
    fn report_hazards(
        &mut self,
        loaded: &Loaded,
        started: Instant,
        sampled: Option<Duration>,
    ) -> anyhow::Result<()> {
        let elapsed = started.elapsed();
        let counted = sampled.unwrap_or(elapsed).as_secs_f64();
        for h in self
            .hazard
            .report(&loaded.readers()?, elapsed.as_secs_f64(), counted)
        {
            let window = self.windows.get(&h.window).map_or("", String::as_str);
            self.sink
                .hazard(&h, self.processes.identity(h.pid), window)?;
        }
        Ok(())
    }
}

impl Run<'_> {
    pub async fn run(self, target: &mut Target) -> anyhow::Result<Summary> {
        let Run {
            mut signals,
            reopen,
            metrics,
            loaded,
            events,
            correlator,
            windows,
            resolver,
            sink,
            duration,
            interval,
            mut traps,
            costs,
            mut discover,
            budget,
            watched_at_start,
            forks_unfollowed,
            unwatched,
        } = self;
        let mut feed = Consumers {
            correlator,
            windows,
            // Without the costs, lock spans keep racewatch's traps in: the forecast errs high.
            hazard: HazardTracker::new(costs.map_or(0.0, |c| c.lock_edges_ns)),
            resolver,
            pairs: Pairs::default(),
            sink,
            queue: VecDeque::new(),
            decode_errors: 0,
            processes: Processes::default(),
            cpu: CpuMeter::default(),
            metrics: Metrics::default(),
        };
        for (pid, parent) in watched_at_start {
            feed.processes.watched(pid, parent);
        }
        let started = Instant::now();
        let deadline = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(POLL);
        let mut discover_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + DISCOVER, DISCOVER);
        let mut met_unwatched = Vec::new();
        let mut hazard_tick =
            interval.map(|d| tokio::time::interval_at(tokio::time::Instant::now() + d, d));
        let hazard_due = async |t: &mut Option<tokio::time::Interval>| match t {
            Some(t) => t.tick().await,
            None => std::future::pending().await,
        };
        let mut sampler = loaded
            .samples()
            .then(|| Sampler::new(Instant::now(), loaded.samples_always()));
        // SAFETY: the ring buffer owns its map fd and keeps it for as long as the AsyncFd lives.
        let mut ring = unsafe { AsyncFd::register(events) }.map_err(|e| e.into_parts().1)?;
        let ended = loop {
            let sample_due = sampler.as_ref().and_then(Sampler::due);
            tokio::select! {
                how = signals.recv() => match (how, &reopen) {
                    (HANGUP, Some(r)) => {
                        eprintln!("racewatch: SIGHUP: reopening the output file");
                        feed.sink.flush()?;
                        r.request();
                    }
                    _ => break how.to_string(),
                },
                _ = &mut deadline => break "duration elapsed".to_string(),
                status = target.exited() => break match status {
                    Some(s) => format!("target exited ({s})"),
                    None => "target exited".to_string(),
                },
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    feed.drain(guard.get_inner_mut())?;
                    guard.clear_ready();
                }
                _ = tick.tick() => feed.drain(ring.get_mut())?,
                conn = accept(metrics.as_ref()) => {
                    feed.drain(ring.get_mut())?;
                    if let Ok((stream, _)) = conn {
                        serve_metrics(stream, feed.metrics_text(loaded));
                    }
                }
                _ = discover_tick.tick(), if discover.is_some() => {
                    if let Some(d) = discover.as_mut() {
                        met_unwatched.extend(watch_what_started(
                            d.as_mut(),
                            loaded,
                            &mut traps,
                            &mut feed.windows,
                        ));
                    }
                }
                _ = hazard_due(&mut hazard_tick) => {
                    feed.drain(ring.get_mut())?;
                    let sampled = sampler.as_ref().map(|s| s.sampled(Instant::now()));
                    feed.report_hazards(loaded, started, sampled)?;
                    feed.report_pairs()?;
                }
                _ = sleep_until(sample_due) => {
                    // Drained first: the burst's start decides which reader distances count.
                    feed.drain(ring.get_mut())?;
                    if let Some(s) = sampler.as_mut() {
                        // Sized by the budget only when one is about to start.
                        let burst = if s.is_on() || s.always() {
                            BURST_MAX
                        } else {
                            next_burst(&budget, costs.as_ref(), &traps, loaded, &mut feed, s)?
                        };
                        toggle_sample(s, loaded, &mut feed.hazard, burst)?;
                    }
                }
            }
        };
        if let Some(s) = sampler.as_mut().filter(|s| s.is_on()) {
            toggle_sample(s, loaded, &mut feed.hazard, BURST_MAX)?;
        }
        target.finish().await;
        // Events written before the end are still in the ring.
        feed.drain(ring.get_mut())?;
        feed.correlator.finish();
        let sampled = sampler.as_ref().map(|s| s.sampled(Instant::now()));
        feed.report_hazards(loaded, started, sampled)?;
        let mut summary = summary(
            loaded,
            &feed,
            forks_unfollowed.as_deref(),
            ended,
            started.elapsed(),
        )?;
        summary.unwatched.splice(0..0, unwatched);
        summary.unwatched.extend(met_unwatched);
        if summary.unplaced_keyerrors > 0 {
            summary.unwatched.push(format!(
                "{} KeyErrors raised while a window of their process was open, whose dict \
                 racewatch could not find on the Python frame's value stack: each may be a \
                 lookup that missed in the window",
                summary.unplaced_keyerrors
            ));
        }
        if summary.unjudged_quiet_lookups > 0 {
            summary.unwatched.push(format!(
                "{} d.get or `in` lookups in a window whose key racewatch could not hash (only \
                 str and int keys are) or look up in the dict: each may have missed",
                summary.unjudged_quiet_lookups
            ));
        }
        let cpu = target.cpu_used().map(|d| d.as_nanos() as u64);
        summary.self_cost =
            costs.map(|c| SelfCost::new(c, &traps, &summary.probe_hits, cpu, budget.share));
        summary.sampling = sampler.as_ref().map(|s| s.account(Instant::now()));
        feed.sink.summary(&summary)?;
        Ok(summary)
    }
}

/// The next scrape of `--metrics`, if it is served.
async fn accept(
    listener: Option<&tokio::net::TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Answers one HTTP request with `body` at /metrics (404 elsewhere), in a task of its own so a
/// slow client never holds the loop; a client that sends nothing in a second is dropped.
fn serve_metrics(mut stream: tokio::net::TcpStream, body: String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tokio::spawn(async move {
        let mut request = [0u8; 1024];
        let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(1), stream.read(&mut request)).await
        else {
            return;
        };
        let line = String::from_utf8_lossy(&request[..n]);
        let (status, body) = if line.starts_with("GET /metrics ") {
            ("200 OK", body)
        } else {
            ("404 Not Found", "racewatch serves /metrics\n".to_string())
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream.shutdown().await;
    });
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Attaches what `d` found since it was last asked (how its probes trap joins `traps`, their
/// window's name `windows`); returns what cannot be watched.
fn watch_what_started(
    d: &mut dyn Discover,
    loaded: &mut Loaded,
    traps: &mut Traps,
    windows: &mut BTreeMap<u32, String>,
) -> Vec<String> {
    let (plans, mut unwatched) = d.discover();
    for plan in plans {
        *traps = traps.and(plan.traps());
        match loaded.attach(&plan) {
            Ok(()) => {
                windows.insert(plan.window, plan.name.clone());
                eprintln!(
                    "racewatch: now also watching every process that maps {}",
                    crate::text::escape(&plan.binary.to_string_lossy())
                )
            }
            Err(e) => unwatched.push(format!(
                "the processes that map {}: {:#}",
                crate::text::escape(&plan.binary.to_string_lossy()),
                anyhow::Error::from(e)
            )),
        }
    }
    unwatched
}

/// How long the next lookup-sampling burst may run under the budget, from what the probes added
/// so far and what the watched processes ran. Without the per-hit costs, the shortest burst.
fn next_burst(
    budget: &Budget,
    costs: Option<&Costs>,
    traps: &Traps,
    loaded: &Loaded,
    feed: &mut Consumers,
    sampler: &Sampler,
) -> anyhow::Result<Duration> {
    let Some(costs) = costs else {
        return Ok(BURST_MIN);
    };
    feed.cpu.update(feed.processes.running());
    let hits = probe_hits(&loaded.stats()?);
    Ok(budget.burst(&Spent {
        required_ns: required_ns(costs, traps, &hits),
        sampling_ns: sampling_ns(costs, traps, &hits),
        sampled: sampler.sampled(Instant::now()),
        target_cpu: feed.cpu.total(),
    }))
}

/// Starts a lookup-sampling burst of `burst` (none when it is zero: the budget is spent) or
/// stops the running one. A burst that cannot start ends the sampling, not the run: the process
/// may have just exited (then silently), or the kernel refused (then with a warning, and the
/// hazard report keeps the counts of the bursts that ran).
fn toggle_sample(
    s: &mut Sampler,
    loaded: &mut Loaded,
    hazard: &mut HazardTracker,
    burst: Duration,
) -> anyhow::Result<()> {
    if s.is_on() {
        s.stopped(Instant::now());
        loaded.stop_sample()?;
        return Ok(());
    }
    if burst.is_zero() {
        s.skipped(Instant::now());
        return Ok(());
    }
    hazard.on_burst(monotonic_ns());
    match loaded.start_sample() {
        Ok(()) => s.started(Instant::now(), burst),
        Err(e) => {
            s.halt();
            if !process_gone(&e) {
                eprintln!(
                    "racewatch: warning: lookup sampling stopped: {}",
                    crate::text::escape(&format!("{:#}", anyhow::Error::from(e)))
                );
            }
        }
    }
    Ok(())
}

/// Whether an attach failed because the traced process no longer exists (ESRCH).
fn process_gone(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ESRCH))
        {
            return true;
        }
        cause = c.source();
    }
    false
}

fn summary(
    loaded: &Loaded,
    feed: &Consumers,
    forks_unfollowed: Option<&str>,
    ended: String,
    elapsed: Duration,
) -> anyhow::Result<Summary> {
    let s = loaded.stats()?;
    let stat = |k: Stat| s[k as usize];
    let lost_by_kind = LostByKind {
        window_open: stat(Stat::LostWindowOpen),
        window_close: stat(Stat::LostWindowClose),
        lookup: stat(Stat::LostLookup),
        keyerror: stat(Stat::LostKeyError),
        key_verdict: stat(Stat::LostKeyVerdict),
        near: stat(Stat::LostNear),
        native_stack: stat(Stat::LostNativeStack),
        py_frames: stat(Stat::LostPyFrames),
        process: stat(Stat::LostProcess),
    };
    let p = loaded.provoke()?;
    Ok(Summary {
        counts: feed.correlator.counts().clone(),
        lost_events: Stat::LOST.iter().map(|&k| stat(k)).sum(),
        lost_by_kind,
        kernel_lookups_in_window: stat(Stat::WindowLookups),
        map_full: stat(Stat::MapFull),
        pending_full: stat(Stat::PendingFull),
        unjudged_keys: stat(Stat::UnjudgedKeys),
        unplaced_keyerrors: stat(Stat::UnplacedKeyErrors),
        unjudged_quiet_lookups: stat(Stat::UnjudgedQuiet),
        writer_stacks_unread: stat(Stat::WriterStacksUnread),
        stacks_shed: stat(Stat::StacksShed),
        decode_errors: feed.decode_errors,
        probe_hits: probe_hits(&s),
        provoke: ProvokeJson {
            windows: p.windows,
            added_ns: p.held_ns,
            over_budget: p.refused,
            hold_ns: loaded.provoke_ns,
            switch_interval_us: (p.switch_interval_us != 0).then_some(p.switch_interval_us),
            request_wait_ns: (p.switch_interval_us != 0)
                .then(|| request_wait_ns(p.switch_interval_us, loaded.provoke_ns))
                .flatten(),
            unanswered: p.unanswered,
            beyond_reach: p.beyond_reach,
        },
        self_cost: None,
        sampling: None,
        pairs: feed.pairs.pairs().iter().map(Into::into).collect(),
        alerts_held_back: feed.pairs.held_back,
        unkept_pair_lookups: feed.pairs.unkept,
        processes: processes(feed),
        windows_by_name: windows_by_name(feed),
        forks: stat(Stat::Forks),
        processes_dropped: feed.correlator.processes_dropped(),
        misses_by_form: feed
            .correlator
            .misses_by_form()
            .map(|m| m.iter().map(|(f, n)| (f.to_string(), *n)).collect()),
        unwatched: unwatched(
            forks_unfollowed,
            stat(Stat::ForksUnwatched),
            feed.correlator.counts().unrefilled_keyerrors,
        ),
        duration_s: elapsed.as_secs_f64(),
        ended,
    })
}

/// Each process that had a window, named from the process table.
fn processes(feed: &Consumers) -> Vec<ProcessJson> {
    feed.correlator
        .per_process()
        .iter()
        .map(|(&pid, c)| {
            let p = feed.processes.get(pid);
            ProcessJson {
                pid,
                ns_pid: p.and_then(|p| p.identity.ns_pid),
                container: p.and_then(|p| p.identity.container.clone()),
                comm: p.map(|p| p.comm.clone()).unwrap_or_default(),
                parent: p.and_then(|p| p.parent),
                windows: c.windows,
                lookups_in_window: c.lookups_in_window,
                misses_in_window: c.misses_in_window,
            }
        })
        .collect()
}

/// Each window attached, by name, with its counts (zero for one that had no window).
fn windows_by_name(feed: &Consumers) -> BTreeMap<String, WindowJson> {
    let counts = feed.correlator.per_window();
    feed.windows
        .iter()
        .map(|(w, name)| {
            (
                name.clone(),
                counts.get(w).map(Into::into).unwrap_or_default(),
            )
        })
        .collect()
}

/// What the run could not watch, for the summary.
fn unwatched(
    forks_unfollowed: Option<&str>,
    forks_unwatched: u64,
    unrefilled_keyerrors: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    if unrefilled_keyerrors > 0 {
        out.push(format!(
            "{unrefilled_keyerrors} KeyErrors in windows no refill closed while racewatch \
             watched (a dict emptied and refilled some other way than the refill racewatch \
             knows, one freed and its address given to a new dict, or a writer that ended inside \
             its window): whether a refill would have brought their keys back is unknown"
        ));
    }
    if let Some(why) = forks_unfollowed {
        out.push(format!("processes the target forks: {why}"));
    }
    if forks_unwatched > 0 {
        out.push(format!(
            "{forks_unwatched} forked processes: the kernel's table of watched processes was full"
        ));
    }
    out
}

/// Times each probe fired, from the kernel's counters.
fn probe_hits(s: &[u64]) -> ProbeHits {
    let stat = |k: Stat| s[k as usize];
    ProbeHits {
        clear: stat(Stat::HitsClear),
        refill_entry: stat(Stat::HitsRefillEntry),
        refill_return: stat(Stat::HitsRefillReturn),
        lookup_entry: stat(Stat::HitsLookupEntry),
        lookup_return: stat(Stat::HitsLookupReturn),
        lookup_miss: stat(Stat::HitsLookupMiss),
        lookup_sample: stat(Stat::HitsLookupSample),
        keyerror: stat(Stat::HitsKeyError),
        quiet_lookup: stat(Stat::HitsQuietLookup),
        lock_edge: stat(Stat::HitsLockEdge),
    }
}
