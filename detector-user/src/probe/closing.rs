//! Where a refill's window closes without a probe at the refill's entry: at the refill's last
//! call on each path to its return (for a lock-guarded cache, the unlock; a tail call counts),
//! where it has refilled and still holds the cache in a register or a stack slot. A probe there
//! reads the cache itself, so the refill needs no entry probe, whose trap would fall inside the
//! window and widen it: more misses than the program has unobserved, and on a contended lock a
//! convoy behind each of them.
use iced_x86::{FlowControl, Instruction, Register};

use crate::probe::{
    code::{Decoded, Site, is_emulated},
    miss_path::{object_before_each, predecessors, successors},
    plan::ObjectAt,
};

/// A call that comes back.
fn is_call(d: &Decoded, i: usize) -> bool {
    matches!(
        d.instrs[i].flow_control(),
        FlowControl::Call | FlowControl::IndirectCall
    ) && !successors(d, i).inside.is_empty()
}

fn at(d: &Decoded, ins: &Instruction) -> String {
    format!("+{:#x}", ins.ip() - d.start)
}

/// The refill's close sites: on every path from its entry to a `ret`, the last call, and each
/// tail call; after none of them does the function call anything else. `exits` are the
/// function's (`Decoded::exits`): its `ret`s and tail calls. The object arrives in `arg`, or is
/// `fixed` (a copy made for one global). `Err` says why the refill's entry must be probed instead.
pub fn close_sites(
    d: &Decoded,
    exits: &[usize],
    arg: Option<Register>,
    fixed: Option<ObjectAt>,
) -> Result<Vec<(Site, ObjectAt)>, String> {
    let is_tail_call =
        |i: usize| exits.contains(&i) && d.instrs[i].flow_control() != FlowControl::Return;
    let preds = predecessors(d);
    // Code no branch reaches (a C++ landing pad, entered by the unwinder) does not refill.
    let mut reached = vec![false; d.instrs.len()];
    let mut work = vec![0];
    while let Some(n) = work.pop() {
        if !std::mem::replace(&mut reached[n], true) {
            work.extend(successors(d, n).inside);
        }
    }
    let mut sites: Vec<usize> = Vec::new();
    let mut seen = vec![false; d.instrs.len()];
    for (i, ins) in d.instrs.iter().enumerate() {
        if !reached[i] {
            continue;
        }
        if is_tail_call(i) {
            sites.push(i);
        } else if ins.flow_control() == FlowControl::Return {
            // Back from the return to the last call of each path there.
            let mut work = vec![i];
            while let Some(n) = work.pop() {
                if std::mem::replace(&mut seen[n], true) {
                    continue;
                }
                if n == 0 {
                    return Err(format!(
                        "a path from its entry returns at {} without a call",
                        at(d, ins)
                    ));
                }
                for &p in preds[n].iter().filter(|p| reached[**p]) {
                    if is_call(d, p) {
                        sites.push(p);
                    } else {
                        work.push(p);
                    }
                }
            }
        }
    }
    sites.sort_unstable();
    sites.dedup();
    if sites.is_empty() {
        return Err("it never returns".into());
    }
    // A site must be the last call of every path through it: nothing is refilled after it.
    for &s in sites.iter().filter(|s| is_call(d, **s)) {
        let mut work = successors(d, s).inside;
        let mut visited = vec![false; d.instrs.len()];
        while let Some(n) = work.pop() {
            if std::mem::replace(&mut visited[n], true) {
                continue;
            }
            if is_call(d, n) || is_tail_call(n) {
                return Err(format!(
                    "it calls at {} after its call at {}",
                    at(d, &d.instrs[n]),
                    at(d, &d.instrs[s])
                ));
            }
            work.extend(successors(d, n).inside);
        }
    }
    let objects = arg.map(|r| object_before_each(d, r));
    sites
        .into_iter()
        .map(|s| {
            let ins = &d.instrs[s];
            if !is_emulated(ins) {
                return Err(format!(
                    "its last call at {} is one the kernel single-steps",
                    at(d, ins)
                ));
            }
            let object = fixed
                .or_else(|| objects.as_ref().and_then(|o| o[s]))
                .ok_or_else(|| {
                    format!(
                        "the cache is in no register or stack slot at its last call at {}",
                        at(d, ins)
                    )
                })?;
            Ok((d.site(ins), object))
        })
        .collect()
}

