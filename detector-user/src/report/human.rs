//! Human lines: one per race (with both stacks for a pair's first), hazards, the summary.
use std::io::{self, Write};

use detector_common::PROVOKE_MAX_NS;

use crate::{
    engine::{
        correlate::Alert,
        cost::SelfCost,
        hazard::Hazard,
        stack::Frame,
        summary::{PairJson, ProvokeJson, Summary},
    },
    process::container::Identity,
    report::Sink,
    text::{escape, fmt_ns, fmt_span},
};

/// `pid 4242`, followed where the process is in a container of its own by its pid there and
/// the container: `pid 4242 (pid 7 in container 3f2a9c1be07d)`.
pub fn pid_text(pid: u32, who: &Identity) -> String {
    match (who.ns_pid, who.short_container()) {
        (Some(ns), Some(c)) => format!("pid {pid} (pid {ns} in container {c})"),
        (Some(ns), None) => format!("pid {pid} (pid {ns} in its pid namespace)"),
        (None, Some(c)) => format!("pid {pid} (in container {c})"),
        (None, None) => format!("pid {pid}"),
    }
}

fn self_cost_line(cost: &SelfCost) -> String {
    let budget = format!("budget {}%", (cost.budget_share * 1e4).round() / 1e2);
    let share = match (cost.added_share, cost.target_cpu_ns) {
        (Some(share), Some(cpu)) => {
            format!(
                " ({:.2}% of its {} of CPU time; {budget})",
                share * 100.0,
                fmt_ns(cpu)
            )
        }
        _ => format!(" ({budget})"),
    };
    let sampling = match cost.sampling_ns {
        0 => String::new(),
        ns => format!(", {} of it sampling lookups", fmt_ns(ns)),
    };
    let c = &cost.per_hit_ns;
    let mut line = format!(
        "racewatch: its probes added ~{} to the target{share}{sampling}; one hit costs {} \
         (emulated instruction), {} (single-stepped), {} more with the return probed",
        fmt_ns(cost.added_ns),
        fmt_ns(c.emulated_ns as u64),
        fmt_ns(c.single_stepped_ns as u64),
        fmt_ns(c.return_ns as u64),
    );
    if cost.required_over_budget {
        line.push_str(&format!(
            "\nracewatch: warning: its window and miss probes alone added more than the {budget}: \
             they always run, so lookups were sampled only while the budget allowed"
        ));
    }
    line
}

/// `function file:line`, control characters escaped.
fn frame_text(f: &Frame) -> String {
    let at = match (&f.file, f.line) {
        (Some(file), Some(line)) => format!(" {}:{line}", escape(file)),
        (Some(file), None) => format!(" {}", escape(file)),
        _ => String::new(),
    };
    format!("{}{at}", escape(&f.function))
}

/// A stack the way sanitizers print one: `#N function file:line`, innermost first.
fn write_stack(out: &mut impl Write, stack: Option<&[Frame]>) -> io::Result<()> {
    match stack {
        Some([]) => writeln!(out, "    (no frame could be unwound)"),
        Some(frames) => {
            for (i, f) in frames.iter().enumerate() {
                writeln!(out, "    #{i} {}", frame_text(f))?;
            }
            Ok(())
        }
        None => writeln!(out, "    (stack not captured)"),
    }
}

/// The innermost frame of a stack, for the summary's one line per pair.
fn top(stack: Option<&[Frame]>) -> String {
    stack
        .and_then(|s| s.first())
        .map(frame_text)
        .unwrap_or_else(|| "?".into())
}

/// A stack pair's counts and both sides' innermost frames, on one line.
/// How a quiet miss looked up; a KeyError's line is the `d[k]` one.
fn form_phrase(form: Option<&str>) -> &'static str {
    match form {
        Some("get") => " with d.get",
        Some("contains") => " with `in`",
        Some("index") => " with lst[i]",
        Some("pop") => " with d.pop",
        Some("setdefault") => " with d.setdefault",
        _ => "",
    }
}

