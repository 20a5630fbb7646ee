//! Native programs (`racewatch watch`): a cache's clear, refill and lookup functions in any ELF
//! file, and the native stacks of both sides.
use std::path::PathBuf;

use crate::{
    cli::WatchArgs,
    probe::{
        placement,
        plan::{LookupProbe, Plan, copies_not_probed},
        symbols::SymbolTable,
    },
    targets::StackConfig,
    text::escape,
};

pub mod stacks;

use stacks::ReturnedFrom;

/// Finds `args`' functions in `binary` and where to probe each; every error is the user's to fix
/// (a missing file, an unknown symbol).
pub fn plan(args: &WatchArgs, binary: PathBuf) -> anyhow::Result<(Plan, StackConfig)> {
    let table = SymbolTable::load(&binary)?;
    let resolve = |name: &str| table.resolve(name);
    let (clear, refill, lookup) = (
        resolve(&args.clear)?,
        resolve(&args.update)?,
        resolve(&args.lookup)?,
    );
    let miss_path = args.miss_ret.is_some() && !args.probe_returns;
    let unprobed = copies_not_probed(
        &table,
        &[("clear", &clear), ("refill", &refill), ("lookup", &lookup)],
        miss_path.then_some(&lookup),
    );
    let verbose = args.run.verbose;
    let clear = placement::place_entry(&binary, "clear", clear, args.cache_arg, verbose);
    // On the miss path alone, ordinary lookups are not seen: the hazard report counts them in
    // bursts at the lookup's entry.
    let sample = (args.miss_ret.is_some() && !args.probe_returns).then(|| {
        placement::place_entry(
            &binary,
            "lookup sample",
            lookup.clone(),
            args.cache_arg,
            verbose,
        )
    });
    let refills = vec![placement::place_refill(
        &binary,
        &table,
        refill,
        args.cache_arg,
        verbose,
    )];
    let lookup = match args.miss_ret {
        Some(_) if args.probe_returns => {
            LookupProbe::EntryAndReturn(placement::at_entry(&binary, "lookup", lookup, verbose))
        }
        Some(value) => {
            placement::place_miss(&binary, lookup, args.cache_arg, value, verbose)
                .unwrap_or_else(|(lookup, why)| {
                    eprintln!(
                        "racewatch: warning: probing every lookup's entry and return, not just its misses: \
                         cannot tell from {}'s code where it returns {value}: {why}",
                        escape(&lookup.display)
                    );
                    LookupProbe::EntryAndReturn(placement::at_entry(
                        &binary, "lookup", lookup, verbose,
                    ))
                })
        }
        None => LookupProbe::Entry(placement::place_entry(
            &binary,
            "lookup",
            lookup,
            args.cache_arg,
            verbose,
        )),
    };
    // At a probed return the lookup's own frame is gone: the stack starts in its caller.
    let returned_from = match &lookup {
        LookupProbe::EntryAndReturn(f) => Some(ReturnedFrom {
            binary: binary.clone(),
            address: f.function.address,
        }),
        _ => None,
    };
    let plan = Plan {
        binary,
        object_arg: args.cache_arg,
        window: 0,
        clear,
        refills,
        sample: sample.filter(|_| matches!(lookup, LookupProbe::Miss { .. })),
        sample_always: false,
        unprobed,
        gil: None,
        lookup,
    };
    Ok((plan, StackConfig::Native { returned_from }))
}