/// The clear's releases of the cache's lock: its close sites (see [`close_sites`]), each a call
/// `is_unlock` names as releasing a lock. `Err` says why the clear is not seen to end with one.
pub fn unlock_sites(
    d: &Decoded,
    exits: &[usize],
    arg: Option<Register>,
    fixed: Option<ObjectAt>,
    is_unlock: &dyn Fn(&Instruction) -> bool,
) -> Result<Vec<(Site, ObjectAt)>, String> {
    let sites = close_sites(d, exits, arg, fixed)?;
    for (s, _) in &sites {
        let Some(i) = d.index_of(d.start + s.offset) else {
            return Err(format!("no instruction at +{:#x}", s.offset));
        };
        if !is_unlock(&d.instrs[i]) {
            return Err(format!(
                "its last call at {} releases no lock racewatch knows",
                at(d, &d.instrs[i])
            ));
        }
    }
    Ok(sites)
}

/// Where the refill first holds the cache's lock: on every path from its entry, the first call
/// must be one `is_lock` names as taking a lock; after each, the first instruction the kernel
/// emulates on the straight line that follows its return, before any other path joins it, with
/// where the cache is there. A trap there falls inside the critical section, not in the span
/// readers can get in. `Err` says why the refill is not seen to begin with a lock.
pub fn locked_sites(
    d: &Decoded,
    arg: Option<Register>,
    fixed: Option<ObjectAt>,
    is_lock: &dyn Fn(&Instruction) -> bool,
) -> Result<Vec<(Site, ObjectAt)>, String> {
    let mut firsts = Vec::new();
    let mut seen = vec![false; d.instrs.len()];
    let mut work = vec![0];
    while let Some(i) = work.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        let ins = &d.instrs[i];
        if matches!(
            ins.flow_control(),
            FlowControl::Call | FlowControl::IndirectCall
        ) {
            firsts.push(i);
            continue;
        }
        let next = successors(d, i);
        if next.leaves || ins.flow_control() == FlowControl::Return {
            return Err(format!(
                "a path from its entry leaves at {} before any call",
                at(d, ins)
            ));
        }
        work.extend(next.inside);
    }
    if firsts.is_empty() {
        return Err("it calls nothing".into());
    }
    firsts.sort_unstable();
    let preds = predecessors(d);
    let objects = arg.map(|r| object_before_each(d, r));
    firsts
        .into_iter()
        .map(|f| {
            if !is_lock(&d.instrs[f]) {
                return Err(format!(
                    "its first call at {} takes no lock racewatch knows",
                    at(d, &d.instrs[f])
                ));
            }
            let mut j = f + 1;
            let site = loop {
                let Some(ins) = d.instrs.get(j) else {
                    return Err(format!(
                        "its lock at {} does not return",
                        at(d, &d.instrs[f])
                    ));
                };
                if preds[j].len() != 1 {
                    return Err(format!(
                        "another path joins at {} before an instruction the kernel emulates",
                        at(d, ins)
                    ));
                }
                if is_emulated(ins) {
                    break j;
                }
                if ins.flow_control() != FlowControl::Next {
                    return Err(format!("it branches at {} after its lock", at(d, ins)));
                }
                j += 1;
            };
            let ins = &d.instrs[site];
            let object = fixed
                .or_else(|| objects.as_ref().and_then(|o| o[site]))
                .ok_or_else(|| {
                    format!(
                        "the cache is in no register or stack slot after its lock, at {}",
                        at(d, ins)
                    )
                })?;
            Ok((d.site(ins), object))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::code::{fixtures::START, pt_regs_slot};

    fn sites(code: &[u8]) -> Result<Vec<(u64, ObjectAt)>, String> {
        let d = Decoded::decode(code, START).unwrap();
        close_sites(&d, &d.exits(&|_| false)?, Some(Register::RDI), None)
            .map(|v| v.into_iter().map(|(s, o)| (s.offset, o)).collect())
    }

    fn reg(r: Register) -> ObjectAt {
        ObjectAt::Register(pt_regs_slot(r).unwrap())
    }

    #[test]
    fn the_unlock_before_the_epilogue_closes_with_the_cache_in_a_callee_saved_register() {
        // 0: push %rbx; 1: mov %rdi,%rbx; 4: call lock; 9: call fill; e: mov %rbx,%rdi;
        // 11: call unlock; 16: pop %rbx; 17: ret
        let code = [
            0x53, 0x48, 0x89, 0xfb, 0xe8, 0, 0, 0, 0, 0xe8, 0, 0, 0, 0, 0x48, 0x89, 0xdf, 0xe8, 0,
            0, 0, 0, 0x5b, 0xc3,
        ];
        assert_eq!(sites(&code).unwrap(), vec![(0x11, reg(Register::RBX))]);
    }

    #[test]
    fn a_tail_call_to_the_unlock_closes_where_the_cache_is_its_argument() {
        // 0: push %rbx; 1: mov %rdi,%rbx; 4: call fill; 9: mov %rbx,%rdi; c: pop %rbx;
        // d: jmp unlock
        let code = [
            0x53, 0x48, 0x89, 0xfb, 0xe8, 0, 0, 0, 0, 0x48, 0x89, 0xdf, 0x5b, 0xe9, 0, 0x10, 0, 0,
        ];
        assert_eq!(sites(&code).unwrap(), vec![(0xd, reg(Register::RDI))]);
    }

    #[test]
    fn each_path_s_last_call_is_a_site() {
        // 0: push %rbx; 1: mov %rdi,%rbx; 4: test %esi,%esi; 6: je 0x12; 8: call a;
        // d: pop %rbx; e: ret; f: nop; 10: nop; 11: nop; 12: call b; 17: pop %rbx; 18: ret
        let code = [
            0x53, 0x48, 0x89, 0xfb, 0x85, 0xf6, 0x74, 0x0a, 0xe8, 0, 0, 0, 0, 0x5b, 0xc3, 0x90,
            0x90, 0x90, 0xe8, 0, 0, 0, 0, 0x5b, 0xc3,
        ];
        assert_eq!(
            sites(&code).unwrap(),
            vec![(0x8, reg(Register::RBX)), (0x12, reg(Register::RBX))]
        );
    }

    #[test]
    fn a_landing_pad_s_call_is_not_a_last_call() {
        // 0: push %rbx; 1: mov %rdi,%rbx; 4: call unlock; 9: jmp 0x13; b: mov %rax,%rdi;
        // e: call _Unwind_Resume (reached by the unwinder alone); 13: pop %rbx; 14: ret
        let code = [
            0x53, 0x48, 0x89, 0xfb, 0xe8, 0, 0, 0, 0, 0xeb, 0x08, 0x48, 0x89, 0xc7, 0xe8, 0, 0, 0,
            0, 0x5b, 0xc3,
        ];
        assert_eq!(sites(&code).unwrap(), vec![(0x4, reg(Register::RBX))]);
    }

    #[test]
    fn a_path_that_returns_without_a_call_needs_the_entry() {
        // 0: test %rdi,%rdi; 3: je 0xa; 5: call fill; a: ret
        let code = [0x48, 0x85, 0xff, 0x74, 0x05, 0xe8, 0, 0, 0, 0, 0xc3];
        let err = sites(&code).unwrap_err();
        assert!(err.contains("without a call"), "{err}");
    }

    #[test]
    fn a_call_in_the_refill_s_loop_is_not_its_last() {
        // 0: push %rbx; 1: mov %rdi,%rbx; 4: call insert; 9: dec %esi; b: jne 4; d: pop %rbx;
        // e: ret
        let code = [
            0x53, 0x48, 0x89, 0xfb, 0xe8, 0, 0, 0, 0, 0xff, 0xce, 0x75, 0xf7, 0x5b, 0xc3,
        ];
        let err = sites(&code).unwrap_err();
        assert!(err.contains("after its call at +0x4"), "{err}");
    }

    /// The call or jump at `+offset` in fixtures whose calls all target the next instruction.
    fn targets(offsets: &'static [u64]) -> impl Fn(&Instruction) -> bool {
        move |ins: &Instruction| offsets.contains(&(ins.ip() - START))
    }

    #[test]
    fn the_refill_holds_its_lock_at_the_first_emulated_instruction_after_taking_it() {
        // The native demo's update (g++ -O2): 0: push %rbp; 1: mov %rdi,%rbp; 4: call lock;
        // 9: test %eax,%eax; b: jne 0x13; d: call fill; 12: pop %rbp; 13: ret
        let code = [
            0x55, 0x48, 0x89, 0xfd, 0xe8, 0, 0, 0, 0, 0x85, 0xc0, 0x75, 0x06, 0xe8, 0, 0, 0, 0,
            0x5d, 0xc3,
        ];
        let d = Decoded::decode(&code, START).unwrap();
        let found = locked_sites(&d, Some(Register::RDI), None, &targets(&[0x4])).unwrap();
        let found: Vec<_> = found.into_iter().map(|(s, o)| (s.offset, o)).collect();
        assert_eq!(found, vec![(0xb, reg(Register::RBP))]);
        let err = locked_sites(&d, Some(Register::RDI), None, &targets(&[0xd])).unwrap_err();
        assert!(err.contains("first call at +0x4 takes no lock"), "{err}");
    }

    #[test]
    fn a_refill_that_may_return_before_locking_is_not_lock_guarded() {
        // 0: test %rdi,%rdi; 3: je 0xa; 5: call lock; a: ret
        let code = [0x48, 0x85, 0xff, 0x74, 0x05, 0xe8, 0, 0, 0, 0, 0xc3];
        let d = Decoded::decode(&code, START).unwrap();
        let err = locked_sites(&d, Some(Register::RDI), None, &targets(&[0x5])).unwrap_err();
        assert!(err.contains("leaves at +0xa before any call"), "{err}");
    }

    #[test]
    fn the_clear_must_end_with_an_unlock() {
        // 0: push %rbx; 1: mov %rdi,%rbx; 4: call fill; 9: mov %rbx,%rdi; c: pop %rbx;
        // d: jmp unlock
        let code = [
            0x53, 0x48, 0x89, 0xfb, 0xe8, 0, 0, 0, 0, 0x48, 0x89, 0xdf, 0x5b, 0xe9, 0, 0x10, 0, 0,
        ];
        let d = Decoded::decode(&code, START).unwrap();
        let exits = d.exits(&|_| false).unwrap();
        let found = unlock_sites(&d, &exits, Some(Register::RDI), None, &targets(&[0xd])).unwrap();
        assert_eq!(found[0].0.offset, 0xd);
        let err =
            unlock_sites(&d, &exits, Some(Register::RDI), None, &targets(&[0x4])).unwrap_err();
        assert!(err.contains("last call at +0xd releases no lock"), "{err}");
    }

    #[test]
    fn a_cache_no_longer_held_at_the_last_call_needs_the_entry() {
        // 0: call fill (the argument register is the callee's to change); 5: call unlock; a: ret
        let code = [0xe8, 0, 0, 0, 0, 0xe8, 0, 0, 0, 0, 0xc3];
        let err = sites(&code).unwrap_err();
        assert!(err.contains("no register or stack slot"), "{err}");
        let d = Decoded::decode(&code, START).unwrap();
        let global = ObjectAt::Static(0x4040);
        let found = close_sites(&d, &d.exits(&|_| false).unwrap(), None, Some(global)).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].0.offset, found[0].1), (5, global));
    }
}