fn pair_text(number: usize, p: &PairJson) -> String {
    format!(
        "pair #{number}: {} lookups in a window, {} missed{}: reader {} at {}; writer {} at {}",
        p.lookups,
        p.misses,
        form_phrase(p.form),
        escape(&p.reader_name),
        top(p.reader_stack.as_deref()),
        p.writer_name
            .as_deref()
            .map(escape)
            .unwrap_or_else(|| "?".into()),
        top(p.writer_stack.as_deref()),
    )
}

/// What the CPython switch interval did to `--provoke`: a writer can hand the GIL over only once
/// a reader asks for it, which a reader does only after waiting a whole interval.
fn switch_interval_lines(p: &ProvokeJson) -> Vec<String> {
    let Some(us) = p.switch_interval_us else {
        return Vec::new();
    };
    let interval = fmt_ns(us.saturating_mul(1_000));
    let mut lines = Vec::new();
    if p.beyond_reach > 0 {
        lines.push(format!(
            "--provoke left {} windows alone: the interpreter's switch interval is {interval}, and a \
             thread waiting for the GIL asks for it only after waiting that long, longer than the {} \
             a hold may last; a shorter interval in the target (sys.setswitchinterval(0.005)) would \
             let --provoke hand the GIL over",
            p.beyond_reach,
            fmt_ns(PROVOKE_MAX_NS)
        ));
    }
    if let Some(wait) = p.request_wait_ns.filter(|&w| w > p.hold_ns) {
        lines.push(format!(
            "the interpreter's switch interval is {interval}: a thread waiting for the GIL asks for \
             it only after waiting that long, so each provoked writer waited up to {} for a reader \
             to ask before its {} hold",
            fmt_ns(wait),
            fmt_ns(p.hold_ns)
        ));
    }
    if p.unanswered > 0 {
        lines.push(format!(
            "in {} of the provoked windows no reader asked for the GIL within {}, so none ran \
             in them",
            p.unanswered,
            fmt_ns(p.request_wait_ns.unwrap_or(p.hold_ns))
        ));
    }
    lines
}

pub struct HumanSink<W: Write> {
    out: W,
}

impl<W: Write> HumanSink<W> {
    pub fn new(out: W) -> Self {
        HumanSink { out }
    }
}

