//! Loads racewatch's eBPF object with its load-time filters and attaches the probes.
use std::{num::NonZeroU32, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        UProbe,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use detector_common::{
    DictSite, EVENTS_MAP, KEYERROR_SITES_MAP, PROVOKE_MAP, ProvokeState, PyLayout, READERS_MAP,
    ReaderKey, ReaderState, STATS_MAP, StackMode, Stat, globals,
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
    #[error("cannot use the kernel map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

pub struct Options {
    /// The traced process (0: any).
    pub tgid: u32,
    pub cache_arg: u32,
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
    /// Native `--provoke`: the refill's entry probe holds the writer.
    hold_at_refill: bool,
    /// The sampling probe's site and process, once attached; and its link while a burst runs.
    sample: Option<(PathBuf, Placed, u32)>,
    sample_link: Option<UProbeLinkId>,
    sample_always: bool,
}

pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detector"));

impl Loaded {
    pub fn load(opts: &Options, plan: &Plan) -> Result<Loaded, LoadError> {
        let wakeup_bytes = u64::from(opts.ring_bytes / 2);
        let (miss_slot, miss_value) = plan.miss_globals();
        let drop_delta = plan.gil.as_ref().map_or(0i64, |g| g.drop_request_delta);
        // The provocation budget accrues from now, on the clock bpf_ktime_get_ns reads.
        let start_ns = monotonic_ns();
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| LoadError::Cpus(e))?
            .try_into()
            .unwrap_or(u32::MAX);
        let ebpf = EbpfLoader::new()
            .override_global(globals::TARGET_TGID, &opts.tgid, true)
            .override_global(globals::CACHE_ARG, &opts.cache_arg, true)
            .override_global(globals::MISS_CACHE_SLOT, &miss_slot, true)
            .override_global(globals::MISS_VALUE, &miss_value, true)
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
            hold_at_refill: opts.provoke_ns != 0 && plan.gil.is_none(),
            sample: None,
            sample_link: None,
            sample_always: false,
        })
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

    fn attach_one(
        &mut self,
        program: &'static str,
        role: &'static str,
        plan_binary: &PathBuf,
        function: &Function,
        offset: u64,
        pid: u32,
    ) -> Result<(), LoadError> {
        self.attach_site(program, role, plan_binary, function, offset, pid)?;
        self.probes += 1;
        Ok(())
    }

    fn attach_site(
        &mut self,
        program: &'static str,
        role: &'static str,
        plan_binary: &PathBuf,
        function: &Function,
        offset: u64,
        pid: u32,
    ) -> Result<UProbeLinkId, LoadError> {
        let prog = self.program(program)?;
        let scope = NonZeroU32::new(pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
        let link = prog
            .attach(function.file_offset + offset, plan_binary, scope)
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
        let Some((bin, placed, pid)) = self.sample.clone() else {
            return Ok(());
        };
        if self.sample_link.is_none() {
            let link = self.attach_site(
                "on_lookup_sample",
                "lookup sample",
                &bin,
                &placed.function,
                placed.offset,
                pid,
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
    pub fn attach(&mut self, plan: &Plan, pid: u32) -> Result<(), LoadError> {
        let bin = &plan.binary;
        let clear = &plan.clear;
        self.attach_one("on_clear", "clear", bin, &clear.function, clear.offset, pid)?;
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
                    self.attach_one(entry, "refill", bin, f, 0, pid)?;
                    self.attach_one("on_refill_return", "refill return", bin, f, 0, pid)?;
                }
                RefillProbe::Exits { entry: at, exits } => {
                    let f = &at.function;
                    self.attach_one(entry, "refill", bin, f, at.offset, pid)?;
                    for &exit in exits {
                        self.attach_one("on_refill_exit", "refill exit", bin, f, exit, pid)?;
                    }
                }
            }
        }
        match &plan.lookup {
            LookupProbe::Entry(p) => {
                self.attach_one("on_lookup", "lookup", bin, &p.function, p.offset, pid)?;
            }
            LookupProbe::EntryAndReturn(Placed { function: f, .. }) => {
                self.attach_one("on_lookup_entry", "lookup", bin, f, 0, pid)?;
                self.attach_one("on_lookup_return", "lookup return", bin, f, 0, pid)?;
            }
            LookupProbe::Miss {
                function, offsets, ..
            } => {
                for &offset in offsets {
                    self.attach_one("on_lookup_miss", "lookup miss", bin, function, offset, pid)?;
                }
            }
            LookupProbe::KeyError { function, sites } => {
                let mut map: HashMap<_, u64, DictSite> = self
                    .ebpf
                    .map_mut(KEYERROR_SITES_MAP)
                    .ok_or(LoadError::MissingMap(KEYERROR_SITES_MAP))?
                    .try_into()
                    .map_err(|source| LoadError::Map {
                        map: KEYERROR_SITES_MAP,
                        source,
                    })?;
                for (delta, loc) in sites {
                    map.insert(delta, loc, 0).map_err(|source| LoadError::Map {
                        map: KEYERROR_SITES_MAP,
                        source,
                    })?;
                }
                self.attach_one("on_keyerror", "KeyError", bin, &function.function, 0, pid)?;
            }
        }
        if let Some(g) = &plan.gil {
            let t = &g.take_gil;
            self.attach_one("on_clear_return", "clear return", bin, &g.clear, 0, pid)?;
            self.attach_one("on_take_gil", "take_gil", bin, &t.function, t.offset, pid)?;
        }
        if let Some(sample) = &plan.sample {
            self.sample = Some((bin.clone(), sample.clone(), pid));
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
