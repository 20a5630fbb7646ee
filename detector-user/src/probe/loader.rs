//! Loads racewatch's eBPF object and attaches the probes, each with its configuration (its
//! attach cookie indexes `PROBES`), and keeps the set of watched processes.
use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        RawTracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use detector_common::{
    ARG_SLOTS, DictSite, EVENTS_MAP, KEYERROR_SITES_MAP, MAX_PROBES, PROBES_MAP, PROVOKE_MAP,
    ProbeConfig, ProvokeState, PyLayout, READERS_MAP, ReaderKey, ReaderState, STATS_MAP, StackMode,
    Stat, WATCHED_MAP, globals,
};

use crate::probe::{
    plan::{LookupProbe, Placed, Plan, RefillProbe},
    symbols::Function,
};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the kernel refused racewatch's eBPF programs: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("cannot load the `{program}` probe program: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach the {role} probe to {function} in {binary}: {source}")]
    Attach {
        role: &'static str,
        function: String,
        binary: PathBuf,
        source: aya::programs::ProgramError,
    },
    #[error("cannot count this machine's CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    #[error("racewatch's eBPF object lacks map {0} (a build mismatch: rebuild racewatch)")]
    MissingMap(&'static str),
    #[error("racewatch attaches at most {0} probes in one run")]
    TooManyProbes(u32),
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
    /// Used with [`StackMode::Python`].
    pub py_layout: PyLayout,
}

/// The loaded object; dropping it detaches every probe and frees every map.
pub struct Loaded {
    ebpf: Ebpf,
    pub probes: usize,
    /// Attach cookies handed out so far: each indexes its configuration in `PROBES`.
    configs: u32,
    /// Native `--provoke`: the refill's entry probe holds the writer.
    hold_at_refill: bool,
    /// The sampling probe's site and its cookie, once attached; and its link while a burst runs.
    sample: Option<(PathBuf, Placed, u64)>,
    sample_link: Option<UProbeLinkId>,
    sample_always: bool,
}

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
        let drop_delta = plan.gil.as_ref().map_or(0i64, |g| g.drop_request_delta);
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
            .override_global(globals::DROP_REQUEST_DELTA, &drop_delta, true)
            .override_global(globals::STACK_MODE, &(opts.stack_mode as u32), true)
            .override_global(globals::PY_LAYOUT, &opts.py_layout, true)
            .map_max_entries(EVENTS_MAP, opts.ring_bytes)
            .load(OBJECT)
            .map_err(LoadError::Load)?;
        Ok(Loaded {
            ebpf,
            probes: 0,
            configs: 0,
            hold_at_refill: opts.provoke_ns != 0 && plan.gil.is_none(),
            sample: None,
            sample_link: None,
            sample_always: false,
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
            prog.load()
                .map_err(|source| LoadError::Program { program, source })?;
            prog.attach(tracepoint)
                .map_err(|source| LoadError::Program { program, source })?;
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
            prog.load()
                .map_err(|source| LoadError::Program { program, source })?;
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
        let cookie = self.configure(config)?;
        self.attach_site(program, role, plan_binary, function, offset, cookie)?;
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
                source,
            })?;
        Ok(link)
    }

    /// Whether lookups are counted in bursts rather than all of them.
    pub fn samples(&self) -> bool {
        self.sample.is_some()
    }

    /// Whether the counting probe stays attached for the whole run.
    pub fn samples_always(&self) -> bool {
        self.sample_always
    }

    /// Starts a sampling burst: attaches the lookup-counting probe. No-op without one, or while
    /// a burst runs.
    pub fn start_sample(&mut self) -> Result<(), LoadError> {
        let Some((bin, placed, cookie)) = self.sample.clone() else {
            return Ok(());
        };
        if self.sample_link.is_none() {
            let link = self.attach_site(
                "on_lookup_sample",
                "lookup sample",
                &bin,
                &placed.function,
                placed.offset,
                cookie,
            )?;
            self.sample_link = Some(link);
        }
        Ok(())
    }

    /// Ends a sampling burst: detaches the lookup-counting probe.
    pub fn stop_sample(&mut self) -> Result<(), LoadError> {
        let Some(link) = self.sample_link.take() else {
            return Ok(());
        };
        self.program("on_lookup_sample")?
            .detach(link)
            .map_err(|source| LoadError::Program {
                program: "on_lookup_sample",
                source,
            })
    }

    /// Attaches every probe of `plan` to process `pid` (0: every process that maps the binary).
    /// Attaches every probe of `plan`, each with its configuration.
    pub fn attach(&mut self, plan: &Plan) -> Result<(), LoadError> {
        let bin = &plan.binary;
        // Where the object is at an entry: the argument the plan names.
        let at_entry = ProbeConfig {
            object_slot: ARG_SLOTS
                .get(plan.object_arg as usize)
                .copied()
                .unwrap_or(ARG_SLOTS[0]),
            window: plan.window,
            miss_value: 0,
        };
        let cfg = &at_entry;
        let clear = &plan.clear;
        self.attach_one("on_clear", "clear", bin, &clear.function, clear.offset, cfg)?;
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
                    self.attach_one(entry, "refill", bin, f, 0, cfg)?;
                    self.attach_one("on_refill_return", "refill return", bin, f, 0, cfg)?;
                }
                RefillProbe::Exits { entry: at, exits } => {
                    let f = &at.function;
                    self.attach_one(entry, "refill", bin, f, at.offset, cfg)?;
                    for &exit in exits {
                        self.attach_one("on_refill_exit", "refill exit", bin, f, exit, cfg)?;
                    }
                }
            }
        }
        match &plan.lookup {
            LookupProbe::Entry(p) => {
                self.attach_one("on_lookup", "lookup", bin, &p.function, p.offset, cfg)?;
            }
            LookupProbe::EntryAndReturn(Placed { function: f, .. }) => {
                self.attach_one("on_lookup_entry", "lookup", bin, f, 0, cfg)?;
                self.attach_one("on_lookup_return", "lookup return", bin, f, 0, cfg)?;
            }
            LookupProbe::Miss {
                function,
                offsets,
                cache_slot,
                value,
                ..
            } => {
                // On the miss path the cache is wherever the function keeps it there.
                let miss = ProbeConfig {
                    object_slot: *cache_slot,
                    miss_value: *value,
                    ..at_entry
                };
                for &offset in offsets {
                    self.attach_one(
                        "on_lookup_miss",
                        "lookup miss",
                        bin,
                        function,
                        offset,
                        &miss,
                    )?;
                }
            }
            LookupProbe::KeyError { function, sites } => {
                let mut map: HashMap<_, u64, DictSite> =
                    map_mut(&mut self.ebpf, KEYERROR_SITES_MAP)?;
                for (delta, loc) in sites {
                    map.insert(delta, loc, 0).map_err(|source| LoadError::Map {
                        map: KEYERROR_SITES_MAP,
                        source,
                    })?;
                }
                self.attach_one("on_keyerror", "KeyError", bin, &function.function, 0, cfg)?;
            }
        }
        if let Some(g) = &plan.gil {
            let t = &g.take_gil;
            self.attach_one("on_clear_return", "clear return", bin, &g.clear, 0, cfg)?;
            self.attach_one("on_take_gil", "take_gil", bin, &t.function, t.offset, cfg)?;
        }
        if let Some(sample) = &plan.sample {
            let cookie = self.configure(cfg)?;
            self.sample = Some((bin.clone(), sample.clone(), cookie));
            self.sample_always = plan.sample_always;
            // Attached once now, so a site the kernel refuses fails the run before it starts.
            self.start_sample()?;
            self.stop_sample()?;
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