impl<W: Write> Sink for HumanSink<W> {
    fn alert(&mut self, a: &Alert, pair: usize, who: &Identity, window: &str) -> io::Result<()> {
        let writer = a
            .writer_name
            .as_deref()
            .map(escape)
            .unwrap_or_else(|| "?".into());
        let outcome = match a.miss {
            Some(true) => "MISSED",
            Some(false) => "found",
            None => "result not probed",
        };
        let key = a
            .key
            .as_deref()
            .map(|k| format!(" key {}", escape(k)))
            .unwrap_or_default();
        let form = form_phrase(a.form);
        writeln!(
            self.out,
            "RACE cache {:#x} in {}: reader {} ({}) looked up{}{} while writer {} ({}) had emptied it {} earlier: {} (window {})",
            a.cache,
            pid_text(a.pid, who),
            a.reader_tid,
            escape(&a.reader_name),
            key,
            form,
            a.writer_tid,
            writer,
            fmt_ns(a.open_for_ns()),
            outcome,
            escape(window),
        )?;
        if a.reader_stack.is_some() || a.writer_stack.is_some() {
            writeln!(
                self.out,
                "  reader {} ({}) looked up the cache here:",
                a.reader_tid,
                escape(&a.reader_name)
            )?;
            write_stack(&mut self.out, a.reader_stack.as_deref())?;
            writeln!(
                self.out,
                "  writer {} ({writer}) had emptied it here:",
                a.writer_tid
            )?;
            write_stack(&mut self.out, a.writer_stack.as_deref())?;
            writeln!(
                self.out,
                "  (stack pair #{pair}: its further races are counted in the summary)"
            )?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn hazard(&mut self, h: &Hazard, who: &Identity, window: &str) -> io::Result<()> {
        let sampled = (h.sampled_fraction < 1.0).then(|| {
            format!(
                "lookups sampled {:.1}% of the time",
                h.sampled_fraction * 100.0
            )
        });
        // With no reader counted there is no forecast, not a forecast of none.
        let forecast = if h.readers.is_empty() {
            let sampled = sampled.map_or_else(String::new, |s| format!(" ({s})"));
            format!("no forecast{sampled}")
        } else if h.expected_collisions_per_hour == 0.0
            && let (_, high) = h.interval_per_hour
            && high.is_finite()
            && high > 0.0
        {
            // No window let a reader in yet (the GIL stayed with the writer): a bound, not
            // "none".
            let sampled = sampled.map_or_else(String::new, |s| format!("; {s}"));
            format!("no reader could get in yet: at most {high:.1} collisions/hour (95%{sampled})")
        } else {
            let (low, high) = h.interval_per_hour;
            let high = if high.is_finite() {
                format!("{high:.1}")
            } else {
                "?".to_string()
            };
            let notes = [Some(format!("95%: {low:.1}-{high}")), sampled]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ");
            let confirm = h.confirm_s.map_or_else(String::new, |s| {
                format!("; a run of {} would see one, 95% likely", fmt_span(s))
            });
            format!(
                "expect {:.1} collisions/hour ({notes}){confirm}",
                h.expected_collisions_per_hour
            )
        };
        // Under the GIL, only windows in which it went to another thread let a reader in.
        let gil = h.gil.map_or_else(String::new, |g| {
            format!(
                ", the GIL went to another thread in {} of {} windows",
                g.handed_over, g.windows
            )
        });
        // A lock-guarded cache: readers get in only while its lock is free.
        let lock = h.lock.map_or_else(String::new, |l| {
            format!(
                ", its lock free {} a window between the clear and the refill ({} windows)",
                fmt_ns(l.released_ns.round() as u64),
                l.windows
            )
        });
        writeln!(
            self.out,
            "HAZARD cache {:#x} in {}: {} windows ({:.1}/s), width p50 {} p99 {} max {}, empty {:.4}% of \
             the time{gil}{lock}; {forecast} (window {})",
            h.cache,
            pid_text(h.pid, who),
            h.windows,
            h.windows_per_s,
            fmt_ns(h.window_p50_ns),
            fmt_ns(h.window_p99_ns),
            fmt_ns(h.window_max_ns),
            h.time_in_window * 100.0,
            escape(window),
        )?;
        if h.readers.is_empty() {
            writeln!(self.out, "  no reader's lookups were counted")?;
        }
        let far = |d: Option<u64>| d.map_or_else(|| "never seen".to_string(), fmt_ns);
        for r in &h.readers {
            writeln!(
                self.out,
                "  reader {} ({}): {:.0} lookups/s, closest {} before a window and {} after one",
                r.tid,
                escape(&r.comm),
                r.lookups_per_s,
                far(r.closest_before_ns),
                far(r.closest_after_ns),
            )?;
        }
        self.out.flush()
    }

    fn pair(&mut self, number: usize, pair: &PairJson, new: u64) -> io::Result<()> {
        let held = if pair.printed {
            ""
        } else {
            " (its first alert was held back by the alert rate limit)"
        };
        writeln!(
            self.out,
            "PAIR {new} more since the last report, {}{held}",
            pair_text(number, pair)
        )?;
        self.out.flush()
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        // Before the summary line, which stays the last.
        if let Some(cost) = &s.self_cost {
            writeln!(self.out, "{}", self_cost_line(cost))?;
        }
        let c = &s.counts;
        // Only Python runs judge keys; a watch run has nothing to say here.
        let absent = match c.absent_keys_in_window {
            0 => String::new(),
            n => format!(" ({n} more misses in a window were for keys absent after it too)"),
        };
        let windows = match c.windows {
            0 => "no cache was emptied (0 windows)".to_string(),
            n => format!(
                "{n} windows in {} caches (widest {})",
                c.caches,
                fmt_ns(c.max_window_ns)
            ),
        };
        writeln!(
            self.out,
            "racewatch: {windows}, {} lookups in a window, {} of them missed{absent}; {} events lost; \
             {:.1} s, {}",
            c.lookups_in_window, c.misses_in_window, s.lost_events, s.duration_s, s.ended
        )?;
        if let Some(forms) = &s.misses_by_form {
            let counted: Vec<String> = forms.iter().map(|(f, n)| format!("{f} {n}")).collect();
            let quiet = if forms.contains_key("get") {
                ""
            } else {
                " (d.get, d.pop, d.setdefault, `in` and lst[i] are not watched: --quiet-misses \
                 counts them too)"
            };
            writeln!(
                self.out,
                "racewatch: misses by form: {}{quiet}",
                counted.join(", ")
            )?;
        }
        let p = &s.provoke;
        if p.windows > 0 || p.over_budget > 0 {
            writeln!(
                self.out,
                "racewatch: provoked {} windows, adding {} in all ({} more left alone: budget spent)",
                p.windows,
                fmt_ns(p.added_ns),
                p.over_budget
            )?;
        }
        for line in switch_interval_lines(p) {
            writeln!(self.out, "racewatch: {line}")?;
        }
        if s.lost_events > 0 {
            let l = &s.lost_by_kind;
            writeln!(
                self.out,
                "racewatch: warning: the ring buffer overflowed and {} events were lost (window \
                 opens {}, closes {}, lookups {} of {} in a window, KeyErrors {}, key verdicts {}, near \
                 misses {}, native stacks {}, Python frames {}): the counts above are lower bounds",
                s.lost_events,
                l.window_open,
                l.window_close,
                l.lookup,
                s.kernel_lookups_in_window,
                l.keyerror,
                l.key_verdict,
                l.near,
                l.native_stack,
                l.py_frames
            )?;
        }
        // One line per process when the run saw windows in more than the target.
        if s.processes.len() > 1 || s.processes.iter().any(|p| p.parent.is_some()) {
            for p in &s.processes {
                let who = Identity {
                    ns_pid: p.ns_pid,
                    container: p.container.clone(),
                };
                let parent = p
                    .parent
                    .map(|pp| format!(", forked from {pp}"))
                    .unwrap_or_default();
                writeln!(
                    self.out,
                    "racewatch: {} ({}{parent}): {} windows, {} lookups in a window, {} of them missed",
                    pid_text(p.pid, &who),
                    escape(&p.comm),
                    p.windows,
                    p.lookups_in_window,
                    p.misses_in_window
                )?;
            }
        }
        // One line per window when the run had several.
        if s.windows_by_name.len() > 1 {
            for (name, w) in &s.windows_by_name {
                writeln!(
                    self.out,
                    "racewatch: window {}: {} windows ({} with a miss), {} lookups in a window, {} \
                     of them missed",
                    escape(name),
                    w.windows,
                    w.windows_with_misses,
                    w.lookups_in_window,
                    w.misses_in_window
                )?;
            }
        }
        for what in &s.unwatched {
            writeln!(
                self.out,
                "racewatch: warning: not watched: {}: no race found is not an all-clear for it",
                escape(what)
            )?;
        }
        for (i, p) in s.pairs.iter().enumerate() {
            writeln!(self.out, "racewatch: {}", pair_text(i + 1, p))?;
        }
        if s.alerts_held_back > 0 || s.unkept_pair_lookups > 0 {
            writeln!(
                self.out,
                "racewatch: warning: {} stack pairs' first alerts were held back by the alert rate \
                 limit (their counts are above), and {} lookups in a window belonged to pairs \
                 beyond the ones racewatch keeps (they are in the totals only)",
                s.alerts_held_back, s.unkept_pair_lookups
            )?;
        }
        if s.writer_stacks_unread > 0 {
            writeln!(
                self.out,
                "racewatch: {} windows' writer stacks could not be copied: the writer had left the \
                 window by the time a reader in it copied the stack (their alerts show none)",
                s.writer_stacks_unread
            )?;
        }
        if s.stacks_shed > 0 {
            writeln!(
                self.out,
                "racewatch: {} stacks were not taken while the event ring was over half full \
                 (the counts are whole; those alerts show no frames)",
                s.stacks_shed
            )?;
        }
        if s.map_full > 0 || s.decode_errors > 0 {
            writeln!(
                self.out,
                "racewatch: warning: {} window states did not fit in the kernel's maps, {} events could not be decoded",
                s.map_full, s.decode_errors
            )?;
        }
        self.out.flush()
    }
}
