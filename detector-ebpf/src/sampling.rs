//! Sampling bursts of the lookup's entry: counts only, for the hazard report's lookup rates.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::uprobe, programs::ProbeContext};
use detector_common::Stat;

use crate::{
    lookups::note_lookup,
    util::{bump, watched_object, window},
};

/// The lookup function's entry (`V lookup(Cache *c, K key)`; CPython's
/// `PyDict_GetItemWithError(dict, key)`), attached in short bursts when lookups are not otherwise
/// probed: counts the lookup for the hazard report, and nothing else.
#[uprobe]
pub fn on_lookup_sample(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsLookupSample);
    let Some((who, cache, _)) = watched_object(&ctx) else {
        return 0;
    };
    note_lookup(
        &cache,
        who.tid,
        unsafe { bpf_ktime_get_ns() },
        window(&cache).as_ref(),
    );
    0
}
