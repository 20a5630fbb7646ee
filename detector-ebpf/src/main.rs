//! racewatch's probes. The kernel keeps each cache's window state and sends userspace only window
//! boundaries and the lookups that overlap an open window: ordinary lookups never cross.
#![no_std]
#![no_main]

mod globals;
mod lookups;
mod maps;
mod processes;
mod provoke;
mod python;
mod sampling;
mod stacks;
mod util;
mod windows;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
