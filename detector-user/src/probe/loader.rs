//! Loads racewatch's eBPF object and attaches the probes, each with its configuration (its
//! attach cookie indexes `PROBES`), and keeps the set of watched processes.
use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        RawTracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use detector_common::{
    ARG_SLOTS, EVENTS_MAP, MAX_PROBES, MAX_WINDOWS, OBJECT_IN_MEMORY, OBJECT_IN_REGISTER,
    OBJECT_STATIC, PROBES_MAP, PROVOKE_MAP, PY_LAYOUTS_MAP, ProbeConfig, ProvokeState, PyLayout,
    READERS_MAP, ReaderKey, ReaderState, STATS_MAP, StackMode, Stat, WATCHED_MAP, globals,
};

use crate::probe::{
    plan::{DropRequest, LookupProbe, ObjectAt, Placed, Plan, RefillProbe},
    symbols::Function,
};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the kernel refused racewatch's eBPF programs: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("cannot load the `{program}` probe program: {source}")]
    Program {
        program: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot attach the {role} probe to {function} in {binary}: {source}")]
    Attach {
        role: &'static str,
        function: String,
        binary: PathBuf,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot count this machine's CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    #[error("racewatch's eBPF object lacks map {0} (a build mismatch: rebuild racewatch)")]
    MissingMap(&'static str),
    #[error("racewatch attaches at most {0} probes in one run")]
    TooManyProbes(u32),
    #[error("racewatch watches at most {0} windows (interpreter files) in one run")]
    TooManyWindows(u32),
    #[error("cannot use the kernel map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

pub struct Options {
    /// `tgid`'s offset in the kernel's `task_struct` (see `probe::kernel`): with it, processes
    /// forked by watched ones are watched too.
    pub task_tgid_offset: Option<u64>,
    /// Watch every process that maps a probed file (system-wide), not only those added with
    /// [`Loaded::watch`].
    pub watch_all: bool,
    pub ring_bytes: u32,
    /// How long to hold a writer in each window (0: never).
    pub provoke_ns: u64,
    pub stack_mode: StackMode,
}

/// The loaded object; dropping it detaches every probe and frees every map.
pub struct Loaded {
    ebpf: Ebpf,
    pub probes: usize,
    /// Attach cookies handed out so far: each indexes its configuration in `PROBES`.
    configs: u32,
    /// How long `--provoke` holds each window (0: never).
    pub provoke_ns: u64,
    /// Native `--provoke`: the refill's entry probe holds the writer.
    hold_at_refill: bool,
    /// Each plan's sampling probe site and its cookie, once attached; and their links while a
    /// burst runs.
    samples: Vec<(PathBuf, Placed, u64)>,
    sample_links: Vec<UProbeLinkId>,
    sample_always: bool,
    /// Every other probe's program and link, detached together when the run ends.
    links: Vec<(&'static str, UProbeLinkId)>,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let sampled = std::mem::take(&mut self.sample_links)
            .into_iter()
            .map(|link| (SAMPLE_PROGRAM, link));
        let links: Vec<UProbeLink> = std::mem::take(&mut self.links)
            .into_iter()
            .chain(sampled)
            .filter_map(|(program, link)| self.program(program).ok()?.take_link(link).ok())
            .collect();
        detach_together(links);
    }
}

/// Detaches `links` side by side and returns when all are. Each uprobe's detach waits for the
/// kernel's grace periods (~0.1 s here), and the kernel takes them one at a time, but side by
/// side the waits overlap: a run with 72 probes ended in 6 s instead of 7.5.
fn detach_together(links: Vec<UProbeLink>) {
    std::thread::scope(|s| {
        for link in links {
            // No thread to spare: the link, dropped with the closure, detaches here.
            let _ = std::thread::Builder::new()
                .name("racewatch-detach".into())
                .stack_size(DETACH_STACK)
                .spawn_scoped(s, move || drop(link));
        }
    });
}

/// The stack of a thread that only drops a link.
const DETACH_STACK: usize = 64 * 1024;

/// The lookup-counting probe's program, attached and detached at every sampling burst.
const SAMPLE_PROGRAM: &str = "on_lookup_sample";

pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detector"));

/// Map `name` of `ebpf`, through the type it is written with.
fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { map: name, source })
}

/// Adds process `tgid` to those `ebpf`'s probes watch.
pub(crate) fn watch_in(ebpf: &mut Ebpf, tgid: u32) -> Result<(), LoadError> {
    let mut watched: HashMap<_, u32, u8> = map_mut(ebpf, WATCHED_MAP)?;
    watched.insert(tgid, 1, 0).map_err(|source| LoadError::Map {
        map: WATCHED_MAP,
        source,
    })
}

/// Stores the configuration of the attachment whose cookie is `cookie`.
pub(crate) fn configure_in(
    ebpf: &mut Ebpf,
    cookie: u32,
    config: &ProbeConfig,
) -> Result<(), LoadError> {
    let mut probes: Array<_, ProbeConfig> = map_mut(ebpf, PROBES_MAP)?;
    probes
        .set(cookie, config, 0)
        .map_err(|source| LoadError::Map {
            map: PROBES_MAP,
            source,
        })
}

impl Loaded {
    pub fn load(opts: &Options, plan: &Plan) -> Result<Loaded, LoadError> {
        let wakeup_bytes = u64::from(opts.ring_bytes / 2);
        let (drop_vaddr, drop_in_thread, drop_mask) =
            match plan.gil.as_ref().map(|g| g.drop_request) {
                None => (0u64, 0u64, u32::MAX),
                Some(DropRequest::Static { vaddr }) => (vaddr, 0, u32::MAX),
                Some(DropRequest::InThread { offset }) => (0, offset, 1),
            };
        // The provocation budget accrues from now, on the clock bpf_ktime_get_ns reads.
        let start_ns = monotonic_ns();
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| LoadError::Cpus(e))?
            .try_into()
            .unwrap_or(u32::MAX);
        let ebpf = EbpfLoader::new()
            .override_global(globals::WATCH_ALL, &u32::from(opts.watch_all), true)
            .override_global(
                globals::TASK_TGID_OFFSET,
                &opts.task_tgid_offset.unwrap_or(0),
                true,
            )
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global(globals::PROVOKE_NS, &opts.provoke_ns, true)
            .override_global(globals::PROVOKE_START_NS, &start_ns, true)
            .override_global(globals::PROVOKE_CPUS, &cpus, true)
            .override_global(globals::DROP_REQUEST_VADDR, &drop_vaddr, true)
            .override_global(globals::DROP_REQUEST_IN_THREAD, &drop_in_thread, true)
            .override_global(globals::DROP_REQUEST_MASK, &drop_mask, true)
            .override_global(
                globals::SWITCH_INTERVAL_VADDR,
                &plan.gil.as_ref().map_or(0, |g| g.switch_interval_vaddr),
                true,
            )
            .override_global(globals::STACK_MODE, &(opts.stack_mode as u32), true)
            .map_max_entries(EVENTS_MAP, opts.ring_bytes)
            .load(OBJECT)
            .map_err(|e| LoadError::Load(Box::new(e)))?;
        Ok(Loaded {
            ebpf,
            probes: 0,
            configs: 0,
            provoke_ns: opts.provoke_ns,
            hold_at_refill: opts.provoke_ns != 0 && plan.gil.is_none(),
            samples: Vec::new(),
            sample_links: Vec::new(),
            sample_always: false,
            links: Vec::new(),
        })
    }

    /// Watches process `tgid` from now on (the probes fire in every process that maps their
    /// file; the kernel keeps the events of watched ones).
    pub fn watch(&mut self, tgid: u32) -> Result<(), LoadError> {
        watch_in(&mut self.ebpf, tgid)
    }

    /// Watches the processes that watched ones fork (their pids join `WATCHED` in the kernel, at
    /// the fork, before the child runs) and forgets those that end.
    pub fn follow_forks(&mut self) -> Result<(), LoadError> {
        for (program, tracepoint) in [
            ("on_fork", "sched_process_fork"),
            ("on_exit", "sched_process_exit"),
        ] {
            let prog: &mut RawTracePoint = self
                .ebpf
                .program_mut(program)
                .and_then(|p| p.try_into().ok())
                .ok_or(LoadError::MissingMap(program))?;
            prog.load().map_err(|source| LoadError::Program {
                program,
                source: source.into(),
            })?;
            prog.attach(tracepoint)
                .map_err(|source| LoadError::Program {
                    program,
                    source: source.into(),
                })?;
        }
        Ok(())
    }

    /// The program, loaded into the kernel (verified) on first use.
    fn program(&mut self, program: &'static str) -> Result<&mut UProbe, LoadError> {
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoadError::MissingMap(program))?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| LoadError::Program {
                program,
                source: source.into(),
            })?;
        }
        Ok(prog)
    }

    /// A new attach cookie, its configuration stored.
    fn configure(&mut self, config: &ProbeConfig) -> Result<u64, LoadError> {
        let cookie = self.configs;
        if cookie >= MAX_PROBES {
            return Err(LoadError::TooManyProbes(MAX_PROBES));
        }
        configure_in(&mut self.ebpf, cookie, config)?;
        self.configs += 1;
        Ok(u64::from(cookie))
    }

    fn attach_one(
        &mut self,
        program: &'static str,
        role: &'static str,
        plan_binary: &PathBuf,
        function: &Function,
        offset: u64,
        config: &ProbeConfig,
    ) -> Result<(), LoadError> {
        let cookie = self.configure(&ProbeConfig {
            vaddr: function.address + offset,
            ..*config
        })?;
        let link = self.attach_site(program, role, plan_binary, function, offset, cookie)?;
        self.links.push((program, link));
        self.probes += 1;
        Ok(())
    }

    /// Attaches for every process that maps the file: forked workers and processes started
    /// later fire it too, and the kernel keeps the events of the watched ones.
    fn attach_site(
        &mut self,
        program: &'static str,
        role: &'static str,
        plan_binary: &PathBuf,
        function: &Function,
        offset: u64,
        cookie: u64,
    ) -> Result<UProbeLinkId, LoadError> {
        let prog = self.program(program)?;
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(function.file_offset + offset),
            cookie: Some(cookie),
        };
        let link = prog
            .attach(point, plan_binary, UProbeScope::AllProcesses)
            .map_err(|source| LoadError::Attach {
                role,
                function: function.display.clone(),
                binary: plan_binary.clone(),
                source: source.into(),
            })?;
        Ok(link)
    }

    /// Whether lookups are counted in bursts rather than all of them.
    pub fn samples(&self) -> bool {
        !self.samples.is_empty()
    }

    /// Whether the counting probe stays attached for the whole run.
    pub fn samples_always(&self) -> bool {
        self.sample_always
    }

    /// Starts a sampling burst: attaches the lookup-counting probes. No-op without one, or while
    /// a burst runs.
    pub fn start_sample(&mut self) -> Result<(), LoadError> {
        if !self.sample_links.is_empty() {
            return Ok(());
        }
        for (bin, placed, cookie) in self.samples.clone() {
            let link = self.attach_site(
                SAMPLE_PROGRAM,
                "lookup sample",
                &bin,
                &placed.function,
                placed.offset,
                cookie,
            )?;
            self.sample_links.push(link);
        }
        Ok(())
    }

    /// Ends a sampling burst: detaches the lookup-counting probes.
    pub fn stop_sample(&mut self) -> Result<(), LoadError> {
        for link in std::mem::take(&mut self.sample_links) {
            self.detach_sample(link)?;
        }
        Ok(())
    }

    /// Detaches a sampling probe. The collector goes on meanwhile: the probe stops firing at
    /// once, and the kernel's grace period that the detach then waits for is waited for on a
    /// thread of its own.
    fn detach_sample(&mut self, link: UProbeLinkId) -> Result<(), LoadError> {
        let link = self
            .program(SAMPLE_PROGRAM)?
            .take_link(link)
            .map_err(|source| LoadError::Program {
                program: SAMPLE_PROGRAM,
                source: source.into(),
            })?;
        // No thread to spare: the link, dropped with the closure, detaches here.
        let _ = std::thread::Builder::new()
            .name("racewatch-detach".into())
            .stack_size(DETACH_STACK)
            .spawn(move || drop(link));
        Ok(())
    }

    /// Stores the CPython layout of window `window`'s interpreter, which its probes read.
    fn store_layout(&mut self, window: u32, layout: &PyLayout) -> Result<(), LoadError> {
        let mut layouts: Array<_, PyLayout> = map_mut(&mut self.ebpf, PY_LAYOUTS_MAP)?;
        layouts
            .set(window, layout, 0)
            .map_err(|source| LoadError::Map {
                map: PY_LAYOUTS_MAP,
                source,
            })
    }

    /// Attaches every probe of `plan`, each with its configuration.
    pub fn attach(&mut self, plan: &Plan) -> Result<(), LoadError> {
        if plan.window >= MAX_WINDOWS {
            return Err(LoadError::TooManyWindows(MAX_WINDOWS));
        }
        if let Some(layout) = &plan.py_layout {
            self.store_layout(plan.window, layout)?;
        }
        let bin = &plan.binary;
        // Where the object is at an entry: the argument the plan names.
        let at_entry = ProbeConfig {
            object_slot: ARG_SLOTS
                .get(plan.object_arg as usize)
                .copied()
                .unwrap_or(ARG_SLOTS[0]),
            window: plan.window,
            miss_value: 0,
            vaddr: 0,
            object_kind: OBJECT_IN_REGISTER,
            object_offset: 0,
            ..ProbeConfig::default()
        };
        let cfg = &at_entry;
        for clear in &plan.clear {
            let f = &clear.function;
            let c = &with_object(cfg, clear.object);
            self.attach_one("on_clear", "clear", bin, f, clear.offset, c)?;
        }
        // The refill's entry probe shares the breakpoint its return probe needs at the entry.
        for refill in &plan.refills {
            let entry = if self.hold_at_refill {
                "on_refill_provoke"
            } else {
                "on_refill"
            };
            match refill {
                RefillProbe::Return(p) => {
                    let f = &p.function;
                    let c = &with_object(cfg, p.object);
                    self.attach_one(entry, "refill", bin, f, 0, c)?;
                    self.attach_one("on_refill_return", "refill return", bin, f, 0, c)?;
                }
                RefillProbe::Exits { entry: at, exits } => {
                    let f = &at.function;
                    let c = &with_object(cfg, at.object);
                    self.attach_one(entry, "refill", bin, f, at.offset, c)?;
                    for &exit in exits {
                        self.attach_one("on_refill_exit", "refill exit", bin, f, exit, c)?;
                    }
                }
                RefillProbe::Closes { entry: at, sites } => {
                    if self.hold_at_refill {
                        let c = &with_object(cfg, at.object);
                        self.attach_one(entry, "refill", bin, &at.function, at.offset, c)?;
                    }
                    for s in sites {
                        let c = &with_object(cfg, s.object);
                        let f = &s.function;
                        self.attach_one("on_refill_close", "refill close", bin, f, s.offset, c)?;
                    }
                }
            }
        }
        if let Some(edges) = &plan.lock_edges {
            for (program, what, sites) in [
                ("on_clear_unlock", "clear unlock", &edges.unlocks),
                ("on_refill_locked", "refill lock", &edges.locked),
            ] {
                for s in sites {
                    let c = &with_object(cfg, s.object);
                    self.attach_one(program, what, bin, &s.function, s.offset, c)?;
                }
            }
        }
        match &plan.lookup {
            LookupProbe::Entry(placed) => {
                for p in placed {
                    let c = &with_object(cfg, p.object);
                    self.attach_one("on_lookup", "lookup", bin, &p.function, p.offset, c)?;
                }
            }
            LookupProbe::EntryAndReturn { at: placed, .. } => {
                for p in placed {
                    let (f, c) = (&p.function, &with_object(cfg, p.object));
                    self.attach_one("on_lookup_entry", "lookup", bin, f, 0, c)?;
                    self.attach_one("on_lookup_return", "lookup return", bin, f, 0, c)?;
                }
            }
            LookupProbe::Miss { sites, value, .. } => {
                for site in sites {
                    // On the miss path the cache is wherever the function keeps it there.
                    let (value_kind, value_slot, value_offset, value_bytes) = match site.result {
                        None => (OBJECT_IN_REGISTER, 0, 0, 0),
                        Some((ObjectAt::Memory { slot, offset }, bytes)) => {
                            (OBJECT_IN_MEMORY, slot, offset, u32::from(bytes))
                        }
                        Some((ObjectAt::Register(slot), bytes)) => {
                            (OBJECT_IN_REGISTER, slot, 0, u32::from(bytes))
                        }
                        Some((ObjectAt::Static(_), _)) => {
                            unreachable!("a result is in a register or on the stack")
                        }
                    };
                    let miss = ProbeConfig {
                        miss_value: *value,
                        value_kind,
                        value_slot,
                        value_offset,
                        value_bytes,
                        ..with_object(cfg, Some(site.object))
                    };
                    let f = &site.function;
                    self.attach_one("on_lookup_miss", "lookup miss", bin, f, site.offset, &miss)?;
                }
            }
            LookupProbe::KeyError {
                function,
                inline,
                quiet,
            } => {
                self.attach_one("on_keyerror", "KeyError", bin, &function.function, 0, cfg)?;
                for q in quiet {
                    let at = q.at();
                    self.attach_one(q.program(), "quiet miss", bin, &at.function, at.offset, cfg)?;
                }
                for (f, offsets) in inline {
                    for &offset in offsets {
                        self.attach_one("on_keyerror_inline", "KeyError", bin, f, offset, cfg)?;
                    }
                }
            }
        }
        if let Some(g) = &plan.gil {
            let t = &g.take_gil;
            // Each clear's return: a dict's, an OrderedDict's, a list's or a set's window is open
            // there, and the writer holds the GIL.
            for c in &plan.clear {
                self.attach_one("on_clear_return", "clear return", bin, &c.function, 0, cfg)?;
            }
            self.attach_one("on_take_gil", "take_gil", bin, &t.function, t.offset, cfg)?;
        }
        if let Some(sample) = &plan.sample {
            let cookie = self.configure(&ProbeConfig {
                object_slot: sample.object_slot,
                ..at_entry
            })?;
            self.samples.push((bin.clone(), sample.at.clone(), cookie));
            self.sample_always = plan.sample_always;
            // Attached once now, so a site the kernel refuses fails the run before it starts.
            let link = self.attach_site(
                SAMPLE_PROGRAM,
                "lookup sample",
                bin,
                &sample.at.function,
                sample.at.offset,
                cookie,
            )?;
            self.detach_sample(link)?;
        }
        Ok(())
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .ok_or(LoadError::MissingMap(EVENTS_MAP))?;
        RingBuf::try_from(map).map_err(|source| LoadError::Map {
            map: EVENTS_MAP,
            source,
        })
    }

    /// Map `name` of the loaded object, through the type the caller reads it with.
    fn map<'a, T>(&'a self, name: &'static str) -> Result<T, LoadError>
    where
        T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map(name).ok_or(LoadError::MissingMap(name))?;
        T::try_from(map).map_err(|source| LoadError::Map { map: name, source })
    }

    /// Every reader the kernel counted, by (cache, thread).
    pub fn readers(&self) -> Result<Vec<(ReaderKey, ReaderState)>, LoadError> {
        let readers: HashMap<_, ReaderKey, ReaderState> = self.map(READERS_MAP)?;
        // A key evicted between its listing and its read yields an error for that key alone:
        // that reader is skipped.
        Ok(readers.iter().filter_map(Result::ok).collect())
    }

    /// The provocation counters, summed over CPUs.
    pub fn provoke(&self) -> Result<ProvokeState, LoadError> {
        let array: PerCpuArray<_, ProvokeState> = self.map(PROVOKE_MAP)?;
        Ok(array
            .get(&0, 0)
            .map_err(|source| LoadError::Map {
                map: PROVOKE_MAP,
                source,
            })?
            .iter()
            .fold(ProvokeState::default(), |sum, cpu| ProvokeState {
                held_ns: sum.held_ns + cpu.held_ns,
                windows: sum.windows + cpu.windows,
                refused: sum.refused + cpu.refused,
                switch_interval_us: sum.switch_interval_us.max(cpu.switch_interval_us),
                unanswered: sum.unanswered + cpu.unanswered,
                beyond_reach: sum.beyond_reach + cpu.beyond_reach,
            }))
    }

    /// How many processes the kernel watches now.
    pub fn watched(&self) -> Result<usize, LoadError> {
        let watched: HashMap<_, u32, u8> = self.map(WATCHED_MAP)?;
        Ok(watched.keys().filter(Result::is_ok).count())
    }

    /// Each [`Stat`] summed over CPUs.
    pub fn stats(&self) -> Result<Vec<u64>, LoadError> {
        let stats: PerCpuArray<_, u64> = self.map(STATS_MAP)?;
        (0..Stat::COUNT)
            .map(|i| {
                stats
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .map_err(|source| LoadError::Map {
                        map: STATS_MAP,
                        source,
                    })
            })
            .collect()
    }
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel's `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `base` (the object in an argument register at an entry), with the object where `object` says.
fn with_object(base: &ProbeConfig, object: Option<ObjectAt>) -> ProbeConfig {
    let (object_kind, object_slot, object_offset) = match object {
        None => return *base,
        Some(ObjectAt::Register(slot)) => (OBJECT_IN_REGISTER, slot, 0),
        Some(ObjectAt::Memory { slot, offset }) => (OBJECT_IN_MEMORY, slot, offset),
        Some(ObjectAt::Static(address)) => (OBJECT_STATIC, 0, address as i64),
    };
    ProbeConfig {
        object_kind,
        object_slot,
        object_offset,
        ..*base
    }
}
